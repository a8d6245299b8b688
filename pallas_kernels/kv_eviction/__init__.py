"""Kernels for KV-cache eviction, each beside its pure-jnp reference.

* ``compact`` (``compaction.py``): moves each (sequence, KV head) row's kept entries to the front of the row, in
  order, and lowers its ``length``: what an eviction policy does to the cache.
* ``ragged_decode_attention`` (``ragged_decode.py``): one decode token per sequence attending over rows of
  different lengths, reading only the occupied K/V blocks.

Both take one layer of ``jaxeff.cache`` (k/v ``[B, Hkv, S, D]``, pos ``[B, Hkv, S]``, length ``[B, Hkv]``) and
dispatch by backend with ``impl="auto"``: Mosaic TPU kernel on TPU, Triton kernel on GPU, XLA on the CPU. The
references (``reference.py``) are the specification the tests hold every implementation to.
"""

from pallas_kernels.kv_eviction.compaction import compact, compaction_plan
from pallas_kernels.kv_eviction.ragged_decode import bucketed_kv_bound, kv_index_map, ragged_decode_attention
from pallas_kernels.kv_eviction.reference import compact_reference, decode_mask, ragged_decode_attention_reference

__all__ = [
    "bucketed_kv_bound",
    "compact",
    "compact_reference",
    "compaction_plan",
    "decode_mask",
    "kv_index_map",
    "ragged_decode_attention",
    "ragged_decode_attention_reference",
]
