"""Mesh construction and logical-axis sharding.

Every parameter and key activation carries *logical* axis names (``"embed"``, ``"q_heads"``, ``"batch"``...). One
rules table maps logical names to mesh axes; the same model code then runs on one CPU, 8 fake CPU devices, a GPU,
a TPU pod slice or several hosts. Meshes use ``AxisType.Auto`` on every axis (GSPMD/Shardy propagation with
``jax.jit`` in/out shardings and ``with_sharding_constraint``), not ``jax.make_mesh``'s Explicit default.

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    shardings = param_shardings(model, mesh)                 # pytree of NamedSharding, like params
    params = jax.jit(model.init, out_shardings=shardings)(rng)
    with activate(mesh):                                      # model-internal constraints use this mesh
        ...
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Optional, Sequence

import jax
import jax.experimental.mesh_utils
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxeff.config import ConfigError, config_error

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("experts", "expert"),
    ("router", None),
    ("layers", None),
    ("norm", None),
    ("cache_length", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; ``-1`` on at most one axis takes whatever devices are left."""

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1

    def shape(self, num_devices: int) -> tuple[int, ...]:
        sizes = [getattr(self, a) for a in MESH_AXES]
        for a, s in zip(MESH_AXES, sizes):
            if s == 0 or s < -1:
                raise config_error(f"mesh.{a}", "a positive size or -1 (fill)", s)
        if sizes.count(-1) > 1:
            raise ConfigError(f"config field 'mesh': at most one axis may be -1, got {dataclasses.asdict(self)}")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise config_error(
                    "mesh", f"fixed axis sizes whose product ({known}) divides the device count {num_devices}",
                    dataclasses.asdict(self),
                )
            sizes[sizes.index(-1)] = num_devices // known
        elif known != num_devices:
            raise config_error(
                "mesh", f"axis sizes whose product equals the device count {num_devices}, product is {known}",
                dataclasses.asdict(self),
            )
        return tuple(sizes)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A mesh over ``devices`` (default: all global devices) with axes ``data, fsdp, expert, tensor``, Auto mode."""
    devices = list(jax.devices() if devices is None else devices)
    shape = cfg.shape(len(devices))
    try:
        dev_array = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # unusual topologies: fall back to the given order
        dev_array = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(dev_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(
    axes: Sequence[Optional[str]], rules=DEFAULT_RULES, mesh: Optional[Mesh] = None, shape=None
) -> P:
    """PartitionSpec for logical ``axes``. With ``mesh`` and ``shape``, a mesh axis that does not divide its
    dimension (or is already used by an earlier dimension) is dropped, so that dimension is replicated."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(axes):
        target = table.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        mesh_axes = (target,) if isinstance(target, str) else tuple(target)
        kept = []
        for m in mesh_axes:
            if m in used:
                continue
            if mesh is not None:
                if m not in mesh.shape:
                    continue
                size = mesh.shape[m]
                if size == 1:
                    continue
                if shape is not None:
                    have = math.prod(mesh.shape[k] for k in kept)
                    if shape[i] % (have * size):
                        continue
            kept.append(m)
        used.update(kept)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def tree_shardings(axes_tree, shapes_tree, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a pytree of logical axes, given a matching pytree of shapes (or arrays)."""

    def one(axes, shaped):
        shape = getattr(shaped, "shape", shaped)
        return NamedSharding(mesh, logical_to_spec(axes, rules, mesh, shape))

    return jax.tree.map(one, axes_tree, shapes_tree, is_leaf=lambda x: isinstance(x, tuple))


def param_shardings(model, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedSharding pytree matching ``model.init``'s output."""
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    return tree_shardings(model.param_axes(), shapes, mesh, rules)


# ---- activation constraints inside model code ---------------------------------------------------------------

_ACTIVE: contextvars.ContextVar[Optional[tuple[Mesh, tuple]]] = contextvars.ContextVar("jaxeff_mesh", default=None)


@contextlib.contextmanager
def activate(mesh: Mesh, rules=DEFAULT_RULES):
    """Makes ``constrain`` inside model code shard activations over ``mesh`` (during tracing)."""
    token = _ACTIVE.set((mesh, tuple(rules)))
    try:
        yield mesh
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> Optional[Mesh]:
    cur = _ACTIVE.get()
    return cur[0] if cur else None


def constrain(x: jax.Array, axes: Sequence[Optional[str]]) -> jax.Array:
    """``with_sharding_constraint`` by logical axes; a no-op when no mesh is active."""
    cur = _ACTIVE.get()
    if cur is None:
        return x
    mesh, rules = cur
    spec = logical_to_spec(axes, rules, mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def data_sharding(mesh: Mesh, ndim: int = 2, rules=DEFAULT_RULES, shape=None) -> NamedSharding:
    """Sharding of a ``[batch, ...]`` input array."""
    axes = ("batch",) + (None,) * (ndim - 1)
    return NamedSharding(mesh, logical_to_spec(axes, rules, mesh, shape))


def shard_host_batch(batch: np.ndarray, mesh: Mesh, rules=DEFAULT_RULES) -> jax.Array:
    """Places a host array holding the *global* batch onto ``mesh`` (works with several processes: every
    process passes the same global array and only its addressable shards are transferred)."""
    sharding = data_sharding(mesh, batch.ndim, rules, batch.shape)
    return jax.make_array_from_callback(batch.shape, sharding, lambda idx: batch[idx])


def describe(tree) -> dict:
    """``{path: PartitionSpec}`` of a pytree of arrays, for logs and tests."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
        out[key] = getattr(getattr(leaf, "sharding", None), "spec", None)
    return out

