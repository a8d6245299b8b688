"""KV-cache row compaction: the kept entries of every (sequence, KV head) row move to the front, in order.

Layout: k ``[B, Hkv, S, Dk]``, v ``[B, Hkv, S, Dv]``, pos ``[B, Hkv, S]`` int32 (-1 = empty), keep ``[B, Hkv, S]``
bool. Result ``(k, v, pos, length)``: the filled (``pos >= 0``) slots with keep True, in their original slot order,
then empty slots (pos -1, zero K/V); ``length`` ``[B, Hkv]`` int32 counts the kept entries. ``compact_reference``
(``reference.py``) is the specification.

Algorithm. ``compaction_plan`` builds, per row, the source-slot table ``src[j]`` = the slot of the ``j``-th kept
entry (an inclusive cumsum of the kept flags gives each kept slot its destination; one scatter inverts that map;
entries from ``length`` on are 0, a harmless in-bounds index). Moving the data is then a gather along the slot
axis, which is what the implementations differ in. ``pos`` and ``length`` are small and always gathered by XLA;
the kernels move the bulky K/V:

* ``xla`` (the CPU path): ``take_along_axis`` by the table.
* ``pallas_tpu`` (Mosaic): grid ``(B, Hkv, S / block_size)`` over destination blocks; the table and the lengths
  are scalar-prefetched into SMEM and K/V stay in HBM (``memory_space=pl.ANY``). Each step starts one row DMA per
  kept destination row of its block (HBM -> the output block in VMEM, all on one semaphore per tensor), waits for
  them, and zeroes the rows past ``length``; destination blocks wholly past ``length`` issue no DMA.
* ``pallas_gpu`` (Triton): the same grid; each program loads its block of the table and gathers its K/V rows
  from the row's full ``[S, D]`` block with one vectorised indexed load.

Constraints. ``block_size`` must divide ``S`` (the cache is not padded: that would copy it). On real TPUs the
output blocks ``[block_size, D]`` need ``block_size % 8 == 0`` (or ``== S``); the prefetched table holds ``B * Hkv *
S`` int32 words in SMEM, so compact one layer at a time (as an eviction hook does). On GPUs ``block_size`` and
the head dims must be powers of two (Triton tensor sizes). Interpret mode (the CPU) checks none of these hardware
rules, and ``compact`` checks them only when not interpreting. Inputs are not donated: the result is a new buffer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plt

from pallas_kernels.kv_eviction.dispatch import (
    Interpret,
    check_block_size,
    default_block_size,
    is_power_of_two,
    resolve_impl,
    resolve_interpret,
)
from pallas_kernels.kv_eviction.reference import compact_reference

_TPU_BLOCK = 256  # destination rows per grid step: more DMAs in flight per step
_GPU_BLOCK = 64


def compaction_plan(pos: jax.Array, keep: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The per-row source-slot table ``src`` ``[..., S]`` int32 and ``length`` ``[...]`` int32.

    ``src[..., j]`` is the slot of the ``j``-th kept filled entry for ``j < length`` and 0 after. O(S) per row: a
    cumsum and one scatter, no sort.
    """
    capacity = pos.shape[-1]
    kept = keep & (pos >= 0)
    dest = jnp.cumsum(kept, axis=-1, dtype=jnp.int32) - 1
    dest = jnp.where(kept, dest, capacity)  # out of range: dropped by the scatter
    slots = jnp.arange(capacity, dtype=jnp.int32)

    def invert(row_dest: jax.Array) -> jax.Array:
        return jnp.zeros((capacity,), jnp.int32).at[row_dest].set(slots, mode="drop")

    flat_dest = dest.reshape(-1, capacity)
    src = jax.vmap(invert)(flat_dest).reshape(dest.shape)
    return src, jnp.sum(kept, axis=-1, dtype=jnp.int32)


def _gather_pos(pos: jax.Array, src: jax.Array, length: jax.Array) -> jax.Array:
    live = jnp.arange(pos.shape[-1], dtype=jnp.int32) < length[..., None]
    return jnp.where(live, jnp.take_along_axis(pos, src, axis=-1), -1).astype(jnp.int32)


def compact_xla(
    k: jax.Array, v: jax.Array, pos: jax.Array, keep: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """XLA path: ``compaction_plan`` and gathers along the slot axis."""
    src, length = compaction_plan(pos, keep)
    live = (jnp.arange(pos.shape[-1], dtype=jnp.int32) < length[..., None])[..., None]
    k_out = jnp.where(live, jnp.take_along_axis(k, src[..., None], axis=2), jnp.zeros((), k.dtype))
    v_out = jnp.where(live, jnp.take_along_axis(v, src[..., None], axis=2), jnp.zeros((), v.dtype))
    return k_out, v_out, _gather_pos(pos, src, length), length


def _tpu_kernel(
    src_ref, length_ref, k_hbm, v_hbm, k_out, v_out, sems, *, capacity: int, block_size: int, num_kv_heads: int
) -> None:
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row = b * num_kv_heads + h
    num_rows = jnp.clip(length_ref[row] - j * block_size, 0, block_size)  # kept rows in this destination block
    table_base = row * capacity + j * block_size

    def row_copies(dest: jax.Array, source: jax.Array):
        return (
            pltpu.make_async_copy(k_hbm.at[b, h, pl.ds(source, 1), :], k_out.at[pl.ds(dest, 1), :], sems.at[0]),
            pltpu.make_async_copy(v_hbm.at[b, h, pl.ds(source, 1), :], v_out.at[pl.ds(dest, 1), :], sems.at[1]),
        )

    def start(i, carry):
        for copy in row_copies(i, src_ref[table_base + i]):
            copy.start()
        return carry

    def wait(i, carry):  # every copy has the same size, so any descriptor of that size waits for one of them
        for copy in row_copies(i, 0):
            copy.wait()
        return carry

    jax.lax.fori_loop(0, num_rows, start, 0)
    jax.lax.fori_loop(0, num_rows, wait, 0)
    k_live = jax.lax.broadcasted_iota(jnp.int32, k_out.shape, 0) < num_rows
    v_live = jax.lax.broadcasted_iota(jnp.int32, v_out.shape, 0) < num_rows
    k_out[...] = jnp.where(k_live, k_out[...], jnp.zeros((), k_out.dtype))
    v_out[...] = jnp.where(v_live, v_out[...], jnp.zeros((), v_out.dtype))


def compact_pallas_tpu(
    k: jax.Array, v: jax.Array, pos: jax.Array, keep: jax.Array, *, block_size: int, interpret: Interpret
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Mosaic TPU kernel: scalar-prefetched source table, one row DMA per kept entry (see the module docstring)."""
    b, hkv, s, dk = k.shape
    dv = v.shape[-1]
    src, length = compaction_plan(pos, keep)
    kernel = functools.partial(_tpu_kernel, capacity=s, block_size=block_size, num_kv_heads=hkv)
    out_index = lambda bi, hi, ji, *_: (bi, hi, ji, 0)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, hkv, s // block_size),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=[
            pl.BlockSpec((None, None, block_size, dk), out_index),
            pl.BlockSpec((None, None, block_size, dv), out_index),
        ],
        scratch_shapes=[pltpu.SemaphoreType.DMA((2,))],
    )
    k_out, v_out = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=interpret,
        name="kv_compact_tpu",
    )(src.reshape(-1), length.reshape(-1), k, v)
    return k_out, v_out, _gather_pos(pos, src, length), length


def _gpu_kernel(src_ref, length_ref, k_ref, v_ref, k_out, v_out, *, block_size: int) -> None:
    j = pl.program_id(2)
    live = j * block_size + jax.lax.broadcasted_iota(jnp.int32, (block_size,), 0) < length_ref[0]
    rows = src_ref[...]
    k_out[...] = jnp.where(live[:, None], k_ref[rows, :], jnp.zeros((), k_out.dtype))
    v_out[...] = jnp.where(live[:, None], v_ref[rows, :], jnp.zeros((), v_out.dtype))


def compact_pallas_gpu(
    k: jax.Array, v: jax.Array, pos: jax.Array, keep: jax.Array, *, block_size: int, interpret: bool,
    num_warps: int = 4, num_stages: int = 1,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Triton kernel: per destination block, one indexed (gather) load of K/V rows by the source table."""
    b, hkv, s, dk = k.shape
    dv = v.shape[-1]
    src, length = compaction_plan(pos, keep)
    row_index = lambda bi, hi, ji: (bi, hi, 0, 0)
    out_index = lambda bi, hi, ji: (bi, hi, ji, 0)
    k_out, v_out = pl.pallas_call(
        functools.partial(_gpu_kernel, block_size=block_size),
        out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
        grid=(b, hkv, s // block_size),
        in_specs=[
            pl.BlockSpec((None, None, block_size), lambda bi, hi, ji: (bi, hi, ji)),
            pl.BlockSpec((None, None, 1), lambda bi, hi, ji: (bi, hi, 0)),
            pl.BlockSpec((None, None, s, dk), row_index),
            pl.BlockSpec((None, None, s, dv), row_index),
        ],
        out_specs=[
            pl.BlockSpec((None, None, block_size, dk), out_index),
            pl.BlockSpec((None, None, block_size, dv), out_index),
        ],
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="kv_compact_gpu",
    )(src, length[..., None], k, v)
    return k_out, v_out, _gather_pos(pos, src, length), length


def _check_compact_args(k: jax.Array, v: jax.Array, pos: jax.Array, keep: jax.Array) -> None:
    if k.ndim != 4:
        raise ValueError(f"k: expected shape [B, Hkv, S, D], got {k.shape}")
    if v.ndim != 4 or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v: expected shape [B, Hkv, S, Dv] with [B, Hkv, S] = {k.shape[:3]}, got {v.shape}")
    if pos.shape != k.shape[:3]:
        raise ValueError(f"pos: expected shape {k.shape[:3]} (k's [B, Hkv, S]), got {pos.shape}")
    if not jnp.issubdtype(pos.dtype, jnp.integer):
        raise ValueError(f"pos: expected an integer dtype, got {pos.dtype}")
    if keep.shape != k.shape[:3]:
        raise ValueError(f"keep: expected shape {k.shape[:3]} (k's [B, Hkv, S]), got {keep.shape}")
    if keep.dtype != jnp.bool_:
        raise ValueError(f"keep: expected dtype bool, got {keep.dtype}")


def compact(
    k: jax.Array, v: jax.Array, pos: jax.Array, keep: jax.Array, *, impl: str = "auto",
    interpret: Interpret | None = None, block_size: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Compacts every row's kept filled entries to its front; returns ``(k, v, pos, length)``.

    k ``[B, Hkv, S, Dk]``, v ``[B, Hkv, S, Dv]``, pos ``[B, Hkv, S]`` int, keep ``[B, Hkv, S]`` bool.

    impl: "auto" (TPU kernel on TPU, Triton kernel on GPU, XLA elsewhere), "reference", "xla", "pallas_tpu" or
    "pallas_gpu". interpret: run a Pallas kernel in interpret mode (None: on the CPU; ``pltpu.InterpretParams``
    runs the TPU kernel in the TPU simulator). block_size: destination rows per kernel step, a divisor of S (None:
    the largest power of two up to 256 on TPU, 64 on GPU, dividing S). Raises ValueError naming the argument for
    bad shapes, dtypes, impl, interpret or block_size.
    """
    _check_compact_args(k, v, pos, keep)
    impl = resolve_impl(impl)
    if impl == "reference":
        return compact_reference(k, v, pos, keep)
    if impl == "xla":
        return compact_xla(k, v, pos, keep)
    capacity, dk, dv = k.shape[2], k.shape[3], v.shape[3]
    run_interpreted = resolve_interpret(interpret, impl)
    if impl == "pallas_tpu":
        block_size = default_block_size(capacity, _TPU_BLOCK) if block_size is None else block_size
        check_block_size(block_size, capacity)
        if run_interpreted is False and block_size % 8 != 0 and block_size != capacity:
            raise ValueError(
                f"block_size: the TPU kernel needs a multiple of 8 or the capacity {capacity}, got {block_size}"
            )
        return compact_pallas_tpu(k, v, pos, keep, block_size=block_size, interpret=run_interpreted)
    block_size = default_block_size(capacity, _GPU_BLOCK) if block_size is None else block_size
    check_block_size(block_size, capacity)
    if run_interpreted is False:
        for name, size in (("block_size", block_size), ("k head dim", dk), ("v head dim", dv)):
            if not is_power_of_two(size):
                raise ValueError(f"{name}: the Triton kernel needs a power of two, got {size}")
    return compact_pallas_gpu(k, v, pos, keep, block_size=block_size, interpret=run_interpreted)
