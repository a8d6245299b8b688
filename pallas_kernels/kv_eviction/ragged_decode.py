"""Ragged decode attention: one query token per sequence over a cache whose rows hold different numbers of entries.

Layout: q ``[B, Hq, Dk]`` (RoPE applied, one decode token per sequence), k ``[B, Hkv, S, Dk]``, v ``[B, Hkv, S,
Dv]``, pos ``[B, Hkv, S]`` int32 (-1 = empty), length ``[B, Hkv]`` int32 (occupied slots are ``[0, length)``),
q_pos ``[B]`` int32. Grouped-query attention: Hq = Hkv * G and query head ``h`` reads KV head ``h // G``, as in
``jaxeff.attention.dense``. A slot is attended iff ``slot < length``, ``0 <= pos <= q_pos`` and, with a sliding
window, ``q_pos - pos < sliding_window`` (``reference.decode_mask``); a query with no such slot gives zeros.
``ragged_decode_attention_reference`` is the specification.

After eviction the rows are short and ragged, so the cost should follow each row's ``length``, not the capacity
``S``. Every implementation processes the ``G`` query heads of a KV head together (each K/V block is read once per
KV head) with float32 softmax statistics; the kernels keep them online (running max ``m``, normaliser ``l``,
accumulator ``acc``), flash-decoding style:

* ``xla`` (the CPU path): masked attention over the static prefix ``[:kv_bound]`` of the slots. ``kv_bound`` is a
  static bound on the longest row (``bucketed_kv_bound`` rounds it up to a bucket, so only a few programs are
  compiled); with a compacted cache at keep ratio ``r`` the caller passes about ``r * S`` and the cost drops about
  ``r``-fold. XLA materialises the prefix slices as temporaries: for caches of many MB, glibc may map and fault in
  those pages on every call (measured: 4x slower at 16 MB); ``MALLOC_MMAP_THRESHOLD_`` above that size avoids it.
* ``pallas_tpu`` (Mosaic, flash-decoding over a sequential grid): grid ``(B, Hkv, ceil(kv_bound / block_size))``,
  ``length`` and ``q_pos`` scalar-prefetched into SMEM. The K/V/pos index maps clamp the block index to the row's
  last occupied block, so the steps past it fetch nothing new (the pipeline skips a DMA whose block index does not
  change), and the body runs under ``pl.when(j < blocks in the row)``. ``m``/``l``/``acc`` live in VMEM scratch
  (``m`` and ``l`` replicated over 128 lanes), reset at the first step and written out at the last.
* ``pallas_gpu`` (Triton): grid ``(B, Hkv)``, one program per row, an in-kernel ``lax.fori_loop`` over exactly the
  row's occupied blocks (a dynamic trip count: the real skip, since GPU programs cannot accumulate across grid
  steps). The ``G`` query heads are zero-padded to at least 16 rows for Triton's matmul.

Skipping is by ``length`` only: the sliding window is applied as a mask, because a row's slots need not be ordered
by position.

Constraints. ``block_size`` must divide ``S`` (the cache is not padded: that would copy it). Real TPUs need
``block_size % 128 == 0`` (or ``== S``): the pos block is ``[1, block_size]``. Real GPUs (Triton) need
``block_size``, ``Dk`` and ``Dv`` to be powers of two >= 16. Interpret mode (the CPU) checks none of these
hardware rules, and the wrapper checks them only when not interpreting. Slots at or past ``kv_bound`` are ignored
by every implementation, so a bound below the longest row truncates it: the caller guarantees ``kv_bound >=
max(length)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plt

from pallas_kernels.kv_eviction.dispatch import (
    Interpret,
    check_block_size,
    check_triton_sizes,
    default_block_size,
    resolve_impl,
    resolve_interpret,
)
from pallas_kernels.kv_eviction.reference import decode_mask, ragged_decode_attention_reference

_NEG = -1e30  # finite "minus infinity": exp(_NEG - _NEG) stays 1, not NaN, for rows with nothing allowed yet
_LANES = 128
_TPU_BLOCK = 512
_GPU_BLOCK = 64
_MIN_TRITON_ROWS = 16
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


def bucketed_kv_bound(max_length: int, capacity: int, bucket: int = 64) -> int:
    """A static ``kv_bound`` for the XLA path: ``max_length`` rounded up to a multiple of ``bucket`` (at least one
    bucket), capped at ``capacity``. Computed on the host from the cache lengths, it keeps the number of compiled
    decode programs small."""
    if bucket <= 0:
        raise ValueError(f"bucket: expected a positive int, got {bucket}")
    if capacity <= 0:
        raise ValueError(f"capacity: expected a positive int, got {capacity}")
    return min(capacity, max(bucket, -(-max_length // bucket) * bucket))


def _dot_precision(dtype) -> lax.Precision | None:
    # float32 inputs get true float32 matmuls (not TF32 on GPU, not one bf16 pass on TPU)
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _allowed(
    slot: jax.Array, slot_pos: jax.Array, length: jax.Array, q_pos: jax.Array, sliding_window: int | None
) -> jax.Array:
    allowed = (slot < length) & (slot_pos >= 0) & (slot_pos <= q_pos)
    if sliding_window is not None:
        allowed &= q_pos - slot_pos < sliding_window
    return allowed


def ragged_decode_attention_xla(
    q: jax.Array, k: jax.Array, v: jax.Array, pos: jax.Array, length: jax.Array, q_pos: jax.Array, *,
    sliding_window: int | None = None, scale: float | None = None, kv_bound: int | None = None,
) -> jax.Array:
    """XLA path: masked attention over the slots ``[0, kv_bound)`` only (``kv_bound`` static, default ``S``)."""
    b, hq, d = q.shape
    hkv = k.shape[1]
    bound = k.shape[2] if kv_bound is None else kv_bound
    k, v, pos = k[:, :, :bound], v[:, :, :bound], pos[:, :, :bound]
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, hkv, hq // hkv, d)
    # slot-major scores [B, Hkv, S', G]: with the long slot axis as the matmul rows, XLA's CPU matmuls run about
    # 1.3x faster than with [B, Hkv, G, S'] (measured here)
    mask = decode_mask(pos, length, q_pos, sliding_window)[..., None]  # [B, Hkv, S', 1]
    logits = jnp.einsum("bhsd,bhgd->bhsg", k.astype(q.dtype), qg, preferred_element_type=jnp.float32) * scale
    # masked logits sink to _NEG, whose exp is exactly 0 next to any allowed logit; a query with no allowed slot
    # gets a meaningless uniform average, zeroed at the end (cheaper than masking the weights too)
    logits = logits + jnp.where(mask, 0.0, _NEG)
    weights = jnp.exp(logits - jnp.max(logits, axis=2, keepdims=True))
    out = jnp.einsum("bhsd,bhsg->bhgd", v.astype(q.dtype), weights.astype(q.dtype), preferred_element_type=jnp.float32)
    out = out / jnp.swapaxes(jnp.sum(weights, axis=2, keepdims=True), 2, 3)
    out = jnp.where(jnp.any(mask, axis=2, keepdims=True), out, 0.0)
    return out.reshape(b, hq, v.shape[-1]).astype(q.dtype)


def kv_index_map(
    b: jax.Array, h: jax.Array, j: jax.Array, length_ref, q_pos_ref, *, num_kv_heads: int, block_size: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The TPU kernel's K/V BlockSpec index map: grid step ``(b, h, j)`` fetches block ``j`` of row ``(b, h)``,
    clamped to the row's last occupied block (block 0 for an empty row). Every step past the occupied blocks
    repeats the previous block index, so the pipeline issues no new DMA for it. ``length_ref`` is the flattened
    ``[B * Hkv]`` prefetched lengths; ``q_pos_ref`` (the other prefetched array) is unused."""
    del q_pos_ref
    length = length_ref[b * num_kv_heads + h]
    last = jnp.maximum((length + block_size - 1) // block_size - 1, 0)
    return b, h, jnp.minimum(j, last), 0


def _tpu_kernel(
    length_ref, q_pos_ref, q_ref, k_ref, v_ref, pos_ref, o_ref, m_scr, l_scr, acc_scr, *, block_size: int,
    num_kv_heads: int, scale: float, sliding_window: int | None,
) -> None:
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length = length_ref[b * num_kv_heads + h]
    q_pos = q_pos_ref[b]

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, _NEG, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(j * block_size < length)
    def _step():
        q = q_ref[...]  # [G, Dk]
        precision = _dot_precision(q.dtype)
        logits = lax.dot_general(
            q, k_ref[...].astype(q.dtype), _NT, precision=precision, preferred_element_type=jnp.float32
        ) * scale  # [G, block]
        slot = j * block_size + lax.broadcasted_iota(jnp.int32, (1, block_size), 1)
        allowed = _allowed(slot, pos_ref[...], length, q_pos, sliding_window)  # [1, block]
        logits = jnp.where(allowed, logits, _NEG)
        m_prev = m_scr[...]  # [G, lanes], every lane equal
        m_next = jnp.maximum(m_prev, jnp.max(logits, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_next)
        weights = jnp.where(allowed, jnp.exp(logits - m_next[:, :1]), 0.0)
        l_scr[...] = alpha * l_scr[...] + jnp.sum(weights, axis=1, keepdims=True)
        pv = lax.dot_general(
            weights.astype(q.dtype), v_ref[...].astype(q.dtype), _NN, precision=precision,
            preferred_element_type=jnp.float32,
        )
        acc_scr[...] = alpha[:, :1] * acc_scr[...] + pv
        m_scr[...] = m_next

    @pl.when(j == pl.num_programs(2) - 1)
    def _finish():
        total = l_scr[...][:, :1]
        out = acc_scr[...] / jnp.where(total > 0, total, 1.0)
        o_ref[...] = jnp.where(total > 0, out, 0.0).astype(o_ref.dtype)


def ragged_decode_attention_pallas_tpu(
    q: jax.Array, k: jax.Array, v: jax.Array, pos: jax.Array, length: jax.Array, q_pos: jax.Array, *,
    sliding_window: int | None, scale: float, block_size: int, kv_bound: int, interpret: Interpret,
) -> jax.Array:
    """Mosaic TPU kernel (see the module docstring); ``length`` must already be capped at ``kv_bound``."""
    b, hq, d = q.shape
    _, hkv, s, dv = v.shape
    g = hq // hkv
    kernel = functools.partial(
        _tpu_kernel, block_size=block_size, num_kv_heads=hkv, scale=scale, sliding_window=sliding_window
    )

    kv_index = functools.partial(kv_index_map, num_kv_heads=hkv, block_size=block_size)

    def pos_index(bi, hi, ji, length_ref, q_pos_ref):  # pos is [B, Hkv, 1, S]: the same block on the last axis
        bi, hi, block, _ = kv_index(bi, hi, ji, length_ref, q_pos_ref)
        return bi, hi, 0, block

    row_index = lambda bi, hi, ji, length_ref, q_pos_ref: (bi, hi, 0, 0)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, hkv, pl.cdiv(kv_bound, block_size)),
        in_specs=[
            pl.BlockSpec((None, None, g, d), row_index),
            pl.BlockSpec((None, None, block_size, d), kv_index),
            pl.BlockSpec((None, None, block_size, dv), kv_index),
            pl.BlockSpec((None, None, 1, block_size), pos_index),
        ],
        out_specs=pl.BlockSpec((None, None, g, dv), row_index),
        scratch_shapes=[
            pltpu.VMEM((g, _LANES), jnp.float32),
            pltpu.VMEM((g, _LANES), jnp.float32),
            pltpu.VMEM((g, dv), jnp.float32),
        ],
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((b, hkv, g, dv), q.dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="ragged_decode_attention_tpu",
    )(length.reshape(-1), q_pos, q.reshape(b, hkv, g, d), k, v, pos.reshape(b, hkv, 1, s))
    return out.reshape(b, hq, dv)


def _gpu_kernel(
    q_ref, k_ref, v_ref, pos_ref, length_ref, q_pos_ref, o_ref, *, block_size: int, scale: float,
    sliding_window: int | None,
) -> None:
    length = length_ref[0]
    q_pos = q_pos_ref[0]
    q = q_ref[...]  # [Gp, Dk]
    precision = _dot_precision(q.dtype)
    rows = q.shape[0]

    def block(j, carry):
        m_prev, l_prev, acc_prev = carry
        start = pl.multiple_of(j * block_size, block_size)
        logits = lax.dot_general(
            q, k_ref[pl.ds(start, block_size), :].astype(q.dtype), _NT, precision=precision,
            preferred_element_type=jnp.float32,
        ) * scale  # [Gp, block]
        slot = start + lax.broadcasted_iota(jnp.int32, (block_size,), 0)
        allowed = _allowed(slot, pos_ref[pl.ds(start, block_size)], length, q_pos, sliding_window)[None, :]
        logits = jnp.where(allowed, logits, _NEG)
        m_next = jnp.maximum(m_prev, jnp.max(logits, axis=1))
        alpha = jnp.exp(m_prev - m_next)
        weights = jnp.where(allowed, jnp.exp(logits - m_next[:, None]), 0.0)
        pv = lax.dot_general(
            weights.astype(q.dtype), v_ref[pl.ds(start, block_size), :].astype(q.dtype), _NN,
            precision=precision, preferred_element_type=jnp.float32,
        )
        return m_next, alpha * l_prev + jnp.sum(weights, axis=1), alpha[:, None] * acc_prev + pv

    init = (
        jnp.full((rows,), _NEG, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows, o_ref.shape[-1]), jnp.float32),
    )
    num_blocks = (length + block_size - 1) // block_size
    _, total, acc = lax.fori_loop(0, num_blocks, block, init)
    total = total[:, None]
    out = acc / jnp.where(total > 0, total, 1.0)
    o_ref[...] = jnp.where(total > 0, out, 0.0).astype(o_ref.dtype)


def ragged_decode_attention_pallas_gpu(
    q: jax.Array, k: jax.Array, v: jax.Array, pos: jax.Array, length: jax.Array, q_pos: jax.Array, *,
    sliding_window: int | None, scale: float, block_size: int, interpret: bool, num_warps: int = 4,
    num_stages: int = 2,
) -> jax.Array:
    """Triton kernel (see the module docstring); ``length`` must already be capped at ``kv_bound``."""
    b, hq, d = q.shape
    _, hkv, s, dv = v.shape
    g = hq // hkv
    rows = max(_MIN_TRITON_ROWS, pl.next_power_of_2(g))
    q_rows = jnp.pad(q.reshape(b, hkv, g, d), ((0, 0), (0, 0), (0, rows - g), (0, 0)))
    kernel = functools.partial(_gpu_kernel, block_size=block_size, scale=scale, sliding_window=sliding_window)
    row_index = lambda bi, hi: (bi, hi, 0, 0)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((b, hkv, rows, dv), q.dtype),
        grid=(b, hkv),
        in_specs=[
            pl.BlockSpec((None, None, rows, d), row_index),
            pl.BlockSpec((None, None, s, d), row_index),
            pl.BlockSpec((None, None, s, dv), row_index),
            pl.BlockSpec((None, None, s), lambda bi, hi: (bi, hi, 0)),
            pl.BlockSpec((None, None, 1), lambda bi, hi: (bi, hi, 0)),
            pl.BlockSpec((None, 1), lambda bi, hi: (bi, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, rows, dv), row_index),
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="ragged_decode_attention_gpu",
    )(q_rows, k, v, pos, length[..., None], q_pos[:, None])
    return out[:, :, :g].reshape(b, hq, dv)


def _check_decode_args(
    q: jax.Array, k: jax.Array, v: jax.Array, pos: jax.Array, length: jax.Array, q_pos: jax.Array,
    sliding_window: int | None, kv_bound: int | None,
) -> None:
    if k.ndim != 4:
        raise ValueError(f"k: expected shape [B, Hkv, S, D], got {k.shape}")
    b, hkv, s, d = k.shape
    if q.ndim != 3 or q.shape[0] != b or q.shape[2] != d:
        raise ValueError(f"q: expected shape [B={b}, Hq, D={d}], got {q.shape}")
    if q.shape[1] % hkv != 0:
        raise ValueError(f"q: expected a number of heads divisible by Hkv={hkv}, got Hq={q.shape[1]}")
    if v.ndim != 4 or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v: expected shape [B, Hkv, S, Dv] with [B, Hkv, S] = {k.shape[:3]}, got {v.shape}")
    for name, arr, shape in (("pos", pos, (b, hkv, s)), ("length", length, (b, hkv)), ("q_pos", q_pos, (b,))):
        if arr.shape != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {arr.shape}")
        if not jnp.issubdtype(arr.dtype, jnp.integer):
            raise ValueError(f"{name}: expected an integer dtype, got {arr.dtype}")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window <= 0):
        raise ValueError(f"sliding_window: expected None or a positive int, got {sliding_window!r}")
    if kv_bound is not None and (not isinstance(kv_bound, int) or not 0 < kv_bound <= s):
        raise ValueError(f"kv_bound: expected None or an int in [1, S={s}], got {kv_bound!r}")


def ragged_decode_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, pos: jax.Array, length: jax.Array, q_pos: jax.Array, *,
    sliding_window: int | None = None, scale: float | None = None, block_size: int | None = None,
    kv_bound: int | None = None, impl: str = "auto", interpret: Interpret | None = None,
) -> jax.Array:
    """Decode attention over ragged cache rows; ``[B, Hq, Dv]`` in ``q.dtype``.

    q ``[B, Hq, Dk]``, k ``[B, Hkv, S, Dk]``, v ``[B, Hkv, S, Dv]``, pos ``[B, Hkv, S]``, length ``[B, Hkv]``,
    q_pos ``[B]`` (the mask is in the module docstring). scale: default ``Dk ** -0.5``.

    block_size: K/V slots per kernel block (kernels only), a divisor of S (None: the largest power of two up to
    512 on TPU, 64 on GPU, dividing S). kv_bound: static int in ``[1, S]``; slots from it on are ignored (default
    S): the XLA path attends over ``[:kv_bound]`` only and the TPU grid has ``ceil(kv_bound / block_size)`` KV steps.
    impl: "auto" (TPU kernel on TPU, Triton kernel on GPU, XLA elsewhere), "reference", "xla", "pallas_tpu" or
    "pallas_gpu". interpret: run a Pallas kernel in interpret mode (None: on the CPU; ``pltpu.InterpretParams``
    runs the TPU kernel in the TPU simulator). Raises ValueError naming the argument for bad shapes, dtypes, impl,
    interpret, window, bound or block size.
    """
    _check_decode_args(q, k, v, pos, length, q_pos, sliding_window, kv_bound)
    impl = resolve_impl(impl)
    capacity, d, dv = k.shape[2], k.shape[3], v.shape[3]
    scale = d**-0.5 if scale is None else scale
    bound = capacity if kv_bound is None else kv_bound
    length = jnp.minimum(length.astype(jnp.int32), bound)
    q_pos = q_pos.astype(jnp.int32)
    pos = pos.astype(jnp.int32)
    if impl == "reference":
        return ragged_decode_attention_reference(q, k, v, pos, length, q_pos, sliding_window=sliding_window,
                                                 scale=scale)
    if impl == "xla":
        return ragged_decode_attention_xla(
            q, k, v, pos, length, q_pos, sliding_window=sliding_window, scale=scale, kv_bound=bound
        )
    run_interpreted = resolve_interpret(interpret, impl)
    if impl == "pallas_tpu":
        block_size = default_block_size(capacity, _TPU_BLOCK) if block_size is None else block_size
        check_block_size(block_size, capacity)
        if run_interpreted is False and block_size % _LANES != 0 and block_size != capacity:
            raise ValueError(
                f"block_size: the TPU kernel needs a multiple of {_LANES} or the capacity {capacity}, got {block_size}"
            )
        return ragged_decode_attention_pallas_tpu(
            q, k, v, pos, length, q_pos, sliding_window=sliding_window, scale=scale, block_size=block_size,
            kv_bound=bound, interpret=run_interpreted,
        )
    block_size = default_block_size(capacity, _GPU_BLOCK) if block_size is None else block_size
    check_block_size(block_size, capacity)
    if run_interpreted is False:
        check_triton_sizes(block_size=block_size, **{"k head dim": d, "v head dim": dv})
    return ragged_decode_attention_pallas_gpu(
        q, k, v, pos, length, q_pos, sliding_window=sliding_window, scale=scale, block_size=block_size,
        interpret=run_interpreted,
    )
