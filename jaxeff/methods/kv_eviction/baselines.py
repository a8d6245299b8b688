"""Training-free KV-eviction baselines, all at the same budget (see ``policy.py`` for the shared rules).

* :class:`StreamingLLM` (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", 2023): keep the
  first ``sink_tokens`` positions of the sequence (attention sinks) and the most recent entries.
* :class:`H2O` (Zhang et al., "H2O: Heavy-Hitter Oracle", 2023): keep the entries with the largest accumulated
  post-softmax attention (heavy hitters) plus a recent window; as in the paper the budget is split between the
  two, ``recent_ratio`` of it (rounded up) recent, the rest heavy. With ``decode_every=N`` every decode query's
  attention is added to the accumulated scores (the cache's ``score`` buffer) and the row is re-evicted every N
  steps (N = 1 is the paper's per-step eviction).
* :class:`SnapKV` (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", 2024): the last
  ``window`` prompt queries (the observation window) vote: their attention to each entry, summed over the window
  and over the query heads of the KV group, pooled along the sequence (``kernel_size``, max or avg, zero padding),
  picks the kept prefix; the observation window itself is always kept (its last ``min(window, budget)`` entries).
  Prompt-only, as in the paper: ``decode_every`` must be 0.
* :class:`RecentOnly` (the "local window" control) and :class:`RandomKeep` (uniformly random entries, a fixed
  seed; the control every scored policy must beat).

Documented choices where the papers are silent or differ: scores are per KV head (GQA groups sum their query
heads, as kvpress does), evicted entries are chosen per (sequence, layer, KV head) row, and when the forced set
alone exceeds the budget its best-scored members are kept (StreamingLLM: the earliest sinks; SnapKV: the most
attended window entries).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxeff.cache import LayerKV
from jaxeff.config import config_error
from jaxeff.methods.kv_eviction.policy import (
    KVEvictionPolicy,
    _is_int,
    accumulated_attention,
    ceil_ratio,
    recent_slots,
)


def _slot_index(kv: LayerKV) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(kv.capacity, dtype=jnp.float32), kv.pos.shape)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecentOnly(KVEvictionPolicy):
    """Keeps the most recent entries of each row (a sliding window over the cache)."""

    def score(self, kv, q, ctx):
        return _slot_index(kv)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StreamingLLM(KVEvictionPolicy):
    """Attention sinks (positions ``< sink_tokens``) plus the most recent entries."""

    sink_tokens: int = 4

    def __post_init__(self):
        super().__post_init__()
        if not _is_int(self.sink_tokens) or self.sink_tokens < 0:
            raise config_error("StreamingLLM.sink_tokens", "an int >= 0", self.sink_tokens)

    def forced(self, kv, q, ctx, budget):
        return (kv.pos >= 0) & (kv.pos < self.sink_tokens)

    def score(self, kv, q, ctx):
        # sinks: the earliest first (matters only when the budget is below sink_tokens); others: the most recent
        return jnp.where(kv.pos < self.sink_tokens, -kv.pos.astype(jnp.float32), _slot_index(kv))


@dataclasses.dataclass(frozen=True, kw_only=True)
class RandomKeep(KVEvictionPolicy):
    """Uniformly random entries (a control). Deterministic for a given ``seed``, layer and step."""

    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if not _is_int(self.seed):
            raise config_error("RandomKeep.seed", "an int", self.seed)

    def score(self, kv, q, ctx):
        key = jax.random.fold_in(jax.random.key(self.seed), ctx.layer)
        key = jax.random.fold_in(key, jnp.max(ctx.positions))  # fresh draws at every decode-time eviction
        return jax.random.uniform(key, kv.pos.shape, jnp.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class H2O(KVEvictionPolicy):
    """Heavy hitters by accumulated attention plus a recent window (``recent_ratio`` of the budget)."""

    recent_ratio: float = 0.5

    scores_with_attention: ClassVar[bool] = True
    keeps_score: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.recent_ratio, bool) or not isinstance(self.recent_ratio, (int, float)) or not (
            0.0 <= self.recent_ratio <= 1.0
        ):
            raise config_error("H2O.recent_ratio", "a value in [0, 1] (share of the budget kept as recent)",
                               self.recent_ratio)

    def observe(self, kv, q, ctx):
        prev = jnp.zeros(kv.pos.shape, jnp.float32) if kv.score is None else kv.score
        att = accumulated_attention(q, kv, ctx.positions, ctx.token_valid, ctx.config.sliding_window)
        return kv.replace(score=jnp.where(kv.pos >= 0, prev + att, 0.0))

    def score(self, kv, q, ctx):
        return kv.score

    def forced(self, kv, q, ctx, budget):
        return recent_slots(kv, ceil_ratio(budget, self.recent_ratio))


@dataclasses.dataclass(frozen=True, kw_only=True)
class SnapKV(KVEvictionPolicy):
    """Observation-window voting with pooling; the window is always kept. Prompt-only."""

    window: int = 32
    kernel_size: int = 7
    pooling: str = "max"

    scores_with_attention: ClassVar[bool] = True
    supports_decode_eviction: ClassVar[bool] = False

    def _no_decode_reason(self) -> str:
        return "its observation window is the prompt's last queries"

    def __post_init__(self):
        super().__post_init__()
        if not _is_int(self.window) or self.window < 1:
            raise config_error("SnapKV.window", "an int >= 1 (observation-window queries)", self.window)
        if not _is_int(self.kernel_size) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise config_error("SnapKV.kernel_size", "an odd int >= 1 (centred pooling)", self.kernel_size)
        if self.pooling not in ("max", "avg"):
            raise config_error("SnapKV.pooling", "'max' or 'avg'", self.pooling)

    def score(self, kv, q, ctx):
        t = ctx.token_valid.shape[1]
        w = min(self.window, t)
        n_valid = jnp.sum(ctx.token_valid, axis=-1, dtype=jnp.int32)  # right padding: valid tokens are a prefix
        idx = n_valid[:, None] - w + jnp.arange(w, dtype=jnp.int32)  # [B, w]: the last w valid queries
        ok = idx >= 0
        idx = jnp.clip(idx, 0, t - 1)
        qw = jnp.take_along_axis(q, idx[:, :, None, None], axis=1)
        pw = jnp.take_along_axis(ctx.positions, idx, axis=1)
        votes = accumulated_attention(qw, kv, pw, ok, ctx.config.sliding_window)
        return pool_scores(votes, self.kernel_size, self.pooling)

    def forced(self, kv, q, ctx, budget):
        return recent_slots(kv, jnp.minimum(budget, self.window))


def pool_scores(score: jax.Array, kernel_size: int, pooling: str) -> jax.Array:
    """Centred 1D pooling along the last (slot) axis with zero padding (``avg`` divides by ``kernel_size``)."""
    if kernel_size == 1:
        return score
    nd = score.ndim
    dims, strides = (1,) * (nd - 1) + (kernel_size,), (1,) * nd
    pad = [(0, 0)] * (nd - 1) + [(kernel_size // 2, kernel_size // 2)]
    if pooling == "max":  # scores are >= 0, so zero padding never wins
        return jax.lax.reduce_window(score, 0.0, jax.lax.max, dims, strides, pad)
    return jax.lax.reduce_window(score, 0.0, jax.lax.add, dims, strides, pad) / kernel_size
