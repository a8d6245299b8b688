"""The KV cache: fixed-capacity buffers plus per-(layer, sequence, KV head) lengths and a position map.

Shapes never change under ``jit``. Every (layer, sequence, KV head) owns a row of ``capacity`` slots; the occupied
slots are ``[0, length)`` and ``pos`` holds the absolute token position stored in each slot (``-1`` = empty). The
position map is what lets a method keep a *subset* of the tokens (eviction compacts the kept entries to the front
of the row and lowers ``length``) or roll back speculative tokens (lower ``length``), while attention stays exact:
a query at position ``p`` attends to every slot with ``0 <= pos <= p``.

``next_pos[b]`` is the position the next token of sequence ``b`` will get (its logical length, which eviction
does not change).

Two optional fields belong to KV-eviction policies (``jaxeff.methods.kv_eviction``) and are None otherwise, so a
plain cache is unchanged: ``score`` ``[..., S]`` float32, a per-slot score accumulated across steps (H2O's summed
attention), moved along by every slot operation (``append_kv`` starts new slots at 0, ``compact_kv`` permutes it,
``truncate`` zeroes dropped slots); and ``budget`` ``[...]`` int32, the number of entries a policy keeps per row
when it evicts again during decoding.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class LayerKV:
    """One layer's view of the cache (or of the current sequence when there is no cache).

    k, v: ``[B, Hkv, S, D]``; pos: ``[B, Hkv, S]`` int32 (``-1`` empty); length: ``[B, Hkv]`` int32;
    score: None or ``[B, Hkv, S]`` float32; budget: None or ``[B, Hkv]`` int32 (see the module docstring).
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    length: jax.Array
    score: jax.Array | None = None
    budget: jax.Array | None = None

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @classmethod
    def from_sequence(cls, k: jax.Array, v: jax.Array, positions: jax.Array, valid: jax.Array) -> LayerKV:
        """Wraps the current tokens' keys/values (``[B, T, Hkv, D]``) as a cache-shaped view, for the cache-free
        forward pass (training, scoring)."""
        b, t, hkv, _ = k.shape
        pos = jnp.where(valid, positions, -1).astype(jnp.int32)
        return cls(
            k=jnp.swapaxes(k, 1, 2),
            v=jnp.swapaxes(v, 1, 2),
            pos=jnp.broadcast_to(pos[:, None, :], (b, hkv, t)),
            length=jnp.broadcast_to(jnp.sum(valid, axis=-1, dtype=jnp.int32)[:, None], (b, hkv)),
        )

    def valid_mask(self) -> jax.Array:
        """``[B, Hkv, S]`` bool: slot holds a token."""
        return self.pos >= 0


@flax.struct.dataclass
class KVCache:
    """The whole model's cache, stacked over layers.

    k, v: ``[L, B, Hkv, S, D]``; pos: ``[L, B, Hkv, S]`` int32; length: ``[L, B, Hkv]`` int32; next_pos: ``[B]``;
    score: None or ``[L, B, Hkv, S]`` float32; budget: None or ``[L, B, Hkv]`` int32 (eviction policies only).
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    length: jax.Array
    next_pos: jax.Array
    score: jax.Array | None = None
    budget: jax.Array | None = None

    @classmethod
    def create(
        cls, num_layers: int, batch: int, num_kv_heads: int, capacity: int, head_dim: int, dtype=jnp.float32,
        v_head_dim: int | None = None,
    ) -> KVCache:
        if capacity <= 0:
            raise ValueError(f"cache capacity: expected a positive number of slots, got {capacity}")
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        return cls(
            k=jnp.zeros((num_layers, batch, num_kv_heads, capacity, head_dim), dtype),
            v=jnp.zeros((num_layers, batch, num_kv_heads, capacity, v_head_dim), dtype),
            pos=jnp.full((num_layers, batch, num_kv_heads, capacity), -1, jnp.int32),
            length=jnp.zeros((num_layers, batch, num_kv_heads), jnp.int32),
            next_pos=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    def layer(self, i) -> LayerKV:
        return jax.tree.map(lambda a: a[i], self.layers())

    def layers(self) -> LayerKV:
        """All layers as one LayerKV with a leading layer axis (what ``lax.scan`` iterates over)."""
        return LayerKV(k=self.k, v=self.v, pos=self.pos, length=self.length, score=self.score, budget=self.budget)

    def with_layers(self, stacked: LayerKV, next_pos: jax.Array) -> KVCache:
        return KVCache(
            k=stacked.k, v=stacked.v, pos=stacked.pos, length=stacked.length, next_pos=next_pos,
            score=stacked.score, budget=stacked.budget,
        )

    def nbytes(self) -> int:
        """Bytes of the K/V buffers (the metadata is a small extra: ``pos``/``length``/``next_pos``, and an
        eviction policy's ``score``/``budget`` when present)."""
        return self.k.size * self.k.dtype.itemsize + self.v.size * self.v.dtype.itemsize

    def resize(self, capacity: int) -> KVCache:
        """The same cache with ``capacity`` slots per row: drops the empty tail slots, or appends empty ones.

        An eviction policy that compacted the prompt leaves most of each row empty; ``jaxeff.generate`` moves such
        a cache into a smaller one before decoding, so the memory really shrinks. Raises ``ValueError`` when a
        row holds more entries than ``capacity`` (checked when the lengths are concrete)."""
        capacity = int(capacity)
        if capacity <= 0:
            raise ValueError(f"resize: capacity: expected a positive number of slots, got {capacity}")
        if not isinstance(self.length, jax.core.Tracer) and self.length.size:
            longest = int(jnp.max(self.length))
            if longest > capacity:
                raise ValueError(
                    f"resize: capacity: expected at least the longest row's {longest} entries, got {capacity}"
                )
        cur = self.capacity
        if capacity == cur:
            return self

        def fit(a, axis, fill):
            if capacity < cur:
                return jax.lax.slice_in_dim(a, 0, capacity, axis=axis)
            pad = [(0, 0)] * a.ndim
            pad[axis] = (0, capacity - cur)
            return jnp.pad(a, pad, constant_values=fill)

        return KVCache(
            k=fit(self.k, 3, 0), v=fit(self.v, 3, 0), pos=fit(self.pos, 3, -1), length=self.length,
            next_pos=self.next_pos, score=None if self.score is None else fit(self.score, 3, 0),
            budget=self.budget,
        )

    def truncate(self, new_next_pos: jax.Array) -> KVCache:
        """Forgets every cached token at position ``>= new_next_pos[b]`` (rejecting speculative or Jacobi tokens).
        Assumes the kept tokens occupy the front of each row, as ``append_kv`` leaves them."""
        keep = (self.pos >= 0) & (self.pos < new_next_pos[None, :, None, None])
        return KVCache(
            k=self.k, v=self.v, pos=jnp.where(keep, self.pos, -1),
            length=jnp.sum(keep, axis=-1, dtype=jnp.int32), next_pos=new_next_pos.astype(jnp.int32),
            score=None if self.score is None else jnp.where(keep, self.score, 0.0), budget=self.budget,
        )


def append_kv(kv: LayerKV, k: jax.Array, v: jax.Array, positions: jax.Array, valid: jax.Array) -> LayerKV:
    """Writes the new tokens' keys/values after each row's occupied slots.

    k, v: ``[B, T, Hkv, D]``; positions, valid: ``[B, T]`` (valid tokens form a prefix of each row: right
    padding). Tokens that do not fit are dropped rather than written over other slots; callers check the capacity
    on the host (``jaxeff.generate`` does) so this never happens silently in normal use.
    """
    t = k.shape[1]
    slots = kv.length[:, :, None] + jnp.arange(t, dtype=jnp.int32)  # [B, Hkv, T]
    new_pos = jnp.where(valid, positions, -1).astype(jnp.int32)  # [B, T]
    k_t = jnp.swapaxes(k, 1, 2).astype(kv.k.dtype)  # [B, Hkv, T, D]
    v_t = jnp.swapaxes(v, 1, 2).astype(kv.v.dtype)

    def write_row(buf, idx, new):
        return buf.at[idx].set(new, mode="drop")

    write = jax.vmap(jax.vmap(write_row))  # over B, Hkv
    hkv = kv.k.shape[1]
    pos_rows = jnp.broadcast_to(new_pos[:, None, :], (new_pos.shape[0], hkv, t))
    n_valid = jnp.sum(valid, axis=-1, dtype=jnp.int32)[:, None]
    score = None
    if kv.score is not None:  # new entries start with no accumulated score
        score = write(kv.score, slots, jnp.zeros(pos_rows.shape, kv.score.dtype))
    return LayerKV(
        k=write(kv.k, slots, k_t),
        v=write(kv.v, slots, v_t),
        pos=write(kv.pos, slots, pos_rows),
        length=jnp.minimum(kv.length + n_valid, kv.capacity),
        score=score,
        budget=kv.budget,
    )


def compact_kv(kv: LayerKV, keep: jax.Array) -> LayerKV:
    """Keeps the filled slots where ``keep`` ``[B, Hkv, S]`` is True, moved to the front of each row in their
    original order, with their positions (and scores); every other slot becomes empty (``pos`` -1, zero K/V and
    score) and ``length`` drops to the number kept. What an eviction policy does to a row.

    This is the XLA path (a stable argsort per row and gathers); a Pallas kernel for the same function lives in
    ``pallas_kernels/kv_eviction``. Works on any leading axes (``[L, B, Hkv, S]`` too).
    """
    keep = keep & (kv.pos >= 0)
    order = jnp.argsort(jnp.logical_not(keep).astype(jnp.int8), axis=-1, stable=True)  # kept slots first
    n_kept = jnp.sum(keep, axis=-1, dtype=jnp.int32)
    held = jnp.arange(kv.pos.shape[-1]) < n_kept[..., None]

    def gather(a):
        if a.ndim == order.ndim:
            return jnp.where(held, jnp.take_along_axis(a, order, axis=-1), jnp.zeros((), a.dtype))
        return jnp.where(held[..., None], jnp.take_along_axis(a, order[..., None], axis=-2), jnp.zeros((), a.dtype))

    return LayerKV(
        k=gather(kv.k), v=gather(kv.v), pos=jnp.where(held, jnp.take_along_axis(kv.pos, order, axis=-1), -1),
        length=n_kept, score=None if kv.score is None else gather(kv.score), budget=kv.budget,
    )
