"""Attention-Gate: learned, in-context KV-cache eviction (Zeng et al., arXiv 2410.12876).

A small attention-like network before every self-attention layer reads that layer's normed input and emits one
keep/evict flag per (token, KV head). Tokens flagged "evict" are invisible to every *later* query of that head,
during training (a multiplicative mask on the attention weights) and at inference (the prefill drops their K/V from
the cache, which keeps static shapes by compacting the kept entries to the front of each row).

No official code exists; the choices below are ours (the spec's [infer] items), each made so that the method is
well defined, trainable and exact against its oracles:

* **Gate network** (:class:`GateNet`, a Flax module; one per layer, parameters stacked on a leading layer axis):
  ``Q', K', V' = X W'_q, X W'_k, X W'_v`` with ``h'`` heads of size ``d'`` (defaults 2 x 32); RoPE on ``Q'``/``K'``
  with the model's base frequency; causal softmax attention over the tokens of the same forward pass (padding
  masked; over the whole prompt with ``prefill="dense"``, below); ``Z = concat(A'V') W'_o + b_o`` with one logit
  per **KV head**. Flags are per KV head, not per query head as in the paper: under grouped-query attention all
  query heads of a group read the same cached entry, so only a per-KV-head decision frees memory. ``b_o`` starts
  at ``init_bias`` (+3: ``sigmoid = 0.95``), so an untrained gate keeps nearly everything and the model starts as
  the dense one.
* **Flags**: ``s = sigmoid(Z)``, ``f = 1[s > threshold]``; in training the straight-through estimator
  ``f_ste = f + s - stop_gradient(s)`` (forward exactly {0, 1}, backward ``d f_ste / d Z = sigmoid'(Z)``).
* **Always kept**: the current token (the diagonal: no query row is ever empty), the first ``sink_tokens``
  positions (default 1) and, with ``local_window=w > 0``, the ``w`` tokens just before each query (at prefill: the
  prompt's last ``w`` tokens, which are exactly the ones the first decoded token's window covers). Keeping the first
  token follows the attention-sink observation (StreamingLLM): a large share of every head's attention mass lands on
  the first token, and removing it shifts every softmax row. The local window leaves the gates the one decision the
  training-free policies cannot make well, which distant tokens matter; recent tokens are kept by every baseline too
  (H2O's and StreamingLLM's recent windows, SnapKV's observation window).
* **Masked attention**: ``a_ij = m_ij exp(e_ij) / sum_k m_ik exp(e_ik)`` with ``m_ij = f_j`` for ``j < i``
  (1 on the diagonal and for sinks): the weights multiply the softmax's exponentials before normalising, so
  gradients reach ``f``. The exponentials are shifted by the largest *kept* score and clamped at ``exp(0)`` (exact
  for kept entries; it bounds the flag gradients of evicted tokens that outscore every kept one, which otherwise
  reached norms of 1e10 in training). With every flag 1 this is the dense model.
* **Eviction loss** (:meth:`AttentionGate.aux_loss`): ``loss_weight * mean_l max(0, keep_l - target_keep)^2``
  where ``keep_l`` is the mean of ``f_ste`` over the valid (token, KV head) pairs of layer ``l`` (the hinge-squared
  form of the spec: a gradient only while a layer keeps more than the target; the task loss pulls the other way).
  ``evict_loss="two_sided"`` uses the spec's other form, ``(keep_l - target_keep)^2``: with ``prefill="dense"`` only
  the continuation's loss reaches the flags, too weak a pull to stop the hinge's momentum (a SmolLM2 run fell from
  keeping everything to keeping only the always-kept tokens within 20 steps, where the straight-through gradient
  ``sigmoid'(z)`` vanishes and the gates stay shut); the two-sided form holds each layer at its target.
* **Two prefill modes** (``prefill``):

  - ``"masked"`` (the default; the spec's reading of the paper, "in-context" eviction): the gate is causal, an
    evicted token is invisible to every later query, the prompt's own tokens included, in training and at prefill
    (the prompt is processed exactly as in training, then the cache keeps only the flagged entries).
  - ``"dense"``: the prompt attends densely (its logits and its cached K/V are the base model's) and the flags decide
    which of its entries the tokens *after* it still see. The gate reads the whole prompt (bidirectional over it: the
    paper's gate reads "global context", and with a prompt that is complete when the gate runs, reading its end
    leaks nothing). Training splits each sequence into a ``prompt_len``-token prompt and a continuation that carries
    the loss: continuation queries see a prompt token only when it is kept, prompt queries see everything, the
    continuation's own tokens are never evicted, and the eviction loss counts the prompt's tokens only. This is
    exactly what a dense prefill + compaction + decoding computes (a test), and it is how the training-free policies
    act (they score the densely processed prompt), so a frozen base never sees a context it was not trained on.

* **Inference**: at prefill the gate runs on the prompt and the cache keeps only the flagged entries (plus the
  always-kept ones). With ``keep_ratio`` or ``budget`` set, the flags are instead the top ``ceil(keep_ratio * n)``
  (or ``budget``) tokens of each row by gate score, always-kept ones first: the same budget as the training-free
  baselines, for a like-for-like comparison. Decoding appends new tokens without evicting (the paper's gate acts on
  the prefill).
* **Parameters** live in ``params["methods"]["attention_gate"]["layers"]``: the base checkpoint's keys are
  unchanged, and :func:`gate_params` / :func:`with_gate_params` split and join them so gates save and load on
  their own.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxeff.attention.dense import attention_logits, attention_mask, causal_chunks
from jaxeff.cache import LayerKV, compact_kv
from jaxeff.config import config_error
from jaxeff.methods.kv_eviction.policy import (
    _is_int,
    check_budget_fits,
    check_decoder_config,
    row_budget,
    select_keep,
)
from jaxeff.models.config import RopeScaling
from jaxeff.models.layers import apply_rope, rope_inv_freq


PREFILL_MODES = ("masked", "dense")
EVICT_LOSSES = ("hinge", "two_sided")


class GateNet(nn.Module):
    """The per-layer gate: a reduced causal multi-head attention emitting one logit per (token, KV head).

    ``__call__(x [B, T, d], positions [B, T], valid [B, T] bool, context_end=0) -> logits [B, T, num_kv_heads]``
    (float32). Causal, except that the tokens at positions ``< context_end`` (an int or ``[B, 1]``: the prompt, for
    ``prefill="dense"``) are visible to every query.
    """

    num_kv_heads: int
    heads: int = 2
    head_dim: int = 32
    rope_theta: float = 10000.0
    init_bias: float = 3.0

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, valid: jax.Array, context_end=0) -> jax.Array:
        d = x.shape[-1]
        proj = nn.initializers.normal(stddev=d**-0.5)
        x = x.astype(jnp.float32)
        q = jnp.einsum("btd,dhk->bthk", x, self.param("wq", proj, (d, self.heads, self.head_dim)))
        k = jnp.einsum("btd,dhk->bthk", x, self.param("wk", proj, (d, self.heads, self.head_dim)))
        v = jnp.einsum("btd,dhk->bthk", x, self.param("wv", proj, (d, self.heads, self.head_dim)))
        inv_freq = jnp.asarray(rope_inv_freq(self.head_dim, self.rope_theta, RopeScaling()))
        freqs = positions.astype(jnp.float32)[..., None] * inv_freq
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        cos, sin = jnp.cos(emb), jnp.sin(emb)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        logits = jnp.einsum("bqhk,bshk->bhqs", q, k) * self.head_dim**-0.5
        key_pos = positions[:, None, None, :]
        visible = ((positions[:, None, :, None] >= key_pos) | (key_pos < jnp.reshape(context_end, (-1, 1, 1, 1))))
        visible = visible & valid[:, None, None, :]
        probs = jax.nn.softmax(jnp.where(visible, logits, -1e30), axis=-1)
        ctx = jnp.einsum("bhqs,bshk->bqhk", probs, v)
        wo = self.param("wo", nn.initializers.normal(stddev=0.02), (self.heads, self.head_dim, self.num_kv_heads))
        bo = self.param("bo", nn.initializers.constant(self.init_bias), (self.num_kv_heads,))
        return jnp.einsum("bqhk,hkn->bqn", ctx, wo) + bo


def ste_flags(logits: jax.Array, threshold: float) -> tuple[jax.Array, jax.Array]:
    """``(f_ste, s)``: hard flags ``1[sigmoid(z) > threshold]`` in the forward pass with the gradient of
    ``s = sigmoid(z)`` in the backward pass (straight-through), and ``s`` itself."""
    s = jax.nn.sigmoid(logits.astype(jnp.float32))
    hard = (s > threshold).astype(jnp.float32)
    return hard + (s - jax.lax.stop_gradient(s)), s  # (s - s) is exactly 0: the forward value is exactly 0/1


def gated_attention(
    q: jax.Array, kv: LayerKV, q_positions: jax.Array, keep: jax.Array, *, sliding_window: int | None = None,
    window: int = 0, open_before: int = 0, causal_aligned: bool = False, chunk: int = 128,
) -> jax.Array:
    """Attention where slot ``s`` of KV head ``h`` counts with weight ``keep[b, h, s]`` (a 0/1 flag, possibly
    carrying straight-through gradients), except that a query always sees its own slot and the ``window`` tokens
    just before it (``0 <= q_pos - k_pos <= window``), and queries at positions ``< open_before`` see every slot.

    q: ``[B, T, Hq, D]``; kv: the layer's keys/values; q_positions: ``[B, T]``; keep: ``[B, Hkv, S]`` float.
    Returns ``[B, T, Hq, D]`` in ``q.dtype``. Equals ``dense_attention`` when ``keep`` is all ones.
    ``causal_aligned``/``chunk``: causal chunk skipping, as in ``dense_attention`` (same result).
    """
    def attend(q, kv, q_positions, keep):
        return _gated(q, kv, q_positions, keep, sliding_window, window, open_before)

    if causal_aligned:
        return causal_chunks(attend, q, kv, q_positions, keep, chunk=chunk)
    return attend(q, kv, q_positions, keep)


def _gated(q: jax.Array, kv: LayerKV, q_positions: jax.Array, keep: jax.Array, sliding_window: int | None,
           window: int = 0, open_before: int = 0):
    b, t, hq, d = q.shape
    hkv, dv = kv.v.shape[1], kv.v.shape[-1]
    logits = attention_logits(q, kv.k, d**-0.5)  # [B, Hkv, G, T, S]
    mask = attention_mask(q_positions, kv, sliding_window)[:, :, None]  # [B, Hkv, 1, T, S]
    q_pos = q_positions[:, None, None, :, None]
    distance = q_pos - kv.pos[:, :, None, None, :]  # [B, Hkv, 1, T, S]
    always = (distance >= 0) & (distance <= window)  # the diagonal and the local window
    if open_before:
        always = always | (q_pos < open_before)
    weight = jnp.where(always, 1.0, keep[:, :, None, None, :].astype(jnp.float32))
    # The softmax's own steps with the weights multiplied in before normalising: with every weight 1 this is
    # bit-for-bit the dense attention's softmax. The shift is the maximum over the *kept* entries (the diagonal
    # always is one), and the exponent is clamped at 0: kept entries are unchanged, and an evicted entry whose score
    # exceeds every kept one cannot blow up the straight-through gradient of its flag (the normaliser is >= 1, so
    # every flag's gradient stays bounded). Without this, a row whose attention mass sits on evicted tokens gave
    # gradient norms of 1e10 and non-finite steps in training.
    masked = jnp.where(mask, logits, -1e30)
    kept = mask & (jax.lax.stop_gradient(weight) > 0.5)
    top = jax.lax.stop_gradient(jnp.max(jnp.where(kept, logits, -1e30), axis=-1, keepdims=True))
    shifted = masked - top
    shifted = jnp.where(shifted > 0, 0.0, shifted)  # not jnp.minimum: its gradient at the tie (the max) is 1/2
    unnormalized = jnp.where(mask, jnp.exp(shifted), 0.0) * weight
    norm = jnp.sum(unnormalized, axis=-1, keepdims=True)
    probs = unnormalized / jnp.where(norm > 0, norm, 1.0)
    probs = probs.reshape(b, hkv, -1, probs.shape[-1]).astype(q.dtype)
    out = jnp.einsum("bhqs,bhsd->bhqd", probs, kv.v.astype(q.dtype))
    return out.reshape(b, hkv, hq // hkv, t, dv).transpose(0, 3, 1, 2, 4).reshape(b, t, hq, dv)


def _tokens_to_slots(values: jax.Array, kv: LayerKV, positions: jax.Array, fill: float) -> jax.Array:
    """Spreads per-token values ``[B, T, Hkv]`` of the current forward pass onto the slots ``[B, Hkv, S]`` that
    hold those tokens (slots of earlier tokens, and empty ones, get ``fill``). Works for any cache layout: a slot is
    matched by its position, and the current tokens have consecutive positions from ``positions[:, 0]``."""
    start = positions[:, :1, None]  # [B, 1, 1]
    t = values.shape[1]
    offset = kv.pos - start  # [B, Hkv, S]
    current = (kv.pos >= 0) & (offset >= 0) & (offset < t)
    idx = jnp.clip(offset, 0, t - 1)
    per_slot = jnp.take_along_axis(jnp.swapaxes(values, 1, 2), idx, axis=-1)  # [B, Hkv, S]
    return jnp.where(current, per_slot, fill)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionGate:
    """Learned KV eviction (see the module docstring). Apply with ``model.with_methods(AttentionGate(...))``.

    Attributes:
      heads, head_dim: the gate's attention heads ``h'`` and their size ``d'``.
      threshold: ``tau``: a token is kept when ``sigmoid(z) > threshold``.
      target_keep: ``beta``: the keep rate the eviction loss drives each layer toward (from above).
      loss_weight: ``lambda``, the weight of the eviction loss.
      sink_tokens: the first positions that are always kept.
      init_bias: the gate logit bias at initialisation (a large value starts the model as the dense one).
      keep_ratio / budget: at inference, keep exactly this share (or number) of each row's prompt tokens by gate
        score instead of thresholding (None for both: threshold). Training always thresholds.
      prefill: ``"masked"`` (in-context eviction: the prompt's own attention is gated) or ``"dense"`` (the prompt
        attends densely; the flags act on the tokens after it).
      local_window: the ``w`` tokens before each query that it always sees (at prefill, the prompt's last ``w``).
      prompt_len: ``prefill="dense"`` only: the prompt length of each training sequence (the rest is the
        continuation that carries the loss); unused at inference, where the prompt is what is prefilled.
      evict_loss: ``"hinge"`` (push a layer's keep rate down while above the target) or ``"two_sided"`` (also up
        while below it).
    """

    heads: int = 2
    head_dim: int = 32
    threshold: float = 0.5
    target_keep: float = 0.5
    loss_weight: float = 1.0
    sink_tokens: int = 1
    init_bias: float = 3.0
    keep_ratio: float | None = None
    budget: int | None = None
    prefill: str = "masked"
    local_window: int = 0
    prompt_len: int | None = None
    evict_loss: str = "hinge"

    name: ClassVar[str] = "attention_gate"
    shrinks_kv_cache: ClassVar[bool] = True  # tells ``jaxeff.generate`` to move the cache into a smaller one

    def __post_init__(self):
        for field in ("heads", "head_dim"):
            if not _is_int(getattr(self, field)) or getattr(self, field) <= 0:
                raise config_error(f"AttentionGate.{field}", "a positive int", getattr(self, field))
        if self.head_dim % 2:
            raise config_error("AttentionGate.head_dim", "an even int (RoPE rotates pairs)", self.head_dim)
        if not 0.0 < self.threshold < 1.0:
            raise config_error("AttentionGate.threshold", "a float in (0, 1)", self.threshold)
        if not 0.0 < self.target_keep <= 1.0:
            raise config_error("AttentionGate.target_keep", "a float in (0, 1]", self.target_keep)
        if self.loss_weight < 0:
            raise config_error("AttentionGate.loss_weight", "a float >= 0", self.loss_weight)
        if not _is_int(self.sink_tokens) or self.sink_tokens < 0:
            raise config_error("AttentionGate.sink_tokens", "an int >= 0", self.sink_tokens)
        if self.keep_ratio is not None and self.budget is not None:
            raise config_error("AttentionGate.keep_ratio/budget", "at most one of them",
                               {"keep_ratio": self.keep_ratio, "budget": self.budget})
        if self.keep_ratio is not None and not 0.0 < float(self.keep_ratio) <= 1.0:
            raise config_error("AttentionGate.keep_ratio", "a value in (0, 1]", self.keep_ratio)
        if self.budget is not None and (not _is_int(self.budget) or self.budget <= 0):
            raise config_error("AttentionGate.budget", "a positive int (tokens kept per row)", self.budget)
        if self.evict_loss not in EVICT_LOSSES:
            raise config_error("AttentionGate.evict_loss", f"one of {EVICT_LOSSES}", self.evict_loss)
        if self.prefill not in PREFILL_MODES:
            raise config_error("AttentionGate.prefill", f"one of {PREFILL_MODES}", self.prefill)
        if not _is_int(self.local_window) or self.local_window < 0:
            raise config_error("AttentionGate.local_window", "an int >= 0", self.local_window)
        if self.prompt_len is not None:
            if self.prefill != "dense":
                raise config_error("AttentionGate.prompt_len", "null unless prefill is 'dense' (it splits the "
                                   "training sequences into a prompt and a continuation)", self.prompt_len)
            if not _is_int(self.prompt_len) or self.prompt_len <= 0:
                raise config_error("AttentionGate.prompt_len", "a positive int", self.prompt_len)

    @property
    def dense_prefill(self) -> bool:
        return self.prefill == "dense"

    def _train_prompt_len(self, ctx) -> int:
        """The prompt/continuation split of a training sequence (``prefill="dense"``), checked against its length."""
        t = ctx.positions.shape[1]
        if self.prompt_len is None:
            raise ValueError("AttentionGate.prompt_len: expected the prompt length of the training sequences "
                             "(prefill='dense' trains on sequences split into a prompt and a continuation), got None")
        if self.prompt_len >= t:
            raise ValueError(f"AttentionGate.prompt_len: expected fewer than the {t} tokens of the sequence (the "
                             f"tokens after the prompt carry the loss that trains the gates), got {self.prompt_len}")
        return self.prompt_len

    # ---- the gate network -------------------------------------------------------------------------------------

    def net(self, config) -> GateNet:
        return GateNet(num_kv_heads=config.num_kv_heads, heads=self.heads, head_dim=self.head_dim,
                       rope_theta=float(config.rope_theta), init_bias=self.init_bias)

    def check_model(self, config) -> None:
        check_decoder_config("AttentionGate", config, ("num_layers", "num_kv_heads", "hidden_size", "rope_theta"))

    def init(self, rng: jax.Array, config) -> dict:
        """``{"layers": GateNet params stacked [L, ...]}``."""
        self.check_model(config)
        net = self.net(config)
        x = jnp.zeros((1, 1, config.hidden_size), jnp.float32)
        pos = jnp.zeros((1, 1), jnp.int32)
        ones = jnp.ones((1, 1), bool)
        keys = jax.random.split(rng, config.num_layers)
        stacked = jax.vmap(lambda k: net.init(k, x, pos, ones)["params"])(keys)
        return {"layers": stacked}

    def param_axes(self, config) -> dict:
        """Logical axes: the input projections shard like the model's embedding axis, the rest is small."""
        return {"layers": {
            "wq": ("layers", "embed", None, None), "wk": ("layers", "embed", None, None),
            "wv": ("layers", "embed", None, None), "wo": ("layers", None, None, "kv_heads"), "bo": ("layers", None),
        }}

    def gate_logits(self, ctx) -> jax.Array:
        """``[B, T, Hkv]`` gate logits of the current tokens (computed once per layer and pass)."""
        if "attention_gate_logits" not in ctx.scratch:
            params = ctx.method_params[self.name]
            context_end = 0
            if self.dense_prefill:  # the gate reads the whole prompt
                context_end = (self._train_prompt_len(ctx) if ctx.mode == "train"
                               else _last_valid_position(ctx)[:, :1] + 1)
            ctx.scratch["attention_gate_logits"] = self.net(ctx.config).apply(
                {"params": params}, ctx.hidden, ctx.positions, ctx.token_valid, context_end
            )
        return ctx.scratch["attention_gate_logits"]

    def forced_tokens(self, ctx) -> jax.Array:
        """``[B, T, 1]`` bool: the current tokens that are kept whatever their flags: the sinks; at prefill the last
        ``local_window`` tokens of the prompt; in ``prefill="dense"`` training, the prompt's last ``local_window``
        tokens and the continuation (tokens after the prompt are never evicted, as in decoding)."""
        pos = ctx.positions
        forced = pos < self.sink_tokens
        if ctx.mode != "train" and self.local_window:
            forced = forced | (pos > _last_valid_position(ctx) - self.local_window)
        elif ctx.mode == "train" and self.dense_prefill:
            forced = forced | (pos >= self._train_prompt_len(ctx) - self.local_window)
        return forced[..., None]

    def counted_tokens(self, ctx) -> jax.Array:
        """``[B, T, 1]`` bool: the tokens whose keep rate the statistics and the eviction loss measure: the valid
        tokens, in ``prefill="dense"`` training only those of the prompt."""
        counted = ctx.token_valid
        if ctx.mode == "train" and self.dense_prefill:
            counted = counted & (ctx.positions < self._train_prompt_len(ctx))
        return counted[..., None]

    def token_flags(self, ctx) -> tuple[jax.Array, jax.Array]:
        """``(flags [B, T, Hkv] float32, scores [B, T, Hkv])``: straight-through flags in training, hard 0/1 flags
        (threshold, or the per-row budget when ``keep_ratio``/``budget`` is set) otherwise; forced tokens
        (:meth:`forced_tokens`) set to 1 and padding to 0. Computed once per layer and pass (``attention`` and
        ``kv_compress`` both read them)."""
        if "attention_gate_flags" in ctx.scratch:
            return ctx.scratch["attention_gate_flags"]
        logits = self.gate_logits(ctx)
        flags, scores = ste_flags(logits, self.threshold)
        valid = ctx.token_valid[..., None]
        forced = self.forced_tokens(ctx)
        if ctx.mode != "train":
            flags = jax.lax.stop_gradient(flags)
            if self.keep_ratio is not None or self.budget is not None:
                n = jnp.sum(ctx.token_valid, axis=-1, dtype=jnp.int32)[:, None]  # [B, 1]
                budget = row_budget(n, self.keep_ratio, self.budget)
                sel = select_keep(jnp.swapaxes(scores, 1, 2), jnp.swapaxes(forced & valid, 1, 2),
                                  jnp.swapaxes(jnp.broadcast_to(valid, scores.shape), 1, 2), budget)
                flags = jnp.swapaxes(sel, 1, 2).astype(jnp.float32)
        flags = jnp.where(forced, 1.0, flags)
        flags = jnp.where(valid, flags, 0.0)
        ctx.scratch["attention_gate_flags"] = (flags, scores)
        return flags, scores

    # ---- hooks ------------------------------------------------------------------------------------------------

    def wrap(self, hooks):
        inner_attention, inner_compress = hooks.attention, hooks.kv_compress

        def attention(q, kv, ctx):
            if ctx.mode == "decode":  # new tokens are appended and kept; the cache holds only kept entries
                return inner_attention(q, kv, ctx)
            flags, scores = self.token_flags(ctx)
            counted = jnp.broadcast_to(self.counted_tokens(ctx), flags.shape)
            n = jnp.maximum(jnp.sum(counted), 1)
            ctx.record("gate_keep", jnp.sum(jnp.where(counted, flags, 0.0)) / n)
            ctx.record("gate_score", jnp.sum(jnp.where(counted, scores, 0.0)) / n)
            if self.dense_prefill and ctx.mode == "prefill":  # the prompt attends densely; the flags act after it
                return inner_attention(q, kv, ctx)
            keep = _tokens_to_slots(flags, kv, ctx.positions, fill=1.0)
            # dense: prompt queries see everything and the window is in the flags; masked: a per-query window
            window, open_before = (0, self._train_prompt_len(ctx)) if self.dense_prefill else (self.local_window, 0)
            return gated_attention(q, kv, ctx.positions, keep, sliding_window=ctx.config.sliding_window,
                                   window=window, open_before=open_before, causal_aligned=ctx.kv_aligned)

        def kv_compress(kv, q, ctx):
            kv = inner_compress(kv, q, ctx)
            if ctx.mode != "prefill":
                return kv
            check_budget_fits("AttentionGate", self.budget, kv.capacity)
            flags, _ = self.token_flags(ctx)
            keep = _tokens_to_slots(flags, kv, ctx.positions, fill=1.0) > 0.5
            kept = compact_kv(kv, keep)
            ctx.record("kv_kept", kept.length)
            return kept

        return hooks.replace(attention=attention, kv_compress=kv_compress)

    # ---- training ---------------------------------------------------------------------------------------------

    def aux_loss(self, aux: dict) -> tuple[jax.Array, dict]:
        """``(loss_weight * mean_l max(0, keep_l - target_keep)^2, metrics)`` (``evict_loss="two_sided"``: without
        the ``max``) from the forward pass's ``aux``
        (``gate_keep``: ``[L]``, the straight-through keep rate of each layer)."""
        keep = aux["gate_keep"]
        excess = keep - self.target_keep
        if self.evict_loss == "hinge":
            excess = jnp.maximum(excess, 0.0)
        loss = jnp.mean(jnp.square(excess))
        return self.loss_weight * loss, {"gate_keep": jnp.mean(keep), "evict_loss": loss}


def _last_valid_position(ctx) -> jax.Array:
    """``[B, 1]`` the position of each row's last valid current token (-1 for an all-padding row)."""
    return jnp.max(jnp.where(ctx.token_valid, ctx.positions, -1), axis=1, keepdims=True)


def gate_params(params: dict) -> dict:
    """The gate parameters alone (what to save next to a base checkpoint)."""
    try:
        return params["methods"][AttentionGate.name]
    except KeyError:
        raise KeyError("params: expected params['methods']['attention_gate'] (a model with AttentionGate)") from None


def with_gate_params(params: dict, gates: dict) -> dict:
    """Base parameters joined with gate parameters saved by :func:`gate_params` (no copy of the base)."""
    methods = dict(params.get("methods", {}))
    methods[AttentionGate.name] = gates
    return {**params, "methods": methods}


GATES_FILE = "attention_gate.safetensors"
GATE_CONFIG_FILE = "attention_gate.json"


def save_gates(directory, gate: AttentionGate, params: dict) -> None:
    """Writes the gates alone (``attention_gate.safetensors``: one tensor per ``layers/<name>``, stacked over
    layers) and their settings (``attention_gate.json``) into ``directory``, next to or apart from the base
    checkpoint. ``params``: the full model parameters or the gate subtree."""
    import json
    import pathlib

    import numpy as np
    from safetensors.numpy import save_file

    gates = gate_params(params) if "methods" in params else params
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    flat = {f"layers/{k}": np.asarray(jax.device_get(v)) for k, v in gates["layers"].items()}
    save_file(flat, str(directory / GATES_FILE))
    fields = {f.name: getattr(gate, f.name) for f in dataclasses.fields(gate)}
    (directory / GATE_CONFIG_FILE).write_text(json.dumps(fields, indent=2) + "\n")


def load_gates(directory, config=None) -> tuple[AttentionGate, dict]:
    """``(AttentionGate, gate parameters)`` saved by :func:`save_gates`. With the model's ``config``, the shapes
    are checked against the gate that config needs (a clear error for gates trained on another model)."""
    import json
    import pathlib

    from safetensors.numpy import load_file

    from jaxeff.config import from_dict

    directory = pathlib.Path(directory)
    missing = [f for f in (GATES_FILE, GATE_CONFIG_FILE) if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{str(directory)!r}: expected saved Attention-Gate files, missing {missing}")
    gate = from_dict(AttentionGate, json.loads((directory / GATE_CONFIG_FILE).read_text()), "attention_gate")
    flat = load_file(str(directory / GATES_FILE))
    gates = {"layers": {k.split("/", 1)[1]: jnp.asarray(v) for k, v in flat.items()}}
    if config is not None:
        want = jax.eval_shape(lambda k: gate.init(k, config), jax.random.key(0))["layers"]
        got = {k: tuple(v.shape) for k, v in gates["layers"].items()}
        expected = {k: tuple(v.shape) for k, v in want.items()}
        if got != expected:
            raise ValueError(f"{str(directory)!r}: gate shapes {got} do not fit this model (expected {expected})")
    return gate, gates


def eviction_ratio(aux: dict) -> jax.Array:
    """``1 - mean keep rate`` over layers, from a forward pass's ``aux`` (prompt tokens x KV heads)."""
    return 1.0 - jnp.mean(aux["gate_keep"])


__all__ = ["AttentionGate", "GateNet", "eviction_ratio", "gate_params", "gated_attention", "load_gates",
           "save_gates", "ste_flags", "with_gate_params"]
