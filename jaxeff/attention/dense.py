"""Dense reference attention over a position-mapped KV view (grouped-query, causal, optional sliding window).

This is the reference every attention kernel and every KV method is checked against. Masks are derived from
absolute positions, not slot indices, so the same function is exact for a plain sequence, a cache with padding,
and a cache whose rows were compacted by an eviction policy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxeff.cache import LayerKV

_MASKED = -1e30


def attention_mask(q_positions: jax.Array, kv: LayerKV, sliding_window: int | None = None) -> jax.Array:
    """``[B, Hkv, T, S]`` bool: query ``t`` may attend to slot ``s`` (slot filled, causal, inside the window)."""
    qp = q_positions[:, None, :, None]
    kp = kv.pos[:, :, None, :]
    mask = (kp >= 0) & (kp <= qp)
    if sliding_window is not None:
        mask &= qp - kp < sliding_window
    return mask


def _group_queries(q: jax.Array, hkv: int) -> jax.Array:
    """``[B, T, Hq, D] -> [B, Hkv, G*T, D]``: each KV head's query heads stacked along the row axis, so both
    attention matmuls are plain batched matmuls over ``(B, Hkv)`` (XLA's CPU backend runs a 5-D grouped einsum
    about twice as slowly)."""
    b, t, hq, d = q.shape
    return q.reshape(b, t, hkv, hq // hkv, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, (hq // hkv) * t, d)


def attention_logits(q: jax.Array, k: jax.Array, scale: float) -> jax.Array:
    """Scores ``[B, Hkv, G, T, S]`` (float32) for q ``[B, T, Hq, D]`` and k ``[B, Hkv, S, D]``, Hq = Hkv * G."""
    b, t, hq, _ = q.shape
    hkv = k.shape[1]
    qg = _group_queries(q, hkv)
    logits = jnp.einsum("bhqd,bhsd->bhqs", qg, k.astype(q.dtype), preferred_element_type=jnp.float32) * scale
    return logits.reshape(b, hkv, hq // hkv, t, k.shape[2])


def masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the last axis with ``mask`` (broadcastable); rows with no allowed entry give zeros."""
    logits = jnp.where(mask, logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0)


def dense_attention(
    q: jax.Array, kv: LayerKV, q_positions: jax.Array, *, sliding_window: int | None = None,
    scale: float | None = None, causal_aligned: bool = False, chunk: int = 128,
) -> jax.Array:
    """Attention output ``[B, T, Hq, D]`` in ``q.dtype``.

    q: ``[B, T, Hq, D]`` (RoPE applied); kv: keys/values ``[B, Hkv, S, D]`` with positions ``[B, Hkv, S]``;
    q_positions: ``[B, T]``. Softmax runs in float32.

    causal_aligned: the caller guarantees that slot ``s`` holds the ``s``-th query token and that positions
    increase along the sequence (the cache-free forward pass, or the first prefill of an empty cache with default
    positions). Then no query attends to a later slot, and queries are processed in chunks of ``chunk`` rows that
    each read only the slots up to their last row: about half the work of the full square for long sequences,
    with the same result (skipped entries are masked ones, whose softmax weight is exactly zero).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale

    def attend(q, kv, q_positions):
        return _attend(q, kv, q_positions, sliding_window, scale)

    if causal_aligned:
        return causal_chunks(attend, q, kv, q_positions, chunk=chunk)
    return attend(q, kv, q_positions)


def causal_chunks(attend, q: jax.Array, kv: LayerKV, q_positions: jax.Array, *slot_arrays: jax.Array,
                  chunk: int = 128) -> jax.Array:
    """Causal chunk skipping for a ``kv`` aligned with the queries (slot ``s`` holds query token ``s``, positions
    increasing): ``attend(q_chunk, kv_prefix, q_positions_chunk, *slot_arrays_prefix)`` for each chunk of ``chunk``
    query rows, over only the slots up to the chunk's last row, concatenated along the query axis. Per-slot
    arrays ``[..., S]`` in ``slot_arrays`` are cut to the same prefix. Short sequences (under two chunks) run in
    one call."""
    t = q.shape[1]
    if t < 2 * chunk or kv.capacity < t:
        return attend(q, kv, q_positions, *slot_arrays)
    outs = []
    for start in range(0, t, chunk):
        stop = min(start + chunk, t)
        part = LayerKV(k=kv.k[:, :, :stop], v=kv.v[:, :, :stop], pos=kv.pos[:, :, :stop], length=kv.length)
        outs.append(attend(q[:, start:stop], part, q_positions[:, start:stop], *(a[..., :stop] for a in slot_arrays)))
    return jnp.concatenate(outs, axis=1)


def _attend(q: jax.Array, kv: LayerKV, q_positions: jax.Array, sliding_window: int | None, scale: float):
    b, t, hq, _ = q.shape
    logits = attention_logits(q, kv.k, scale)
    mask = attention_mask(q_positions, kv, sliding_window)[:, :, None]  # [B, Hkv, 1, T, S]
    probs = masked_softmax(logits, mask)
    hkv, dv = kv.v.shape[1], kv.v.shape[-1]
    probs = probs.reshape(b, hkv, -1, probs.shape[-1]).astype(q.dtype)  # [B, Hkv, G*T, S]
    out = jnp.einsum("bhqs,bhsd->bhqd", probs, kv.v.astype(q.dtype))
    return out.reshape(b, hkv, hq // hkv, t, dv).transpose(0, 3, 1, 2, 4).reshape(b, t, hq, dv)
