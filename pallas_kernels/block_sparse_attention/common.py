"""Pieces every block-sparse attention implementation shares: argument checks, the device copies of a table, the
key-padding bias and the numerical constants of the online softmax."""

from __future__ import annotations

import dataclasses
import functools
from functools import lru_cache
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.block_sparse_attention.table import BlockTable

NEG = -1e30
"""Finite "minus infinity" for masked logits: ``exp(NEG - NEG)`` stays 1, not NaN, while a row has seen nothing
valid yet, and a row whose running maximum is still below ``NEG / 2`` at the end attended to nothing."""

EMPTY_ROW_LSE = float("inf")
"""Log-sum-exp saved for a row that attended to nothing: ``exp(s - lse)`` is then 0 in the backward passes."""

NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b
TN = (((0,), (0,)), ((), ()))  # a.T @ b


def dot_precision(dtype) -> lax.Precision | None:
    """float32 inputs get true float32 matmuls (not TF32 on GPU, not one bf16 pass on TPU)."""
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def check_inputs(q: jax.Array, k: jax.Array, v: jax.Array, table: BlockTable) -> None:
    """Raises ValueError naming the argument unless q/k/v are ``[B, H, N, D]`` self-attention inputs matching
    ``table`` (``N == table.seq_len``, ``table.num_masks`` 1 or ``H``)."""
    if not isinstance(table, BlockTable):
        raise ValueError(f"table: expected a BlockTable, got {type(table).__name__}")
    if q.ndim != 4:
        raise ValueError(f"q: expected shape [B, H, N, D], got {q.shape}")
    if k.shape != q.shape:
        raise ValueError(f"k: expected the shape of q {q.shape} (self-attention, one KV head per query head), "
                         f"got {k.shape}")
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v: expected shape [B, H, N, Dv] with [B, H, N] = {q.shape[:3]}, got {v.shape}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name}: expected a floating dtype, got {x.dtype}")
    _, h, n, _ = q.shape
    if n != table.seq_len:
        raise ValueError(f"q: sequence length N={n} does not match the table's seq_len={table.seq_len} "
                         f"({table.num_q_blocks} query blocks of {table.block_q})")
    if table.num_masks not in (1, h):
        raise ValueError(f"table: expected 1 shared mask or one per head (H={h}), got num_masks={table.num_masks}")


def default_scale(sm_scale: Optional[float], head_dim: int) -> float:
    return head_dim ** -0.5 if sm_scale is None else float(sm_scale)


@dataclasses.dataclass(frozen=True)
class TableArrays:
    """The device arrays a Pallas kernel reads: the table and its transpose (for the dK/dV pass), and the key
    bias. ``M`` is 1 (shared) or the number of heads (the kernel's head ``h`` reads mask ``h``). Under
    ``shard_map`` the per-head arrays arrive sliced to the local heads.

    kv_ids int32 [M, nq, max_kv], counts int32 [M, nq], q_ids int32 [M, nk, max_q], q_counts int32 [M, nk],
    key_bias float32 [N] (0 for valid keys, ``NEG`` for padding) or None.
    """

    kv_ids: jax.Array
    counts: jax.Array
    q_ids: jax.Array
    q_counts: jax.Array
    key_bias: Optional[jax.Array]


jax.tree_util.register_dataclass(TableArrays, data_fields=["kv_ids", "counts", "q_ids", "q_counts", "key_bias"],
                                 meta_fields=[])


@lru_cache(maxsize=64)
def _host_arrays(table: BlockTable) -> tuple[np.ndarray, ...]:
    t = table.transpose()
    bias = None if table.kv_valid is None else np.where(table.kv_valid, 0.0, NEG).astype(np.float32)
    return table.kv_ids, table.counts, t.kv_ids, t.counts, bias


def table_arrays(table: BlockTable) -> TableArrays:
    """The kernels' view of ``table`` (the transpose is built once per table and cached)."""
    kv_ids, counts, q_ids, q_counts, bias = _host_arrays(table)
    return TableArrays(jnp.asarray(kv_ids), jnp.asarray(counts), jnp.asarray(q_ids), jnp.asarray(q_counts),
                       None if bias is None else jnp.asarray(bias))


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static settings of a Pallas implementation (hashable: a ``custom_vjp`` non-differentiable argument)."""

    block_q: int
    block_kv: int
    sm_scale: float
    interpret: object  # bool or pltpu.InterpretParams


def key_valid(arrays: TableArrays) -> Optional[jax.Array]:
    """bool ``[N]`` (None when every key is valid)."""
    return None if arrays.key_bias is None else arrays.key_bias > 0.5 * NEG


def flash_attention_vjp(forward, backward):
    """A differentiable attention ``f(q, k, v, arrays, cfg) -> out`` from two kernel drivers:

    * ``forward(q, k, v, arrays, cfg, need_lse) -> (out, lse)``: ``lse`` float32 ``[B, H, N]`` (``EMPTY_ROW_LSE``
      for rows that attended to nothing), or None when not ``need_lse``;
    * ``backward(q, k, v, arrays, cfg, lse, delta, do) -> (dq, dk, dv)`` with ``delta = rowsum(do * out)``.

    Only ``out`` and ``lse`` are saved: the backward recomputes the probabilities block by block. Keys masked by
    ``kv_valid`` get zero dK/dV here, so the backward kernels need not mask them.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
    def attention(q, k, v, arrays, cfg):
        return forward(q, k, v, arrays, cfg, False)[0]

    def attention_fwd(q, k, v, arrays, cfg):
        out, lse = forward(q, k, v, arrays, cfg, True)
        return out, (q, k, v, arrays, out, lse)

    def attention_bwd(cfg, residuals, do):
        q, k, v, arrays, out, lse = residuals
        delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
        dq, dk, dv = backward(q, k, v, arrays, cfg, lse, delta, do)
        valid = key_valid(arrays)
        if valid is not None:
            dk = jnp.where(valid[:, None], dk, jnp.zeros((), dk.dtype))
            dv = jnp.where(valid[:, None], dv, jnp.zeros((), dv.dtype))
        return dq, dk, dv, None

    attention.defvjp(attention_fwd, attention_bwd)
    return attention
