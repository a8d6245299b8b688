"""Dense reference for block-sparse attention: the specification every implementation is tested against.

Attention over the full ``N x N`` score matrix with the table's token mask (``table.token_mask()``), masked logits
at ``-inf`` and a "safe" float32 softmax: a query row whose visible keys are all masked returns 0, not NaN. Written
for clarity, not speed.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse_attention.common import check_inputs, default_scale
from pallas_kernels.block_sparse_attention.table import BlockTable


def block_sparse_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, table: BlockTable,
                                     sm_scale: Optional[float] = None) -> jax.Array:
    """Masked dense attention; q/k ``[B, H, N, D]``, v ``[B, H, N, Dv]`` -> ``[B, H, N, Dv]`` in ``q.dtype``.

    Head ``h`` uses mask ``h`` of a per-head table (``table.num_masks == H``) or the shared mask. Scale: default
    ``D ** -0.5``.
    """
    check_inputs(q, k, v, table)
    scale = default_scale(sm_scale, q.shape[-1])
    mask = jnp.asarray(table.token_mask())[None]  # [1, M, N, N], M in {1, H}
    s = jnp.einsum("bhqd,bhkd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    s = jnp.where(mask, s, -jnp.inf)
    row_max = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.where(mask, jnp.exp(s - row_max), 0.0)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(total > 0, total, 1.0)
    return jnp.einsum("bhqk,bhkd->bhqd", probs, v.astype(jnp.float32)).astype(q.dtype)
