"""KV-cache eviction: a policy keeps a budget of entries per (sequence, layer, KV head) row and compacts them.

    from jaxeff.methods.kv_eviction import H2O, SnapKV, StreamingLLM
    model = DecoderLM(cfg).with_methods(SnapKV(keep_ratio=0.25, window=32))

``policy.py`` holds the framework (budgets, selection, compaction, decode-time re-eviction), ``baselines.py`` the
training-free policies, ``attention_gate.py`` the learned one (Attention-Gate)::

    model = DecoderLM(cfg).with_methods(AttentionGate(target_keep=0.5))   # gates in params["methods"]
"""

from jaxeff.methods.kv_eviction.attention_gate import (
    AttentionGate,
    GateNet,
    eviction_ratio,
    gate_params,
    gated_attention,
    load_gates,
    save_gates,
    ste_flags,
    with_gate_params,
)
from jaxeff.methods.kv_eviction.baselines import H2O, RandomKeep, RecentOnly, SnapKV, StreamingLLM, pool_scores
from jaxeff.methods.kv_eviction.policy import (
    KVEvictionPolicy,
    accumulated_attention,
    ceil_ratio,
    recent_slots,
    select_keep,
)

__all__ = [
    "AttentionGate", "GateNet", "eviction_ratio", "gate_params", "gated_attention", "load_gates", "save_gates",
    "ste_flags", "with_gate_params",
    "H2O", "KVEvictionPolicy", "RandomKeep", "RecentOnly", "SnapKV", "StreamingLLM", "accumulated_attention",
    "ceil_ratio", "pool_scores", "recent_slots", "select_keep",
]
