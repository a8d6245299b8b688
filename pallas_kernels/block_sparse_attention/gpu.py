"""Triton kernels (``jax.experimental.pallas.triton``) for block-sparse flash attention, forward and backward.

GPU programs run in parallel and cannot accumulate across grid steps, so each program owns one output block and
loops over its list inside the kernel: a ``lax.fori_loop`` with the dynamic trip count ``counts[m, i]`` (the real
skip), slicing the visited K/V blocks out of the head's whole K/V with ``pl.ds(kv_id * block_kv, block_kv)``. The
table is an ordinary input; a program reads its list one scalar at a time.

* **forward**: grid ``(B, H, nq)``; online softmax in registers; writes the output and the row log-sum-exp.
* **dQ**: grid ``(B, H, nq)`` over the same table, recomputing ``P = exp(S - lse)``.
* **dK/dV**: grid ``(B, H, nk)`` over the transposed table, in the key-major orientation ``S^T = K Q^T``. Keys masked
  by ``kv_valid`` are zeroed by the caller.

Triton needs power-of-two sizes of at least 16 for ``block_q``, ``block_kv`` and the head dims when compiled
(checked by the caller); interpret mode (the CPU) accepts any.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

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

NUM_WARPS = 4
NUM_STAGES = 2


def _params() -> plt.CompilerParams:
    return plt.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def _table_specs(shared: bool, width: int):
    """BlockSpecs of one program's list ``[width]`` and count ``[1]`` for grids ``(b, h, row)``."""
    ids_index = (lambda bi, hi, r: (0, r, 0)) if shared else (lambda bi, hi, r: (hi, r, 0))
    count_index = (lambda bi, hi, r: (0, r)) if shared else (lambda bi, hi, r: (hi, r))
    return pl.BlockSpec((None, None, width), ids_index), pl.BlockSpec((None, 1), count_index)


# ================================================================================================== forward
def _fwd_kernel(q_ref, k_ref, v_ref, ids_ref, count_ref, *refs, scale: float, block_kv: int, has_bias: bool,
                need_lse: bool, with_visits: bool):
    refs = list(refs)
    bias_ref = refs.pop(0) if has_bias else None
    o_ref = refs.pop(0)
    lse_ref = refs.pop(0) if need_lse else None
    visits_ref = refs.pop(0) if with_visits else None
    q = q_ref[...]  # [bq, D]
    rows = q.shape[0]

    def step(j, carry):
        m_prev, l_prev, acc_prev, visited = carry
        start = pl.multiple_of(ids_ref[j] * block_kv, block_kv)
        k = k_ref[pl.ds(start, block_kv), :]
        s = lax.dot_general(q, k.astype(q.dtype), NT, precision=dot_precision(q.dtype),
                            preferred_element_type=jnp.float32) * scale  # [bq, bk]
        if has_bias:
            s = s + bias_ref[pl.ds(start, block_kv)][None, :]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        alpha = jnp.exp(m_prev - m_next)
        p = jnp.exp(s - m_next[:, None])
        v = v_ref[pl.ds(start, block_kv), :]
        pv = lax.dot_general(p.astype(v.dtype), v, NN, precision=dot_precision(v.dtype),
                             preferred_element_type=jnp.float32)
        return m_next, alpha * l_prev + jnp.sum(p, axis=1), alpha[:, None] * acc_prev + pv, visited + 1

    init = (jnp.full((rows,), NEG, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, o_ref.shape[-1]), jnp.float32), jnp.zeros((), jnp.int32))
    m, total, acc, visited = lax.fori_loop(0, count_ref[0], step, init)
    seen = m > 0.5 * NEG  # False: the row attended to nothing (count 0 or every key padding)
    safe_total = jnp.where(seen, total, 1.0)
    o_ref[...] = jnp.where(seen[:, None], acc / safe_total[:, None], 0.0).astype(o_ref.dtype)
    if need_lse:
        lse_ref[...] = jnp.where(seen, m + jnp.log(safe_total), EMPTY_ROW_LSE)
    if with_visits:
        visits_ref[...] = jnp.full(visits_ref.shape, visited, jnp.int32)


def _forward(q, k, v, arrays: TableArrays, cfg: KernelConfig, need_lse: bool, with_visits: bool = False):
    b, h, n, d = q.shape
    dv = v.shape[-1]
    bq, bk = cfg.block_q, cfg.block_kv
    m_count, nq, _ = arrays.kv_ids.shape
    has_bias = arrays.key_bias is not None
    ids = arrays.kv_ids
    ids_spec, count_spec = _table_specs(m_count == 1, ids.shape[-1])
    row_index = lambda bi, hi, i: (bi, hi, i, 0)
    head_index = lambda bi, hi, i: (bi, hi, 0, 0)
    in_specs = [pl.BlockSpec((None, None, bq, d), row_index),
                pl.BlockSpec((None, None, n, d), head_index),
                pl.BlockSpec((None, None, n, dv), head_index),
                ids_spec, count_spec]
    inputs = [q, k, v, ids, arrays.counts]
    if has_bias:
        in_specs.append(pl.BlockSpec((n,), lambda bi, hi, i: (0,)))
        inputs.append(arrays.key_bias)
    out_specs = [pl.BlockSpec((None, None, bq, dv), row_index)]
    out_shape = [jax.ShapeDtypeStruct((b, h, n, dv), q.dtype)]
    if need_lse:
        out_specs.append(pl.BlockSpec((None, None, bq), lambda bi, hi, i: (bi, hi, i)))
        out_shape.append(jax.ShapeDtypeStruct((b, h, n), jnp.float32))
    if with_visits:
        out_specs.append(pl.BlockSpec((None, None, 1), lambda bi, hi, i: (bi, hi, i)))
        out_shape.append(jax.ShapeDtypeStruct((b, h, nq), jnp.int32))
    kernel = functools.partial(_fwd_kernel, scale=cfg.sm_scale, block_kv=bk, has_bias=has_bias,
                               need_lse=need_lse, with_visits=with_visits)
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(b, h, nq),
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=_params(),
        interpret=cfg.interpret,
        name="block_sparse_attention_fwd_gpu",
    )(*inputs)
    return outs[0], (outs[1] if need_lse else None), (outs[-1] if with_visits else None)


# ================================================================================================= backward
def _dq_kernel(q_ref, k_ref, v_ref, ids_ref, count_ref, *refs, scale: float, block_kv: int, has_bias: bool):
    refs = list(refs)
    bias_ref = refs.pop(0) if has_bias else None
    do_ref, lse_ref, delta_ref, dq_ref = refs
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]

    def step(j, dq):
        start = pl.multiple_of(ids_ref[j] * block_kv, block_kv)
        k = k_ref[pl.ds(start, block_kv), :]
        v = v_ref[pl.ds(start, block_kv), :]
        s = lax.dot_general(q, k.astype(q.dtype), NT, precision=dot_precision(q.dtype),
                            preferred_element_type=jnp.float32) * scale
        if has_bias:
            s = s + bias_ref[pl.ds(start, block_kv)][None, :]
        p = jnp.exp(s - lse)
        dp = lax.dot_general(do.astype(v.dtype), v, NT, precision=dot_precision(v.dtype),
                             preferred_element_type=jnp.float32)
        ds = p * (dp - delta)
        return dq + lax.dot_general(ds.astype(k.dtype), k, NN, precision=dot_precision(k.dtype),
                                    preferred_element_type=jnp.float32)

    dq = lax.fori_loop(0, count_ref[0], step, jnp.zeros(dq_ref.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref, ids_ref, count_ref, dk_ref, dv_ref, *,
                scale: float, block_q: int):
    k, v = k_ref[...], v_ref[...]

    def step(j, carry):
        dk, dv = carry
        start = pl.multiple_of(ids_ref[j] * block_q, block_q)
        q = q_ref[pl.ds(start, block_q), :]
        do = do_ref[pl.ds(start, block_q), :]
        lse = lse_ref[pl.ds(start, block_q)][None, :]
        delta = delta_ref[pl.ds(start, block_q)][None, :]
        st = lax.dot_general(k.astype(q.dtype), q, NT, precision=dot_precision(q.dtype),
                             preferred_element_type=jnp.float32) * scale  # [bk, bq]
        pt = jnp.exp(st - lse)
        dv = dv + lax.dot_general(pt.astype(do.dtype), do, NN, precision=dot_precision(do.dtype),
                                  preferred_element_type=jnp.float32)
        dpt = lax.dot_general(v, do.astype(v.dtype), NT, precision=dot_precision(v.dtype),
                              preferred_element_type=jnp.float32)
        dst = pt * (dpt - delta)
        dk = dk + lax.dot_general(dst.astype(q.dtype), q, NN, precision=dot_precision(q.dtype),
                                  preferred_element_type=jnp.float32)
        return dk, dv

    init = (jnp.zeros(dk_ref.shape, jnp.float32), jnp.zeros(dv_ref.shape, jnp.float32))
    dk, dv = lax.fori_loop(0, count_ref[0], step, init)
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(q, k, v, arrays: TableArrays, cfg: KernelConfig, lse, delta, do):
    b, h, n, d = q.shape
    dv = v.shape[-1]
    bq, bk = cfg.block_q, cfg.block_kv
    m_count, nq, _ = arrays.kv_ids.shape
    nk = arrays.q_ids.shape[1]
    shared = m_count == 1
    has_bias = arrays.key_bias is not None
    row_index = lambda bi, hi, i: (bi, hi, i, 0)
    head_index = lambda bi, hi, i: (bi, hi, 0, 0)
    vec_index = lambda bi, hi, i: (bi, hi, i)
    head_vec_index = lambda bi, hi, i: (bi, hi, 0)

    ids = arrays.kv_ids
    ids_spec, count_spec = _table_specs(shared, ids.shape[-1])
    in_specs = [pl.BlockSpec((None, None, bq, d), row_index),
                pl.BlockSpec((None, None, n, d), head_index),
                pl.BlockSpec((None, None, n, dv), head_index),
                ids_spec, count_spec]
    inputs = [q, k, v, ids, arrays.counts]
    if has_bias:
        in_specs.append(pl.BlockSpec((n,), lambda bi, hi, i: (0,)))
        inputs.append(arrays.key_bias)
    in_specs += [pl.BlockSpec((None, None, bq, dv), row_index),
                 pl.BlockSpec((None, None, bq), vec_index),
                 pl.BlockSpec((None, None, bq), vec_index)]
    inputs += [do, lse, delta]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=cfg.sm_scale, block_kv=bk, has_bias=has_bias),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(b, h, nq),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, bq, d), row_index),
        compiler_params=_params(),
        interpret=cfg.interpret,
        name="block_sparse_attention_dq_gpu",
    )(*inputs)

    q_ids = arrays.q_ids
    ids_spec, count_spec = _table_specs(shared, q_ids.shape[-1])
    dk, dv_out = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=cfg.sm_scale, block_q=bq),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        grid=(b, h, nk),
        in_specs=[pl.BlockSpec((None, None, bk, d), row_index),
                  pl.BlockSpec((None, None, bk, dv), row_index),
                  pl.BlockSpec((None, None, n, d), head_index),
                  pl.BlockSpec((None, None, n, dv), head_index),
                  pl.BlockSpec((None, None, n), head_vec_index),
                  pl.BlockSpec((None, None, n), head_vec_index),
                  ids_spec, count_spec],
        out_specs=[pl.BlockSpec((None, None, bk, d), row_index),
                   pl.BlockSpec((None, None, bk, dv), row_index)],
        compiler_params=_params(),
        interpret=cfg.interpret,
        name="block_sparse_attention_dkv_gpu",
    )(k, v, q, do, lse, delta, q_ids, arrays.q_counts)
    return dq, dk, dv_out


def _forward_lse(q, k, v, arrays, cfg, need_lse):
    out, lse, _ = _forward(q, k, v, arrays, cfg, need_lse)
    return out, lse


block_sparse_attention_pallas_gpu = flash_attention_vjp(_forward_lse, _backward)
"""``(q, k, v, arrays: TableArrays, cfg: KernelConfig) -> out``: the Triton kernels with their custom VJP."""


def block_sparse_attention_pallas_gpu_visits(q, k, v, arrays: TableArrays, cfg: KernelConfig):
    """Forward only: ``(out, visits)`` with ``visits`` int32 ``[B, H, nq]`` the KV blocks each program processed
    (counted inside the loop body)."""
    out, _, visits = _forward(q, k, v, arrays, cfg, False, with_visits=True)
    return out, visits
