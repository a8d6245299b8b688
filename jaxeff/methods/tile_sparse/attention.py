"""Efficient-vDiT's tile-sparse 3D attention as a self-attention hook of the video DiT.

Paper: Ding et al., "Efficient-vDiT: Efficient Video Diffusion Transformers With Attention Tile" (arXiv 2502.06155).
The attention map of a video DiT splits into T x T frame tiles; diagonal tiles and the tiles of a few global
"reference" frames carry most of the weight. Each layer ``l`` keeps, for ``k_l`` reference frames, the mask
``M[i, j] = (i == j) or i in R or j in R`` (the ``k:(T-k)`` masks) and skips every other tile, so its attention
costs ``(T + k(2T-k-1)) / T^2`` of dense attention.

Documented choices where the paper is silent:

* the reference frames are the first ``k`` latent frames (the FLOPs do not depend on the choice);
* one ``k`` per layer, shared by all heads and by every timestep and prompt (the paper's "layer-wise" masks);
* ``k = None`` (or ``k >= T - 1``) means a dense layer; frames are padded to a multiple of the attention block so
  no block straddles two frames, and padded keys are masked.

    sparse = TileSparseAttention(layer_k=(1, 2, None, 1), num_frames=8, tokens_per_frame=64, block_size=64)
    out = model.apply(params, latents, t, text, self_attention=sparse)
"""

from __future__ import annotations

import dataclasses
from functools import cached_property
from typing import Optional

import jax
import numpy as np

from jaxeff.attention.tile_masks import VideoTokenLayout, attention_tile_mask, attention_tile_sparsity, tile_block_table
from jaxeff.models.vdit import dense_self_attention  # the model's own attention: dense layers stay exact
from pallas_kernels.block_sparse_attention import block_sparse_attention
from pallas_kernels.block_sparse_attention.table import BlockTable


@dataclasses.dataclass(frozen=True)
class TileSparseAttention:
    """The per-layer Attention Tile pattern as a hashable ``self_attention(q, k, v, layer_index)`` hook.

    Attributes:
      layer_k: reference frames per layer (``None`` = dense); its length is the model's layer count.
      num_frames, tokens_per_frame: the latent token grid (``T`` frames of ``S`` tokens, frame-major).
      block_size: attention block (tokens); ``None`` picks ``tokens_per_frame`` when it is at most 256, else the
        largest of 256/128/64 that wastes the least padding.
      impl: the block-sparse implementation (``"auto"``: TPU/GPU kernels, the XLA path on the CPU).
    """

    layer_k: tuple
    num_frames: int
    tokens_per_frame: int
    block_size: Optional[int] = None
    impl: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "layer_k", tuple(None if k is None else int(k) for k in self.layer_k))
        T = self.num_frames
        if T < 1 or self.tokens_per_frame < 1:
            raise ValueError(f"num_frames/tokens_per_frame: expected positive ints, got {T}, {self.tokens_per_frame}")
        for l, k in enumerate(self.layer_k):
            if k is not None and not 0 <= k <= T:
                raise ValueError(f"layer_k[{l}]: expected None or an int in [0, num_frames={T}], got {k}")
        if self.block_size is None:
            object.__setattr__(self, "block_size", default_block_size(self.tokens_per_frame))

    @property
    def num_layers(self) -> int:
        return len(self.layer_k)

    @cached_property
    def layout(self) -> VideoTokenLayout:
        return VideoTokenLayout(self.num_frames, self.tokens_per_frame, self.block_size)

    def is_dense(self, layer: int) -> bool:
        k = self.layer_k[layer]
        return k is None or k >= self.num_frames - 1

    @cached_property
    def tables(self) -> tuple:
        """One ``BlockTable`` per layer (``None`` for dense layers)."""
        return tuple(None if self.is_dense(l) else tile_block_table(attention_tile_mask(self.num_frames, k),
                                                                      self.layout)
                     for l, k in enumerate(self.layer_k))

    def layer_sparsity(self, layer: int) -> float:
        """Tile sparsity of one layer (the spec's formula; 0 for dense layers)."""
        return 0.0 if self.is_dense(layer) else attention_tile_sparsity(self.num_frames, self.layer_k[layer])

    @property
    def sparsity(self) -> float:
        """Mean attention sparsity over the layers (each layer's attention costs the same when dense)."""
        return float(np.mean([self.layer_sparsity(l) for l in range(self.num_layers)])) if self.num_layers else 0.0

    @property
    def block_sparsity(self) -> float:
        """Mean over layers of the skipped fraction of block products, padding included (what a kernel skips)."""
        vals = []
        for t in self.tables:
            vals.append(0.0 if t is None else t.sparsity)
        return float(np.mean(vals)) if vals else 0.0

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, layer_index: int) -> jax.Array:
        if not 0 <= layer_index < self.num_layers:
            raise ValueError(f"layer_index: expected 0..{self.num_layers - 1} (layer_k has {self.num_layers} "
                             f"entries), got {layer_index}")
        N = q.shape[2]
        if N != self.num_frames * self.tokens_per_frame:
            raise ValueError(f"q: expected {self.num_frames} x {self.tokens_per_frame} = "
                             f"{self.num_frames * self.tokens_per_frame} video tokens, got {N}")
        table: Optional[BlockTable] = self.tables[layer_index]
        if table is None:
            return dense_self_attention(q, k, v)
        lay = self.layout
        qp, kp, vp = (lay.pad(x, axis=2) for x in (q, k, v))
        out = block_sparse_attention(qp, kp, vp, table, impl=self.impl)
        return lay.unpad(out, axis=2)


def default_block_size(tokens_per_frame: int) -> int:
    """One block per frame up to 256 tokens; beyond, the largest of 256/128/64 that pads a frame by at most 5%
    (64 when none does)."""
    if tokens_per_frame <= 256:
        return tokens_per_frame
    for b in (256, 128, 64):
        if (-tokens_per_frame) % b <= 0.05 * tokens_per_frame:
            return b
    return 64


def uniform(num_layers: int, k: Optional[int], num_frames: int, tokens_per_frame: int, **kw) -> TileSparseAttention:
    """The same ``k`` in every layer (the paper's uniform-mask ablation, Table 7)."""
    return TileSparseAttention((k,) * num_layers, num_frames, tokens_per_frame, **kw)
