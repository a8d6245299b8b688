"""Block-size rules of the KV-eviction kernels, and the backend dispatch they share with every kernel package.

``resolve_impl``, ``resolve_interpret``, ``Interpret``, ``IMPLS``, ``is_power_of_two`` and ``check_triton_sizes``
live in ``pallas_kernels._dispatch`` and are re-exported here.
"""

from __future__ import annotations

from pallas_kernels._dispatch import (  # noqa: F401  (re-exported)
    IMPLS,
    Interpret,
    check_triton_sizes,
    is_power_of_two,
    resolve_impl,
    resolve_interpret,
)


def default_block_size(capacity: int, preferred: int) -> int:
    """The largest power of two ``<= preferred`` (and ``>= 8``) that divides ``capacity``; ``capacity`` itself when
    it is at most ``preferred`` or when no such power of two divides it (one block per row)."""
    if capacity <= preferred:
        return capacity
    size = preferred
    while size >= 8:
        if capacity % size == 0:
            return size
        size //= 2
    return capacity


def check_block_size(block_size: int, capacity: int) -> None:
    """Raises unless ``block_size`` is a positive divisor of the cache capacity ``S`` (no internal padding: padding
    would copy the whole cache)."""
    if not isinstance(block_size, int) or block_size <= 0 or capacity % block_size != 0:
        raise ValueError(
            f"block_size: expected a positive divisor of the cache capacity S={capacity}, got {block_size!r}"
        )
