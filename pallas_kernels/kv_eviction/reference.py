"""Pure-jnp references for the KV-eviction kernels: row compaction and ragged decode attention.

Layout (one layer of ``jaxeff.cache``): k ``[B, Hkv, S, Dk]``, v ``[B, Hkv, S, Dv]``, pos ``[B, Hkv, S]`` int32 (the
absolute token position held by each slot, -1 = empty), length ``[B, Hkv]`` int32; occupied slots are the prefix
``[0, length)`` of each (sequence, KV head) row.

These functions are the specification the kernels are tested against: they are written for clarity (a stable sort,
a full-capacity masked softmax in float32), not speed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def compact_reference(
    k: jax.Array, v: jax.Array, pos: jax.Array, keep: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Moves the filled (``pos >= 0``) slots with ``keep`` True to the front of each row, in their original order.

    k ``[B, Hkv, S, Dk]``, v ``[B, Hkv, S, Dv]``, pos ``[B, Hkv, S]``, keep ``[B, Hkv, S]`` bool. Returns
    ``(k, v, pos, length)``: every slot at or after ``length`` (the number kept, ``[B, Hkv]`` int32) has pos -1 and
    zero K/V.
    """
    kept = keep & (pos >= 0)
    order = jnp.argsort(jnp.logical_not(kept).astype(jnp.int32), axis=-1, stable=True)  # kept slots first
    length = jnp.sum(kept, axis=-1, dtype=jnp.int32)
    live = jnp.arange(pos.shape[-1], dtype=jnp.int32) < length[..., None]
    k_out = jnp.where(live[..., None], jnp.take_along_axis(k, order[..., None], axis=2), jnp.zeros((), k.dtype))
    v_out = jnp.where(live[..., None], jnp.take_along_axis(v, order[..., None], axis=2), jnp.zeros((), v.dtype))
    pos_out = jnp.where(live, jnp.take_along_axis(pos, order, axis=-1), -1).astype(jnp.int32)
    return k_out, v_out, pos_out, length


def decode_mask(
    pos: jax.Array, length: jax.Array, q_pos: jax.Array, sliding_window: int | None = None
) -> jax.Array:
    """``[B, Hkv, S]`` bool: the decode query of sequence ``b`` (at position ``q_pos[b]``) may attend to a slot.

    A slot is allowed iff it is occupied (``slot < length``), filled and causal (``0 <= pos <= q_pos``), and inside
    the window (``q_pos - pos < sliding_window``) when one is set. On a well-formed cache (pos -1 from ``length`` on)
    this is exactly ``jaxeff.attention.dense.attention_mask``; the ``slot < length`` term is what makes skipping
    the blocks past ``length`` exact whatever stale data they hold.
    """
    slot = jnp.arange(pos.shape[-1], dtype=jnp.int32)
    qp = q_pos[:, None, None]
    mask = (slot < length[..., None]) & (pos >= 0) & (pos <= qp)
    if sliding_window is not None:
        mask &= qp - pos < sliding_window
    return mask


def ragged_decode_attention_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, pos: jax.Array, length: jax.Array, q_pos: jax.Array, *,
    sliding_window: int | None = None, scale: float | None = None,
) -> jax.Array:
    """Attention of one decode token per sequence over its cache rows; ``[B, Hq, Dv]`` in ``q.dtype``.

    q ``[B, Hq, Dk]`` (RoPE applied), Hq = Hkv * G and query head ``h`` reads KV head ``h // G``; q_pos ``[B]``.
    Computed in float32 over the full capacity with ``decode_mask``; a query with no allowed slot gives zeros.
    """
    b, hq, d = q.shape
    hkv = k.shape[1]
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, hkv, hq // hkv, d).astype(jnp.float32)
    logits = jnp.einsum("bhgd,bhsd->bhgs", qg, k.astype(jnp.float32)) * scale
    mask = decode_mask(pos, length, q_pos, sliding_window)[:, :, None, :]
    logits = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.where(mask, jnp.exp(logits - row_max), 0.0)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(total > 0, total, 1.0)
    out = jnp.einsum("bhgs,bhsd->bhgd", probs, v.astype(jnp.float32))
    return out.reshape(b, hq, v.shape[-1]).astype(q.dtype)
