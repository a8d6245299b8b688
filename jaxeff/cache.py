"""The KV cache: fixed-capacity buffers plus per-(layer, sequence, KV head) lengths and a position map.

Shapes never change under ``jit``. Every (layer, sequence, KV head) owns a row of ``capacity`` slots; the occupied
slots are ``[0, length)`` and ``pos`` holds the absolute token position stored in each slot (``-1`` = empty). The
position map is what lets a method keep a *subset* of the tokens (eviction compacts the kept entries to the front
of the row and lowers ``length``) or roll back speculative tokens (lower ``length``), while attention stays exact:
a query at position ``p`` attends to every slot with ``0 <= pos <= p``.

``next_pos[b]`` is the position the next token of sequence ``b`` will get (its logical length, which eviction
does not change).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class LayerKV:
    """One layer's view of the cache (or of the current sequence when there is no cache).

    k, v: ``[B, Hkv, S, D]``; pos: ``[B, Hkv, S]`` int32 (``-1`` empty); length: ``[B, Hkv]`` int32.
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    length: jax.Array

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @classmethod
    def from_sequence(cls, k: jax.Array, v: jax.Array, positions: jax.Array, valid: jax.Array) -> "LayerKV":
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

    k, v: ``[L, B, Hkv, S, D]``; pos: ``[L, B, Hkv, S]`` int32; length: ``[L, B, Hkv]`` int32; next_pos: ``[B]``.
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    length: jax.Array
    next_pos: jax.Array

    @classmethod
    def create(
        cls, num_layers: int, batch: int, num_kv_heads: int, capacity: int, head_dim: int, dtype=jnp.float32,
        v_head_dim: int | None = None,
    ) -> "KVCache":
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
        return LayerKV(k=self.k[i], v=self.v[i], pos=self.pos[i], length=self.length[i])

    def layers(self) -> LayerKV:
        """All layers as one LayerKV with a leading layer axis (what ``lax.scan`` iterates over)."""
        return LayerKV(k=self.k, v=self.v, pos=self.pos, length=self.length)

    def with_layers(self, stacked: LayerKV, next_pos: jax.Array) -> "KVCache":
        return KVCache(k=stacked.k, v=stacked.v, pos=stacked.pos, length=stacked.length, next_pos=next_pos)

    def nbytes(self) -> int:
        """Bytes of the K/V buffers (the metadata is a small extra: ``pos``/``length``/``next_pos``)."""
        return self.k.size * self.k.dtype.itemsize + self.v.size * self.v.dtype.itemsize

    def truncate(self, new_next_pos: jax.Array) -> "KVCache":
        """Forgets every cached token at position ``>= new_next_pos[b]`` (rejecting speculative or Jacobi tokens).
        Assumes the kept tokens occupy the front of each row, as ``append_kv`` leaves them."""
        keep = (self.pos >= 0) & (self.pos < new_next_pos[None, :, None, None])
        return KVCache(
            k=self.k, v=self.v, pos=jnp.where(keep, self.pos, -1),
            length=jnp.sum(keep, axis=-1, dtype=jnp.int32), next_pos=new_next_pos.astype(jnp.int32),
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
    return LayerKV(
        k=write(kv.k, slots, k_t),
        v=write(kv.v, slots, v_t),
        pos=write(kv.pos, slots, pos_rows),
        length=jnp.minimum(kv.length + n_valid, kv.capacity),
    )
