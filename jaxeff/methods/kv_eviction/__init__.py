"""KV-cache eviction: a policy keeps a budget of entries per (sequence, layer, KV head) row and compacts them.

    from jaxeff.methods.kv_eviction import H2O, SnapKV, StreamingLLM
    model = DecoderLM(cfg).with_methods(SnapKV(keep_ratio=0.25, window=32))

``policy.py`` holds the framework (budgets, selection, compaction, decode-time re-eviction), ``baselines.py`` the
training-free policies.
"""

from jaxeff.methods.kv_eviction.baselines import H2O, RandomKeep, RecentOnly, SnapKV, StreamingLLM, pool_scores
from jaxeff.methods.kv_eviction.policy import (
    KVEvictionPolicy,
    accumulated_attention,
    ceil_ratio,
    recent_slots,
    select_keep,
)

__all__ = [
    "H2O", "KVEvictionPolicy", "RandomKeep", "RecentOnly", "SnapKV", "StreamingLLM", "accumulated_attention",
    "ceil_ratio", "pool_scores", "recent_slots", "select_keep",
]
