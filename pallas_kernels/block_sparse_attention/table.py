"""Block tables: the host-side description of a block-sparse attention pattern that every implementation reads.

The sequence of ``N`` tokens is cut into ``nq = N / block_q`` query blocks and ``nk = N / block_kv`` KV blocks. A
``BlockTable`` lists, for each query block, the KV blocks it visits (``kv_ids``) and how many (``counts``); the
unused tail of each list repeats its last valid id, so a pipelined kernel that reads the list past ``counts`` asks
for a block it already holds and fetches nothing new. ``kv_valid`` masks single keys (the padding at the end of a
frame); every other visited block is attended in full, so the pattern has no partially masked ("mixed") blocks
beyond padding.

A table is built once on the host (numpy), is immutable and hashable by content, so it can be a static argument of
``jax.jit``: the XLA path groups query blocks by their counts at trace time, and the Pallas kernels receive the
arrays as scalar-prefetched operands.

Shapes (``M`` = 1 when all heads share the pattern, or the number of heads for per-head patterns)::

    kv_ids   int32 [M, nq, max_kv]     KV block ids visited by each query block, ascending, tail padded
    counts   int32 [M, nq]             valid entries per list (0 allowed: such a row attends to nothing -> 0)
    kv_valid bool  [N] or None         key validity per token; None = every key is valid
"""

from __future__ import annotations

import dataclasses
import hashlib
from functools import cached_property
from typing import Optional

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class BlockTable:
    kv_ids: np.ndarray
    counts: np.ndarray
    block_q: int
    block_kv: int
    kv_valid: Optional[np.ndarray] = None

    def __post_init__(self):
        kv_ids = np.ascontiguousarray(self.kv_ids, dtype=np.int32)
        counts = np.ascontiguousarray(self.counts, dtype=np.int32)
        if kv_ids.ndim != 3:
            raise ValueError(f"kv_ids: expected int32 [M, nq, max_kv], got shape {kv_ids.shape}")
        if counts.shape != kv_ids.shape[:2]:
            raise ValueError(f"counts: expected shape {kv_ids.shape[:2]} (M, nq), got {counts.shape}")
        for name in ("block_q", "block_kv"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if counts.min(initial=0) < 0 or counts.max(initial=0) > kv_ids.shape[2]:
            raise ValueError(f"counts: expected values in [0, max_kv={kv_ids.shape[2]}], got range "
                             f"[{counts.min()}, {counts.max()}]")
        object.__setattr__(self, "kv_ids", kv_ids)
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "block_q", int(self.block_q))
        object.__setattr__(self, "block_kv", int(self.block_kv))
        if self.kv_valid is not None:
            kv_valid = np.ascontiguousarray(self.kv_valid, dtype=bool)
            if kv_valid.shape != (self.seq_len,):
                raise ValueError(f"kv_valid: expected bool [N={self.seq_len}], got shape {kv_valid.shape}")
            if kv_valid.all():
                kv_valid = None
            object.__setattr__(self, "kv_valid", kv_valid)
        nk = self.num_kv_blocks
        if self.seq_len % self.block_kv:
            raise ValueError(f"block_kv={self.block_kv} does not divide the sequence length N={self.seq_len} "
                             f"(= nq x block_q)")
        valid = np.arange(kv_ids.shape[2])[None, None, :] < counts[..., None]
        if kv_ids.size and ((kv_ids < 0) | (kv_ids >= nk)).any():
            raise ValueError(f"kv_ids: expected block ids in [0, {nk}), got range [{kv_ids.min()}, {kv_ids.max()}]")
        listed = np.where(valid, kv_ids, -1)
        if (np.diff(listed, axis=-1)[valid[..., 1:]] <= 0).any():
            raise ValueError("kv_ids: each query block's valid ids must be strictly ascending")

    # ----------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_block_mask(cls, block_mask: np.ndarray, block_q: int, block_kv: int,
                        kv_valid: Optional[np.ndarray] = None, max_kv: Optional[int] = None) -> "BlockTable":
        """The table of a boolean block mask ``[nq, nk]`` (shared by all heads) or ``[M, nq, nk]``. ``max_kv``
        (default: the longest row) lets tables of several layers share one shape."""
        block_mask = np.asarray(block_mask, dtype=bool)
        if block_mask.ndim == 2:
            block_mask = block_mask[None]
        if block_mask.ndim != 3:
            raise ValueError(f"block_mask: expected bool [nq, nk] or [M, nq, nk], got shape {block_mask.shape}")
        M, nq, nk = block_mask.shape
        if nq * block_q != nk * block_kv:
            raise ValueError(f"block_mask [{nq}, {nk}] with block_q={block_q}, block_kv={block_kv} covers "
                             f"{nq * block_q} query tokens but {nk * block_kv} keys; self-attention needs them equal")
        counts = block_mask.sum(-1).astype(np.int32)
        longest = int(counts.max(initial=0))
        width = max(longest, 1) if max_kv is None else int(max_kv)
        if width < longest:
            raise ValueError(f"max_kv={max_kv} is smaller than the longest row ({longest} blocks)")
        # Stable argsort puts the visited ids first, in ascending order.
        order = np.argsort(~block_mask, axis=-1, kind="stable")[..., :width] if nk else np.zeros((M, nq, 0), int)
        if width > nk:
            order = np.concatenate([order, np.zeros((M, nq, width - nk), order.dtype)], axis=-1)
        last = np.take_along_axis(order, np.maximum(counts - 1, 0)[..., None], axis=-1)
        tail = np.arange(width)[None, None, :] >= counts[..., None]
        kv_ids = np.where(tail, np.where(counts[..., None] > 0, last, 0), order).astype(np.int32)
        return cls(kv_ids, counts, block_q, block_kv, kv_valid)

    # ------------------------------------------------------------------------------------------------- properties
    @property
    def num_masks(self) -> int:
        return self.kv_ids.shape[0]

    @property
    def num_q_blocks(self) -> int:
        return self.kv_ids.shape[1]

    @property
    def max_kv(self) -> int:
        return self.kv_ids.shape[2]

    @property
    def seq_len(self) -> int:
        return self.num_q_blocks * self.block_q

    @property
    def num_kv_blocks(self) -> int:
        return self.seq_len // self.block_kv

    @cached_property
    def block_mask(self) -> np.ndarray:
        """bool ``[M, nq, nk]``: which KV blocks each query block visits."""
        M, nq, _ = self.kv_ids.shape
        mask = np.zeros((M, nq, self.num_kv_blocks), bool)
        valid = np.arange(self.max_kv)[None, None, :] < self.counts[..., None]
        m, q, j = np.nonzero(valid)
        mask[m, q, self.kv_ids[m, q, j]] = True
        return mask

    def token_mask(self) -> np.ndarray:
        """bool ``[M, N, N]``: the token-level mask the table stands for (what the reference attends with)."""
        mask = np.repeat(np.repeat(self.block_mask, self.block_q, axis=1), self.block_kv, axis=2)
        if self.kv_valid is not None:
            mask &= self.kv_valid[None, None, :]
        return mask

    @property
    def visited_blocks(self) -> int:
        """Blocks visited over all query blocks and masks: the work a kernel does, in block products."""
        return int(self.counts.sum())

    @property
    def sparsity(self) -> float:
        """Fraction of the ``nq x nk`` block products skipped (averaged over the masks)."""
        total = self.num_masks * self.num_q_blocks * self.num_kv_blocks
        return 1.0 - self.visited_blocks / total if total else 0.0

    def transpose(self) -> "BlockTable":
        """The KV-major table for the dK/dV pass: for each KV block, the query blocks that visit it. Its
        ``block_q``/``block_kv`` are swapped roles (rows are KV blocks of ``block_kv`` tokens)."""
        return BlockTable.from_block_mask(np.swapaxes(self.block_mask, 1, 2), self.block_kv, self.block_q)

    def for_heads(self, num_heads: int) -> np.ndarray:
        """Index ``[num_heads]`` of the mask each head uses (all 0 for a shared table)."""
        if self.num_masks == 1:
            return np.zeros(num_heads, np.int32)
        if self.num_masks != num_heads:
            raise ValueError(f"table has {self.num_masks} per-head masks but the attention has {num_heads} heads")
        return np.arange(num_heads, dtype=np.int32)

    def count_groups(self) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Query blocks grouped by count: ``[(count, mask_index [g], q_block [g]), ...]`` in descending count.
        Lets a gather-based implementation do exactly the visited work, one dense batch per distinct count."""
        groups = []
        for c in sorted(np.unique(self.counts).tolist(), reverse=True):
            m, q = np.nonzero(self.counts == c)
            groups.append((int(c), m.astype(np.int32), q.astype(np.int32)))
        return groups

    # ------------------------------------------------------------------------------------------- hash / equality
    @cached_property
    def _digest(self) -> str:
        h = hashlib.sha1()
        for arr in (self.kv_ids, self.counts):
            h.update(str(arr.shape).encode())
            h.update(arr.tobytes())
        h.update(f"{self.block_q},{self.block_kv}".encode())
        if self.kv_valid is not None:
            h.update(np.packbits(self.kv_valid).tobytes())
        return h.hexdigest()

    def __hash__(self) -> int:
        return hash(self._digest)

    def __eq__(self, other) -> bool:
        return isinstance(other, BlockTable) and self._digest == other._digest

    def __repr__(self) -> str:
        padded = 0 if self.kv_valid is None else int((~self.kv_valid).sum())
        return (f"BlockTable(masks={self.num_masks}, nq={self.num_q_blocks}, nk={self.num_kv_blocks}, "
                f"block_q={self.block_q}, block_kv={self.block_kv}, max_kv={self.max_kv}, "
                f"sparsity={self.sparsity:.3f}, padded_keys={padded})")


def dense_table(seq_len: int, block_q: int, block_kv: Optional[int] = None,
                kv_valid: Optional[np.ndarray] = None) -> BlockTable:
    """The table that visits every block: block-sparse attention with it is dense attention."""
    block_kv = block_q if block_kv is None else block_kv
    for name, b in (("block_q", block_q), ("block_kv", block_kv)):
        if seq_len % b:
            raise ValueError(f"{name}={b} does not divide seq_len={seq_len}")
    return BlockTable.from_block_mask(np.ones((seq_len // block_q, seq_len // block_kv), bool), block_q, block_kv,
                                      kv_valid)
