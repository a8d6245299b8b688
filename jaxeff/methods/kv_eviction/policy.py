"""KV-cache eviction policies: the framework shared by the training-free baselines and learned evictors.

A policy (a "press" in NVIDIA kvpress's words) decides, per (sequence, layer, KV head, token), which cached
entries to keep. It is a :class:`jaxeff.models.hooks.Method` that wraps the ``kv_compress`` hook, so it composes
with any decoder of the foundation (dense or MoE: the hook does not see the FFN)::

    model = DecoderLM(cfg).with_methods(StreamingLLM(keep_ratio=0.5))
    tokens = jaxeff.generate(model, params, prompts, max_new_tokens=64)   # the base params: policies own none

How a policy evicts, with static shapes throughout (budgets are traced values: ranks, never dynamic sizes):

1. **When.** After every forward pass in ``"prefill"`` mode (a cache and ``T > 1`` tokens; the layer's attention
   has already run over the full prompt, so the prompt's own logits are the base model's). With
   ``decode_every=N > 0``, also during decoding: a row that has grown to ``budget + N`` entries is evicted back to
   ``budget``, i.e. every ``N`` decode steps, so a row never holds more than ``budget + N`` entries. The per-row
   budget is the number kept at prefill, stored in the cache (``LayerKV.budget``). A prompt prefilled in several
   chunks is compressed after each chunk (the ratio then compounds); ``jaxeff.generate`` prefills in one pass.
2. **Budget.** Exactly one of ``keep_ratio`` (row of ``n`` entries keeps ``ceil(keep_ratio * n)``; the ratio is
   read as the nearest fraction with denominator <= 40000, so ``0.3 * 10`` keeps 3, in exact int32 arithmetic) or
   ``budget`` (tokens: ``min(budget, n)``). Rows of one batch have different ``n`` (ragged prompts) and get
   different budgets.
3. **Choice.** ``score(kv, q, ctx) -> [B, Hkv, S]`` float32 (higher = keep) and ``forced(kv, q, ctx, budget)``
   (slots kept first, e.g. sinks, the recent window, an observation window). :func:`select_keep` keeps the
   forced slots, then the best scored ones, exactly ``min(budget, n)`` per row; ties go to the earlier slot.
4. **Compaction.** :func:`jaxeff.cache.compact_kv`: the kept entries move to the front of their row in their
   original order with their positions, the rest become empty, ``length`` = number kept. Attention derives its
   mask from positions, so attention over the compacted row equals masked attention over the full one.

Slots of a row hold increasing positions (appends go after the kept entries and compaction keeps order), so
"the most recent ``w`` entries" are the slots ``[length - w, length)``. Policies that score with attention
(H2O, SnapKV) recompute the post-softmax probabilities with the helpers of ``jaxeff.attention.dense`` (same mask
rules, sliding window included) and sum them over the query heads of each KV group. H2O's accumulated scores
persist across steps in the cache's per-slot ``score`` buffer only when ``decode_every > 0``; otherwise the cache
keeps its plain structure.
"""

from __future__ import annotations

import dataclasses
import fractions
import numbers
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxeff.attention.dense import attention_logits, attention_mask, masked_softmax
from jaxeff.cache import LayerKV, compact_kv
from jaxeff.config import config_error

_RATIO_DENOMINATOR = 40000  # (n % q) * p stays below 2**31 for q <= 46340: exact int32 ceil(p * n / q)


def ratio_fraction(ratio: float) -> tuple[int, int]:
    """``(p, q)``: the nearest fraction ``p / q`` to ``ratio`` with ``q <= 40000``."""
    f = fractions.Fraction(float(ratio)).limit_denominator(_RATIO_DENOMINATOR)
    return f.numerator, f.denominator


def ceil_ratio(n: jax.Array, ratio: float) -> jax.Array:
    """``ceil(ratio * n)`` for int ``n`` (any shape), exact in int32 (``ratio`` read by :func:`ratio_fraction`)."""
    p, q = ratio_fraction(ratio)
    n = jnp.asarray(n, jnp.int32)
    return (n // q) * p + ((n % q) * p + q - 1) // q


def select_keep(score: jax.Array, forced: jax.Array, filled: jax.Array, budget: jax.Array) -> jax.Array:
    """``[..., S]`` bool: per row, exactly ``min(budget, #filled)`` filled slots: the forced ones first (the best
    scored among them if they alone exceed the budget), then the highest scores. Ties go to the earlier slot.

    score: ``[..., S]`` float; forced, filled: ``[..., S]`` bool; budget: ``[...]`` int (traced is fine).
    """
    s = score.shape[-1]
    tier = jnp.where(filled, jnp.where(forced, 0, 1), 2).astype(jnp.int32)
    neg = jnp.where(filled, -score.astype(jnp.float32), 0.0)
    neg = jnp.where(jnp.isnan(neg), jnp.inf, neg)  # a NaN score ranks last, never first
    idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), score.shape)
    _, _, order = jax.lax.sort((tier, neg, idx), dimension=score.ndim - 1, num_keys=2, is_stable=True)
    rank = jnp.put_along_axis(jnp.zeros_like(order), order, idx, axis=-1, inplace=False)
    return (rank < jnp.asarray(budget)[..., None]) & filled


def recent_slots(kv: LayerKV, count: jax.Array) -> jax.Array:
    """``[B, Hkv, S]`` bool: the ``count`` (``[B, Hkv]``) most recent entries of each row."""
    slot = jnp.arange(kv.capacity, dtype=jnp.int32)
    length = kv.length[..., None]
    return (slot >= length - jnp.asarray(count)[..., None]) & (slot < length)


def accumulated_attention(
    q: jax.Array, kv: LayerKV, q_positions: jax.Array, q_valid: jax.Array, sliding_window: int | None = None,
    *, query_chunk: int = 256,
) -> jax.Array:
    """``[B, Hkv, S]`` float32: post-softmax attention each slot receives, summed over the valid queries and over
    the query heads of its KV group. Same mask rules as ``dense_attention``. Queries are processed ``query_chunk``
    at a time so a long prompt never holds the whole ``T x S`` probability matrix.

    q: ``[B, T, Hq, D]`` (RoPE applied); q_positions: ``[B, T]``; q_valid: ``[B, T]`` bool.
    """
    b, t, _, d = q.shape
    scale = d**-0.5

    def block(qc, pc, vc):
        logits = attention_logits(qc, kv.k, scale)  # [B, Hkv, G, Tc, S]
        mask = attention_mask(pc, kv, sliding_window)[:, :, None] & vc[:, None, None, :, None]
        return jnp.sum(masked_softmax(logits, mask), axis=(2, 3))

    if t <= query_chunk:
        return block(q, q_positions, q_valid)
    n = -(-t // query_chunk)
    pad = n * query_chunk - t

    def chunks(a, fill):
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), constant_values=fill)
        return jnp.moveaxis(a.reshape(b, n, query_chunk, *a.shape[2:]), 1, 0)

    xs = (chunks(q, 0), chunks(q_positions, 0), chunks(q_valid, False))
    total, _ = jax.lax.scan(lambda acc, x: (acc + block(*x), None), jnp.zeros(kv.pos.shape, jnp.float32), xs)
    return total


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_decoder_config(owner: str, config, needed=("num_layers", "num_heads", "num_kv_heads", "head_size")) -> None:
    """Raises ``ValueError`` naming ``owner`` unless ``config`` has the fields of a decoder with a KV cache."""
    missing = [a for a in needed if not hasattr(config, a)]
    if missing:
        raise ValueError(
            f"{owner}: model: expected a decoder LM with a KV cache (a config with {', '.join(needed)}), "
            f"got {type(config).__name__} without {', '.join(missing)}"
        )


def check_budget_fits(owner: str, budget: int | None, capacity: int) -> None:
    """Raises ``ValueError`` when a token ``budget`` exceeds the cache's ``capacity`` slots per row."""
    if budget is not None and budget > capacity:
        raise ValueError(
            f"{owner}.budget: expected at most the cache capacity ({capacity} slots per row), got {budget}"
        )


def row_budget(n: jax.Array, keep_ratio: float | None, budget: int | None) -> jax.Array:
    """Entries kept in a row that holds ``n`` (int array): ``ceil(keep_ratio * n)`` or ``min(budget, n)``."""
    n = jnp.asarray(n, jnp.int32)
    if keep_ratio is not None:
        return ceil_ratio(n, keep_ratio)
    return jnp.minimum(n, budget)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVEvictionPolicy:
    """Base of every eviction policy. Subclasses override :meth:`score` (and :meth:`forced`, :meth:`observe`).

    Attributes:
      keep_ratio: fraction of each row's entries to keep, in ``(0, 1]``; or
      budget: entries (tokens) to keep per row, ``>= 1`` and at most the cache capacity. Exactly one of the two.
      decode_every: 0 evicts at prefill only; ``N > 0`` also evicts every ``N`` decode steps back to the number
        kept at prefill.
    """

    keep_ratio: float | None = None
    budget: int | None = None
    decode_every: int = 0

    name: ClassVar[str] = "kv_eviction"  # one policy per model: a second one is refused by ``with_methods``
    shrinks_kv_cache: ClassVar[bool] = True  # tells ``jaxeff.generate`` to move the cache into a smaller one
    scores_with_attention: ClassVar[bool] = False  # needs q . k (keys of the query head dim)
    supports_decode_eviction: ClassVar[bool] = True
    keeps_score: ClassVar[bool] = False  # accumulates the cache's per-slot ``score`` buffer across steps

    def __post_init__(self):
        cls = type(self).__name__
        if (self.keep_ratio is None) == (self.budget is None):
            raise config_error(
                f"{cls}.keep_ratio/budget", "exactly one of keep_ratio (a fraction) or budget (tokens)",
                {"keep_ratio": self.keep_ratio, "budget": self.budget},
            )
        if self.keep_ratio is not None and (
            not isinstance(self.keep_ratio, numbers.Real) or isinstance(self.keep_ratio, bool)
            or not 0.0 < float(self.keep_ratio) <= 1.0
        ):
            raise config_error(f"{cls}.keep_ratio", "a value in (0, 1]", self.keep_ratio)
        if self.budget is not None and (not _is_int(self.budget) or self.budget <= 0):
            raise config_error(f"{cls}.budget", "a positive int (tokens kept per row)", self.budget)
        if not _is_int(self.decode_every) or self.decode_every < 0:
            raise config_error(f"{cls}.decode_every", "an int >= 0 (0 = evict at prefill only)", self.decode_every)
        if self.decode_every and not self.supports_decode_eviction:
            raise config_error(
                f"{cls}.decode_every", f"0 ({cls} only compresses the prompt: {self._no_decode_reason()})",
                self.decode_every,
            )

    def _no_decode_reason(self) -> str:
        return "it has no decode-time rule"

    # ---- the Method protocol ---------------------------------------------------------------------------------

    def init(self, rng: jax.Array, config) -> dict:
        self.check_model(config)
        return {}

    def wrap(self, hooks):
        inner = hooks.kv_compress

        def kv_compress(kv, q, ctx):
            return self.compress(inner(kv, q, ctx), q, ctx)

        return hooks.replace(kv_compress=kv_compress)

    # ---- what subclasses define -------------------------------------------------------------------------------

    def score(self, kv: LayerKV, q: jax.Array, ctx) -> jax.Array:
        """``[B, Hkv, S]`` float32, higher = more worth keeping (only filled slots are read)."""
        raise NotImplementedError

    def forced(self, kv: LayerKV, q: jax.Array, ctx, budget: jax.Array) -> jax.Array:
        """``[B, Hkv, S]`` bool: slots kept before any scored one (budget: ``[B, Hkv]``)."""
        return jnp.zeros(kv.pos.shape, bool)

    def observe(self, kv: LayerKV, q: jax.Array, ctx) -> LayerKV:
        """Updates per-slot state from this step's queries before scoring (H2O accumulates attention)."""
        return kv

    # ---- the framework ----------------------------------------------------------------------------------------

    def check_model(self, config) -> None:
        """Raises ``ValueError`` unless ``config`` describes a decoder with a KV cache."""
        check_decoder_config(type(self).__name__, config)

    def _check_inputs(self, kv: LayerKV, q: jax.Array, ctx) -> None:
        cls = type(self).__name__
        self.check_model(ctx.config)
        check_budget_fits(cls, self.budget, kv.capacity)
        if self.scores_with_attention and kv.k.shape[-1] != q.shape[-1]:
            raise ValueError(
                f"{cls}: model: expected cached keys of the query head dim {q.shape[-1]} (it scores tokens by "
                f"attention), got keys of dim {kv.k.shape[-1]} (compressed K/V); use StreamingLLM, RecentOnly "
                f"or RandomKeep"
            )

    def row_budget(self, n: jax.Array) -> jax.Array:
        """Entries kept in a row that holds ``n`` (int array): ``ceil(keep_ratio * n)`` or ``min(budget, n)``."""
        return row_budget(n, self.keep_ratio, self.budget)

    def keep_mask(self, kv: LayerKV, q: jax.Array, ctx, budget: jax.Array) -> jax.Array:
        """``[B, Hkv, S]`` bool: the slots this policy keeps, exactly ``min(budget, length)`` per row."""
        return select_keep(self.score(kv, q, ctx), self.forced(kv, q, ctx, budget), kv.valid_mask(), budget)

    def compress(self, kv: LayerKV, q: jax.Array, ctx) -> LayerKV:
        """The ``kv_compress`` hook body (callable directly on a ``LayerKV``, e.g. in tests)."""
        self._check_inputs(kv, q, ctx)
        if ctx.mode == "prefill":
            kv = self.observe(kv, q, ctx)
            kept = compact_kv(kv, self.keep_mask(kv, q, ctx, self.row_budget(kv.length)))
            if self.decode_every:
                kept = kept.replace(budget=kept.length)
            else:  # nothing evicts later: keep the cache's plain structure
                kept = kept.replace(score=None)
            ctx.record("kv_kept", kept.length)
            return kept
        if ctx.mode == "decode" and self.decode_every:
            if kv.budget is None or (self.keeps_score and kv.score is None):
                raise ValueError(
                    f"{type(self).__name__}.decode_every: expected a cache prefilled with this policy (it stores "
                    f"the per-row budget{' and scores' if self.keeps_score else ''}), got a cache without them"
                )
            kv = self.observe(kv, q, ctx)
            due = kv.length >= kv.budget + self.decode_every  # [B, Hkv]

            def evict(kv):
                keep = self.keep_mask(kv, q, ctx, kv.budget)
                return compact_kv(kv, keep | ~due[..., None])

            return jax.lax.cond(jnp.any(due), evict, lambda kv: kv, kv)
        return kv
