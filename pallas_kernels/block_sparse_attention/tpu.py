"""Mosaic TPU kernels for block-sparse flash attention, forward and backward, driven by scalar-prefetched tables.

The TPU runs a kernel's grid sequentially per core, so each kernel accumulates over the innermost grid axis in VMEM
scratch, and the table decides which block every step fetches:

* **forward**: grid ``(B, H, nq, max_kv)``. ``kv_ids``/``counts`` are scalar-prefetched into SMEM (flattened to 1-D);
  the K/V BlockSpec index maps read ``kv_ids[m, i, j]`` (``m`` = the head's mask), and since the tail of each list
  repeats its last valid id, the steps past ``counts[m, i]`` ask for the block already in VMEM and the pipeline
  issues no DMA. The body runs under ``pl.when(j < counts[m, i])``: online softmax (running max ``m``, normaliser
  ``l``, both replicated over 128 lanes, and the float32 accumulator), written out at the last ``j`` together with
  the row log-sum-exp. Key padding is an additive bias block (``[1, N]`` float32, 0 or ``NEG``).
* **dQ**: the same grid and table; recomputes ``P = exp(S - lse)`` per visited block and accumulates
  ``dS @ K`` with ``dS = P * (dO V^T - delta)``.
* **dK/dV**: grid ``(B, H, nk, max_q)`` over the transposed table (for each KV block, the query blocks that visit
  it); accumulates ``P^T dO`` and ``dS^T Q`` in the key-major orientation ``S^T = K Q^T``, so ``lse`` and ``delta``
  enter as ``[1, bq]`` rows. Keys masked by ``kv_valid`` are zeroed by the caller.

Block rules when compiled: ``block_q`` and ``block_kv`` must be multiples of 128 (or the whole sequence): the
log-sum-exp and bias blocks put them on the lane axis. Interpret mode (the CPU) accepts any divisor.

The tables live in SMEM, whose size bounds ``M * nq * max_kv`` (splash attention has the same limit). When
differentiating, the forward also writes the log-sum-exp replicated over 128 lanes (``[B, H, N, 128]`` float32,
as splash attention does), sliced to ``[B, H, N]`` for the backward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.block_sparse_attention.common import (
    EMPTY_ROW_LSE,
    NEG,
    NN,
    NT,
    KernelConfig,
    TableArrays,
    dot_precision,
    flash_attention_vjp,
)

LANES = 128
_SUBLANES = 8


def check_tpu_blocks(block_q: int, block_kv: int, seq_len: int) -> None:
    """Raises unless both block sizes are multiples of 128 or the whole sequence (the compiled kernel's tiling)."""
    for name, block in (("block_q", block_q), ("block_kv", block_kv)):
        if block % LANES and block != seq_len:
            raise ValueError(f"{name}: the compiled TPU kernel needs a multiple of {LANES} or the sequence length "
                             f"{seq_len}, got {block} (interpret mode accepts any block)")


def _semantics(n: int) -> pltpu.CompilerParams:
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * (n - 1) + ("arbitrary",))


def _row(m, i, n_rows: int):
    return m * n_rows + i


# ================================================================================================== forward
def _fwd_kernel(kv_ids_ref, counts_ref, q_ref, k_ref, v_ref, *refs, scale: float, nq: int, shared: bool,
                has_bias: bool, need_lse: bool, with_visits: bool):
    refs = list(refs)
    bias_ref = refs.pop(0) if has_bias else None
    o_ref = refs.pop(0)
    lse_ref = refs.pop(0) if need_lse else None
    visits_ref = refs.pop(0) if with_visits else None
    m_scr, l_scr, acc_scr = refs
    h, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    count = counts_ref[_row(0 if shared else h, i, nq)]

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, NEG, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)
        if with_visits:
            visits_ref[...] = jnp.zeros(visits_ref.shape, jnp.int32)

    @pl.when(j < count)
    def _step():
        q = q_ref[...]
        precision = dot_precision(q.dtype)
        s = lax.dot_general(q, k_ref[...].astype(q.dtype), NT, precision=precision,
                            preferred_element_type=jnp.float32) * scale  # [bq, bk]
        if has_bias:
            s = s + bias_ref[...]  # [1, bk]
        m_prev = m_scr[...]  # [bq, lanes], every lane equal
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_next)
        p = jnp.exp(s - m_next[:, :1])
        l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
        v = v_ref[...]
        pv = lax.dot_general(p.astype(v.dtype), v, NN, precision=dot_precision(v.dtype),
                             preferred_element_type=jnp.float32)
        acc_scr[...] = alpha[:, :1] * acc_scr[...] + pv
        m_scr[...] = m_next
        if with_visits:
            visits_ref[...] += 1

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        m = m_scr[...]
        total = l_scr[...]
        seen = m > 0.5 * NEG  # False: the row attended to nothing (count 0 or every key padding)
        safe_total = jnp.where(seen, total, 1.0)
        o_ref[...] = jnp.where(seen[:, :1], acc_scr[...] / safe_total[:, :1], 0.0).astype(o_ref.dtype)
        if need_lse:
            lse_ref[...] = jnp.where(seen, m + jnp.log(safe_total), EMPTY_ROW_LSE)


def _forward(q, k, v, arrays: TableArrays, cfg: KernelConfig, need_lse: bool, with_visits: bool = False):
    b, h, n, d = q.shape
    dv = v.shape[-1]
    bq, bk = cfg.block_q, cfg.block_kv
    m_count, nq, max_kv = arrays.kv_ids.shape
    shared = m_count == 1
    has_bias = arrays.key_bias is not None

    def kv_index(bi, hi, i, j, kv_ids_ref, counts_ref):
        return bi, hi, kv_ids_ref[_row(0 if shared else hi, i, nq) * max_kv + j], 0

    def bias_index(bi, hi, i, j, kv_ids_ref, counts_ref):
        return 0, kv_index(bi, hi, i, j, kv_ids_ref, counts_ref)[2]

    row_index = lambda bi, hi, i, j, *_: (bi, hi, i, 0)
    in_specs = [pl.BlockSpec((None, None, bq, d), row_index),
                pl.BlockSpec((None, None, bk, d), kv_index),
                pl.BlockSpec((None, None, bk, dv), kv_index)]
    inputs = [q, k, v]
    if has_bias:
        in_specs.append(pl.BlockSpec((1, bk), bias_index))
        inputs.append(arrays.key_bias.reshape(1, n))
    out_specs = [pl.BlockSpec((None, None, bq, dv), row_index)]
    out_shape = [jax.ShapeDtypeStruct((b, h, n, dv), q.dtype)]
    if need_lse:
        out_specs.append(pl.BlockSpec((None, None, bq, LANES), row_index))
        out_shape.append(jax.ShapeDtypeStruct((b, h, n, LANES), jnp.float32))
    if with_visits:
        out_specs.append(pl.BlockSpec((None, None, None, _SUBLANES, LANES), lambda bi, hi, i, j, *_: (bi, hi, i, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((b, h, nq, _SUBLANES, LANES), jnp.int32))
    kernel = functools.partial(_fwd_kernel, scale=cfg.sm_scale, nq=nq, shared=shared, has_bias=has_bias,
                               need_lse=need_lse, with_visits=with_visits)
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, h, nq, max_kv),
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                            pltpu.VMEM((bq, dv), jnp.float32)],
        ),
        compiler_params=_semantics(4),
        interpret=cfg.interpret,
        name="block_sparse_attention_fwd_tpu",
    )(arrays.kv_ids.reshape(-1), arrays.counts.reshape(-1), *inputs)
    out = outs[0]
    lse = outs[1][..., 0] if need_lse else None
    visits = outs[-1][..., 0, 0] if with_visits else None
    return out, lse, visits


# ================================================================================================= backward
def _dq_kernel(kv_ids_ref, counts_ref, q_ref, k_ref, v_ref, *refs, scale: float, nq: int, shared: bool,
               has_bias: bool):
    refs = list(refs)
    bias_ref = refs.pop(0) if has_bias else None
    do_ref, lse_ref, delta_ref, dq_ref, dq_scr = refs
    h, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    count = counts_ref[_row(0 if shared else h, i, nq)]

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    @pl.when(j < count)
    def _step():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s = lax.dot_general(q, k.astype(q.dtype), NT, precision=dot_precision(q.dtype),
                            preferred_element_type=jnp.float32) * scale
        if has_bias:
            s = s + bias_ref[...]
        p = jnp.exp(s - jnp.expand_dims(lse_ref[0], -1))  # [bq, bk]
        dp = lax.dot_general(do.astype(v.dtype), v, NT, precision=dot_precision(v.dtype),
                             preferred_element_type=jnp.float32)
        ds = p * (dp - jnp.expand_dims(delta_ref[0], -1))
        dq_scr[...] += lax.dot_general(ds.astype(k.dtype), k, NN, precision=dot_precision(k.dtype),
                                       preferred_element_type=jnp.float32)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_scr[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ids_ref, q_counts_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_scr,
                dv_scr, *, scale: float, nk: int, shared: bool):
    h, t, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    count = q_counts_ref[_row(0 if shared else h, t, nk)]

    @pl.when(j == 0)
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    @pl.when(j < count)
    def _step():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        st = lax.dot_general(k.astype(q.dtype), q, NT, precision=dot_precision(q.dtype),
                             preferred_element_type=jnp.float32) * scale  # [bk, bq]
        pt = jnp.exp(st - lse_ref[...])  # lse row [1, bq]
        dv_scr[...] += lax.dot_general(pt.astype(do.dtype), do, NN, precision=dot_precision(do.dtype),
                                       preferred_element_type=jnp.float32)
        dpt = lax.dot_general(v, do.astype(v.dtype), NT, precision=dot_precision(v.dtype),
                              preferred_element_type=jnp.float32)
        dst = pt * (dpt - delta_ref[...])
        dk_scr[...] += lax.dot_general(dst.astype(q.dtype), q, NN, precision=dot_precision(q.dtype),
                                       preferred_element_type=jnp.float32)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _backward(q, k, v, arrays: TableArrays, cfg: KernelConfig, lse, delta, do):
    b, h, n, d = q.shape
    dv = v.shape[-1]
    bq, bk = cfg.block_q, cfg.block_kv
    m_count, nq, max_kv = arrays.kv_ids.shape
    _, nk, max_q = arrays.q_ids.shape
    shared = m_count == 1
    has_bias = arrays.key_bias is not None
    lse_rows = lse.reshape(b, h, 1, n)
    delta_rows = delta.reshape(b, h, 1, n)

    # dQ: query-major, over the table
    def kv_index(bi, hi, i, j, kv_ids_ref, counts_ref):
        return bi, hi, kv_ids_ref[_row(0 if shared else hi, i, nq) * max_kv + j], 0

    def bias_index(bi, hi, i, j, kv_ids_ref, counts_ref):
        return 0, kv_index(bi, hi, i, j, kv_ids_ref, counts_ref)[2]

    row_index = lambda bi, hi, i, j, *_: (bi, hi, i, 0)
    lse_index = lambda bi, hi, i, j, *_: (bi, hi, 0, i)
    in_specs = [pl.BlockSpec((None, None, bq, d), row_index),
                pl.BlockSpec((None, None, bk, d), kv_index),
                pl.BlockSpec((None, None, bk, dv), kv_index)]
    inputs = [q, k, v]
    if has_bias:
        in_specs.append(pl.BlockSpec((1, bk), bias_index))
        inputs.append(arrays.key_bias.reshape(1, n))
    in_specs += [pl.BlockSpec((None, None, bq, dv), row_index),
                 pl.BlockSpec((None, None, 1, bq), lse_index),
                 pl.BlockSpec((None, None, 1, bq), lse_index)]
    inputs += [do, lse_rows, delta_rows]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=cfg.sm_scale, nq=nq, shared=shared, has_bias=has_bias),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, h, nq, max_kv),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((None, None, bq, d), row_index),
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        ),
        compiler_params=_semantics(4),
        interpret=cfg.interpret,
        name="block_sparse_attention_dq_tpu",
    )(arrays.kv_ids.reshape(-1), arrays.counts.reshape(-1), *inputs)

    # dK/dV: key-major, over the transposed table
    def q_block(hi, t, j, q_ids_ref):
        return q_ids_ref[_row(0 if shared else hi, t, nk) * max_q + j]

    q_index = lambda bi, hi, t, j, q_ids_ref, q_counts_ref: (bi, hi, q_block(hi, t, j, q_ids_ref), 0)
    lse_t_index = lambda bi, hi, t, j, q_ids_ref, q_counts_ref: (bi, hi, 0, q_block(hi, t, j, q_ids_ref))
    kv_row_index = lambda bi, hi, t, j, *_: (bi, hi, t, 0)
    dk, dv_out = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=cfg.sm_scale, nk=nk, shared=shared),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, h, nk, max_q),
            in_specs=[pl.BlockSpec((None, None, bq, d), q_index),
                      pl.BlockSpec((None, None, bk, d), kv_row_index),
                      pl.BlockSpec((None, None, bk, dv), kv_row_index),
                      pl.BlockSpec((None, None, bq, dv), q_index),
                      pl.BlockSpec((None, None, 1, bq), lse_t_index),
                      pl.BlockSpec((None, None, 1, bq), lse_t_index)],
            out_specs=[pl.BlockSpec((None, None, bk, d), kv_row_index),
                       pl.BlockSpec((None, None, bk, dv), kv_row_index)],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, dv), jnp.float32)],
        ),
        compiler_params=_semantics(4),
        interpret=cfg.interpret,
        name="block_sparse_attention_dkv_tpu",
    )(arrays.q_ids.reshape(-1), arrays.q_counts.reshape(-1), q, k, v, do, lse_rows, delta_rows)
    return dq, dk, dv_out


def _forward_lse(q, k, v, arrays, cfg, need_lse):
    out, lse, _ = _forward(q, k, v, arrays, cfg, need_lse)
    return out, lse


block_sparse_attention_pallas_tpu = flash_attention_vjp(_forward_lse, _backward)
"""``(q, k, v, arrays: TableArrays, cfg: KernelConfig) -> out``: the TPU kernels with their custom VJP."""


def block_sparse_attention_pallas_tpu_visits(q, k, v, arrays: TableArrays, cfg: KernelConfig):
    """Forward only: ``(out, visits)`` with ``visits`` int32 ``[B, H, nq]`` the KV blocks each program processed
    (counted inside the ``pl.when`` body)."""
    out, _, visits = _forward(q, k, v, arrays, cfg, False, with_visits=True)
    return out, visits
