"""Backend dispatch shared by every kernel package.

``impl="auto"`` picks the Mosaic TPU kernel on TPU, the Triton kernel on GPU and the XLA path elsewhere (the CPU);
``interpret=None`` runs Pallas kernels in interpret mode exactly when the default backend is the CPU, where Pallas
has no compiler.
"""

from __future__ import annotations

import jax
from jax.experimental.pallas import tpu as pltpu

IMPLS = ("auto", "reference", "xla", "pallas_tpu", "pallas_gpu")


def resolve_impl(impl: str) -> str:
    """The concrete implementation name for ``impl`` (one of ``IMPLS``) on the default backend."""
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if backend == "tpu":
        return "pallas_tpu"
    if backend in ("gpu", "cuda", "rocm"):
        return "pallas_gpu"
    return "xla"


Interpret = bool | pltpu.InterpretParams
"""What a kernel's ``interpret`` accepts: a bool, or (TPU kernels only) ``pltpu.InterpretParams`` for the TPU
simulator, which models DMAs and semaphores and can raise on out-of-bounds block reads."""


def resolve_interpret(interpret: Interpret | None, impl: str) -> Interpret:
    """``interpret``, or (when None) whether the default backend is the CPU; validated for the kernel ``impl``."""
    if interpret is None:
        return jax.default_backend() == "cpu"
    if isinstance(interpret, bool) or (impl == "pallas_tpu" and isinstance(interpret, pltpu.InterpretParams)):
        return interpret
    allowed = "a bool, None or pltpu.InterpretParams" if impl == "pallas_tpu" else "a bool or None"
    raise ValueError(f"interpret: expected {allowed} for impl={impl!r}, got {interpret!r}")


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_triton_sizes(**sizes: int) -> None:
    """Triton loads and dots need power-of-two tensor sizes of at least 16 per matmul dimension; raises naming the
    first size that is not."""
    for name, size in sizes.items():
        if not is_power_of_two(size) or size < 16:
            raise ValueError(f"{name}: the Triton kernel needs a power of two >= 16, got {size}")
