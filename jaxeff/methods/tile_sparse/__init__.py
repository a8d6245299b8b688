"""Efficient-vDiT (tile-sparse 3D attention): the Attention Tile hook, the layer-wise mask search (stage 2) and
knowledge distillation into the sparse student (stage 3). See ``attention.py`` for the method and its choices."""

from jaxeff.methods.tile_sparse.attention import TileSparseAttention, dense_self_attention, uniform
from jaxeff.methods.tile_sparse.distill import kd_loss
from jaxeff.methods.tile_sparse.search import SearchResult, masked_dense_attention, search_layer_k

__all__ = [
    "SearchResult",
    "TileSparseAttention",
    "dense_self_attention",
    "kd_loss",
    "masked_dense_attention",
    "search_layer_k",
    "uniform",
]
