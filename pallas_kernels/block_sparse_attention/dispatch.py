"""The public entry: ``block_sparse_attention`` picks an implementation by backend and shards it over a mesh.

``impl="auto"``: the Mosaic TPU kernel on TPU, the Triton kernel on GPU, the XLA path elsewhere (the CPU);
``interpret=None`` runs a Pallas kernel in interpret mode exactly on the CPU. Hardware block rules are checked only
when a kernel is compiled.

Sharding: with a mesh (passed as ``mesh=`` or active through ``jaxeff.sharding.activate``) the Pallas kernels run
under ``jax.shard_map`` with the batch over the data axes and the heads over the tensor axis (the logical axes
``"batch"`` and ``"q_heads"`` of ``jaxeff.sharding.DEFAULT_RULES``; an axis that does not divide its dimension is
left out); a per-head table is sliced to each shard's heads. The XLA path and the reference are plain jnp code and
are partitioned by GSPMD.
"""

from __future__ import annotations

from typing import Optional

import jax
from jax.sharding import Mesh, PartitionSpec as P

from pallas_kernels._dispatch import Interpret, check_triton_sizes, resolve_impl, resolve_interpret
from pallas_kernels.block_sparse_attention import gpu, tpu
from pallas_kernels.block_sparse_attention.common import (
    KernelConfig,
    TableArrays,
    check_inputs,
    default_scale,
    table_arrays,
)
from pallas_kernels.block_sparse_attention.reference import block_sparse_attention_reference
from pallas_kernels.block_sparse_attention.table import BlockTable
from pallas_kernels.block_sparse_attention.xla import block_sparse_attention_xla

_KERNELS = {
    "pallas_tpu": (tpu.block_sparse_attention_pallas_tpu, tpu.block_sparse_attention_pallas_tpu_visits),
    "pallas_gpu": (gpu.block_sparse_attention_pallas_gpu, gpu.block_sparse_attention_pallas_gpu_visits),
}


def _kernel_config(q: jax.Array, v: jax.Array, table: BlockTable, impl: str, sm_scale: Optional[float],
                   interpret: Interpret | None) -> KernelConfig:
    run_interpreted = resolve_interpret(interpret, impl)
    if run_interpreted is False:
        if impl == "pallas_tpu":
            tpu.check_tpu_blocks(table.block_q, table.block_kv, table.seq_len)
        else:
            check_triton_sizes(**{"table.block_q": table.block_q, "table.block_kv": table.block_kv,
                                  "q head dim": q.shape[-1], "v head dim": v.shape[-1]})
    return KernelConfig(table.block_q, table.block_kv, default_scale(sm_scale, q.shape[-1]), run_interpreted)


def _active_mesh(mesh: Optional[Mesh]) -> Optional[Mesh]:
    if mesh is not None:
        return mesh
    from jaxeff.sharding import active_mesh  # imported late: jaxeff itself imports the block tables

    return active_mesh()


def _shard_specs(mesh: Mesh, batch: int, heads: int) -> tuple[object, object]:
    """Mesh axes of the batch and head dimensions (None: not sharded)."""
    from jaxeff.sharding import DEFAULT_RULES, logical_to_spec

    spec = tuple(logical_to_spec(("batch", "q_heads"), DEFAULT_RULES, mesh, (batch, heads)))
    spec += (None,) * (2 - len(spec))
    return spec[0], spec[1]


def _run_kernel(fn, q, k, v, arrays: TableArrays, cfg: KernelConfig, mesh: Optional[Mesh], visits: bool):
    """``fn(q, k, v, arrays, cfg)``, under ``shard_map`` over batch and heads when ``mesh`` shards either."""
    if mesh is not None:
        batch_axes, head_axes = _shard_specs(mesh, q.shape[0], q.shape[1])
        if batch_axes is not None or head_axes is not None:
            data = P(batch_axes, head_axes, None, None)
            per_mask = P(head_axes) if arrays.kv_ids.shape[0] > 1 else P()
            table_spec = TableArrays(per_mask, per_mask, per_mask, per_mask,
                                     None if arrays.key_bias is None else P())
            out_spec = (data, P(batch_axes, head_axes, None)) if visits else data
            sharded = jax.shard_map(lambda q, k, v, a: fn(q, k, v, a, cfg), mesh=mesh,
                                    in_specs=(data, data, data, table_spec), out_specs=out_spec, check_vma=False)
            return sharded(q, k, v, arrays)
    return fn(q, k, v, arrays, cfg)


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, table: BlockTable, *,
                           sm_scale: Optional[float] = None, impl: str = "auto", interpret: Interpret | None = None,
                           mesh: Optional[Mesh] = None) -> jax.Array:
    """Block-sparse self-attention over the blocks listed in ``table``; ``[B, H, N, Dv]`` in ``q.dtype``.

    q/k ``[B, H, N, D]``, v ``[B, H, N, Dv]`` with ``N == table.seq_len``; ``table.num_masks`` is 1 (shared by the
    heads) or ``H`` (head ``h`` uses mask ``h``). Equals ``block_sparse_attention_reference``: softmax in float32
    over the visited blocks with padded keys (``table.kv_valid``) masked; a row with no visible key returns 0.
    Differentiable in q, k and v for every impl (the kernels have a flash-attention custom VJP).

    sm_scale: default ``D ** -0.5``. impl: "auto", "reference", "xla", "pallas_tpu" or "pallas_gpu". interpret:
    Pallas interpret mode (None: on the CPU; ``pltpu.InterpretParams`` runs the TPU kernel in the TPU simulator).
    mesh: shard the Pallas kernels over batch and heads (default: the mesh active in ``jaxeff.sharding``).
    Raises ValueError naming the argument for shape mismatches, a bad impl or interpret value, and (compiled
    kernels only) block or head sizes the hardware cannot tile.
    """
    check_inputs(q, k, v, table)
    impl = resolve_impl(impl)
    if impl == "reference":
        return block_sparse_attention_reference(q, k, v, table, sm_scale)
    if impl == "xla":
        return block_sparse_attention_xla(q, k, v, table, sm_scale=default_scale(sm_scale, q.shape[-1]))
    cfg = _kernel_config(q, v, table, impl, sm_scale, interpret)
    return _run_kernel(_KERNELS[impl][0], q, k, v, table_arrays(table), cfg, _active_mesh(mesh), False)


def block_sparse_attention_with_visits(q: jax.Array, k: jax.Array, v: jax.Array, table: BlockTable, *,
                                       sm_scale: Optional[float] = None, impl: str = "auto",
                                       interpret: Interpret | None = None,
                                       mesh: Optional[Mesh] = None) -> tuple[jax.Array, jax.Array]:
    """Instrumented forward of a Pallas kernel: ``(out, visits)``, ``visits`` int32 ``[B, H, nq]`` counting the KV
    blocks each program actually processed (incremented inside the kernel's skip condition / loop body), so a
    test can hold it to ``table.counts``. ``impl`` must resolve to "pallas_tpu" or "pallas_gpu". Not
    differentiable."""
    check_inputs(q, k, v, table)
    impl = resolve_impl(impl)
    if impl not in _KERNELS:
        raise ValueError(f"impl: visits are counted by the Pallas kernels only (pallas_tpu, pallas_gpu), got {impl!r}")
    cfg = _kernel_config(q, v, table, impl, sm_scale, interpret)
    return _run_kernel(_KERNELS[impl][1], q, k, v, table_arrays(table), cfg, _active_mesh(mesh), True)
