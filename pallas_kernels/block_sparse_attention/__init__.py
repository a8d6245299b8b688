"""Block-sparse flash attention over a block table (the kernel behind Attention Tile and Sliding Tile Attention).

A ``BlockTable`` (``table.py``) lists, per query block, the KV blocks it visits; ``block_sparse_attention``
computes softmax attention over exactly those blocks (key padding masked), differentiably, with one of:

* ``reference`` (``reference.py``): dense attention with the table's token mask, the specification;
* ``xla`` (``xla.py``): dense attention per group of query blocks over the visited blocks only, cache-blocked (the
  CPU path);
* ``pallas_tpu`` (``tpu.py``): Mosaic kernels, scalar-prefetched tables, a grid step per listed block;
* ``pallas_gpu`` (``gpu.py``): Triton kernels, an in-kernel loop over each list.

``impl="auto"`` picks by backend; with a mesh the kernels run under ``shard_map`` over batch and heads
(``dispatch.py``). ``block_sparse_attention_with_visits`` also returns each kernel program's visited-block count.
"""

from pallas_kernels.block_sparse_attention.dispatch import (
    block_sparse_attention,
    block_sparse_attention_with_visits,
)
from pallas_kernels.block_sparse_attention.reference import block_sparse_attention_reference
from pallas_kernels.block_sparse_attention.table import BlockTable, dense_table

__all__ = [
    "BlockTable",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "block_sparse_attention_with_visits",
    "dense_table",
]
