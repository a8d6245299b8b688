"""KV-eviction policies: exact budgets per row (ragged prompts, ratio and token budgets), the baselines' choices on
hand-built cases, compaction, the masked-full-forward oracle (prefill + compaction + decode steps equal a cache-free
forward whose attention hides exactly the evicted entries), generation with a shrunken cache, MoE, decode-time
re-eviction, and clear errors."""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import FAST, forward, forward_cache, tiny_model

from jaxeff import Hooks, KVCache, LayerContext, LayerKV, LMConfig, generate, generate_stream
from jaxeff.attention.dense import attention_logits, attention_mask, masked_softmax
from jaxeff.cache import append_kv, compact_kv
from jaxeff.generate import prefill
from jaxeff.methods.kv_eviction import (
    H2O,
    KVEvictionPolicy,
    RandomKeep,
    RecentOnly,
    SnapKV,
    StreamingLLM,
    ceil_ratio,
)

VOCAB = 64
CFG = LMConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def model_params():
    return tiny_model()


def ctx_for(positions, valid, mode="prefill", cfg=CFG):
    return LayerContext(config=cfg, layer=jnp.int32(0), hidden=None, positions=jnp.asarray(positions),
                        token_valid=jnp.asarray(valid), mode=mode, method_params={})


def prompt_kv(k, v, valid, capacity):
    """A LayerKV holding right-padded prompts: k, v ``[B, T, Hkv, D]``, valid ``[B, T]``."""
    b, t, hkv, d = k.shape
    empty = LayerKV(k=jnp.zeros((b, hkv, capacity, d)), v=jnp.zeros((b, hkv, capacity, d)),
                    pos=jnp.full((b, hkv, capacity), -1, jnp.int32), length=jnp.zeros((b, hkv), jnp.int32))
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    return append_kv(empty, jnp.asarray(k), jnp.asarray(v), positions, jnp.asarray(valid)), positions


def compress_prefill(policy, kv, q, positions, valid):
    fn = jax.jit(lambda kv, q, p, m: policy.compress(kv, q, ctx_for(p, m)), compiler_options=FAST)
    return fn(kv, jnp.asarray(q), jnp.asarray(positions), jnp.asarray(valid))


def kept_positions(kv, b, h):
    n = int(kv.length[b, h])
    return np.asarray(kv.pos[b, h, :n]).tolist()


# ---- budgets --------------------------------------------------------------------------------------------------

POLICIES = {
    "streaming": lambda **kw: StreamingLLM(sink_tokens=2, **kw),
    "h2o": lambda **kw: H2O(**kw),
    "snapkv": lambda **kw: SnapKV(window=3, kernel_size=3, **kw),
    "recent": lambda **kw: RecentOnly(**kw),
    "random": lambda **kw: RandomKeep(seed=3, **kw),
}
LENGTHS = (16, 10, 1)  # ragged prompts in one batch; 0.3 * 10 is exactly 3


@pytest.mark.parametrize("budget", [{"keep_ratio": 0.3}, {"budget": 6}], ids=["ratio", "tokens"])
@pytest.mark.parametrize("name", list(POLICIES))
def test_each_baseline_keeps_exactly_its_budget(name, budget):
    policy = POLICIES[name](**budget)
    rng = np.random.default_rng(0)
    b, t, hkv, g, d, cap = len(LENGTHS), 16, 2, 2, 8, 24
    k, v = rng.standard_normal((2, b, t, hkv, d)).astype(np.float32)
    q = rng.standard_normal((b, t, hkv * g, d)).astype(np.float32)
    valid = np.arange(t)[None, :] < np.array(LENGTHS)[:, None]
    kv, positions = prompt_kv(k, v, valid, cap)
    out = compress_prefill(policy, kv, q, positions, valid)

    for i, n in enumerate(LENGTHS):
        m = math.ceil(Fraction("0.3") * n) if "keep_ratio" in budget else min(6, n)
        for h in range(hkv):
            kept = kept_positions(out, i, h)
            assert len(kept) == m == int(out.length[i, h]), (name, i, h, kept)
            assert kept == sorted(set(kept)) and all(0 <= p < n for p in kept)  # in order, distinct, real
            assert np.all(np.asarray(out.pos[i, h, m:]) == -1)
            np.testing.assert_array_equal(np.asarray(out.k[i, h, :m]), k[i, kept, h])
            np.testing.assert_array_equal(np.asarray(out.v[i, h, :m]), v[i, kept, h])
            recent = list(range(n - m, n))
            if name == "recent":
                assert kept == recent
            if name == "streaming":
                sinks = list(range(min(2, m)))
                assert kept == sinks + list(range(max(n - (m - len(sinks)), len(sinks)), n))
            if name == "h2o":
                assert set(range(n - math.ceil(m / 2), n)) <= set(kept)
            if name == "snapkv":
                assert set(range(n - min(3, m), n)) <= set(kept)
    assert out.score is None and out.budget is None  # prefill-only: the cache keeps its plain structure
    if name in ("h2o", "snapkv", "random"):  # scored policies do not simply keep a window
        assert any(kept_positions(out, 0, h) != list(range(16 - out.length[0, h], 16)) for h in range(hkv))


def test_ceil_ratio_is_exact_in_int32():
    n = np.array([0, 1, 7, 10, 1000, 123457, 2**24 + 3])
    for r in (0.3, 0.5, 1 / 3, 0.125, 1.0, 0.77):
        want = [math.ceil(Fraction(r).limit_denominator(40000) * int(x)) for x in n]
        np.testing.assert_array_equal(np.asarray(ceil_ratio(jnp.asarray(n, jnp.int32), r)), want)
    assert int(ceil_ratio(jnp.int32(10), 0.3)) == 3 and int(ceil_ratio(jnp.int32(9), 1 / 3)) == 3


# ---- the baselines' choices on hand-built cases ---------------------------------------------------------------


def test_h2o_keeps_accumulated_attention_heavy_hitters_and_recent_window():
    """Every query points along e0; head 0's keys at positions 2 and 5 (head 1: 3 and 7) point along e0 too and
    absorb the attention. Budget 4 = 2 recent (10, 11) + the 2 heaviest hitters of each head."""
    t, d, c = 12, 4, 4.0
    q = np.zeros((1, t, 4, d), np.float32)
    q[..., 0] = c
    k = np.zeros((1, t, 2, d), np.float32)
    k[0, [2, 5], 0, 0] = c
    k[0, [3, 7], 1, 0] = c
    v = np.random.default_rng(0).standard_normal(k.shape).astype(np.float32)
    valid = np.ones((1, t), bool)
    kv, positions = prompt_kv(k, v, valid, 16)
    for policy in (H2O(budget=4), H2O(keep_ratio=1 / 3)):
        out = compress_prefill(policy, kv, q, positions, valid)
        assert kept_positions(out, 0, 0) == [2, 5, 10, 11]
        assert kept_positions(out, 0, 1) == [3, 7, 10, 11]
    # recent_ratio 0 keeps only heavy hitters: the next heaviest is position 0 (all of query 0's attention)
    out = compress_prefill(H2O(budget=3, recent_ratio=0.0), kv, q, positions, valid)
    assert kept_positions(out, 0, 0) == [0, 2, 5]

    # decode-time: the accumulated scores persist in the cache and grow by each decode query's attention
    policy = H2O(budget=4, decode_every=1)
    out = compress_prefill(policy, kv, q, positions, valid)
    np.testing.assert_array_equal(np.asarray(out.budget), [[4, 4]])
    kv2 = append_kv(out, jnp.zeros((1, 1, 2, d)), jnp.ones((1, 1, 2, d)), np.array([[12]]), np.ones((1, 1), bool))
    q2 = np.zeros((1, 1, 4, d), np.float32)
    q2[..., 0] = c
    ctx = ctx_for(np.array([[12]]), np.ones((1, 1), bool), mode="decode")
    observed = jax.jit(lambda kv, q: policy.observe(kv, q, ctx))(kv2, jnp.asarray(q2))
    logits = np.zeros((2, 5))  # head h, kept slots (positions kept + 12): heavy hitters score c * c / sqrt(d)
    logits[0, :2] = logits[1, :2] = c * c / np.sqrt(d)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(observed.score[0, :, :5]), np.asarray(kv2.score[0, :, :5]) + 2 * probs,
                               rtol=1e-5)
    evicted = jax.jit(lambda kv, q: policy.compress(kv, q, ctx))(kv2, jnp.asarray(q2))
    assert kept_positions(evicted, 0, 0) == [2, 5, 11, 12]  # 5 entries = budget + 1: back to 4, 10 dropped


def _snapkv_case():
    """16 tokens; the last 4 queries (the observation window) point along e0 and attend to position 3 (logit 6 +
    ln 2) and 8, 9, 10 (logit 6): p3 = 2 p9. Earlier queries point along e1 and attend to position 1, which the
    window ignores."""
    t, d = 16, 4
    q = np.zeros((1, t, 2, d), np.float32)
    q[0, :12, :, 1] = 2.0
    q[0, 12:, :, 0] = 2.0  # scale 1/sqrt(4): logit = k[0]
    k = np.zeros((1, t, 1, d), np.float32)
    k[0, 3, 0, 0] = 6.0 + np.log(2.0)
    k[0, [8, 9, 10], 0, 0] = 6.0
    k[0, 1, 0, 1] = 20.0
    v = np.random.default_rng(0).standard_normal(k.shape).astype(np.float32)
    valid = np.ones((1, t), bool)
    kv, positions = prompt_kv(k, v, valid, 16)
    return kv, q, positions, valid


@pytest.mark.parametrize("kernel,pooling,budget,heavy", [
    (1, "max", 5, [3]),  # no pooling: the single strongest entry
    (3, "avg", 5, [9]),  # averaging favours the centre of the 8-10 cluster over the isolated 3
    (3, "max", 7, [2, 3, 4]),  # max pooling spreads 3's score to its neighbours
])
def test_snapkv_votes_with_the_observation_window_and_pools(kernel, pooling, budget, heavy):
    kv, q, positions, valid = _snapkv_case()
    out = compress_prefill(SnapKV(budget=budget, window=4, kernel_size=kernel, pooling=pooling), kv, q, positions,
                           valid)
    assert kept_positions(out, 0, 0) == heavy + [12, 13, 14, 15]


def test_compact_kv_keeps_order_positions_and_scores():
    rng = np.random.default_rng(4)
    b, h, s, d = 2, 2, 8, 3
    pos = np.where(np.arange(s) < 6, np.arange(s) * 2, -1).astype(np.int32)  # positions 0, 2, ..., 10, then empty
    kv = LayerKV(k=rng.standard_normal((b, h, s, d)).astype(np.float32),
                 v=rng.standard_normal((b, h, s, d)).astype(np.float32),
                 pos=np.broadcast_to(pos, (b, h, s)), length=np.full((b, h), 6, np.int32),
                 score=rng.random((b, h, s)).astype(np.float32), budget=np.full((b, h), 3, np.int32))
    keep = rng.random((b, h, s)) < 0.5
    keep[..., 7] = True  # an empty slot asked to be kept stays empty
    out = jax.jit(compact_kv)(kv, keep)
    for i in range(b):
        for j in range(h):
            idx = np.flatnonzero(keep[i, j] & (pos >= 0))
            n = len(idx)
            assert int(out.length[i, j]) == n
            np.testing.assert_array_equal(out.pos[i, j, :n], pos[idx])
            np.testing.assert_array_equal(out.k[i, j, :n], kv.k[i, j, idx])
            np.testing.assert_array_equal(out.score[i, j, :n], kv.score[i, j, idx])
            assert np.all(np.asarray(out.pos[i, j, n:]) == -1) and np.all(np.asarray(out.k[i, j, n:]) == 0)
    np.testing.assert_array_equal(out.budget, kv.budget)


def test_cache_resize_and_truncate_carry_the_policy_buffers():
    cache = KVCache.create(2, 1, 2, 8, 4)
    kv = append_kv(cache.layer(0), jnp.ones((1, 5, 2, 4)), jnp.ones((1, 5, 2, 4)), np.arange(5)[None],
                   np.ones((1, 5), bool))
    stacked = jax.tree.map(lambda a: jnp.stack([a, a]), kv.replace(score=jnp.arange(8.0) * jnp.ones((1, 2, 8)),
                                                                   budget=jnp.full((1, 2), 3, jnp.int32)))
    cache = cache.with_layers(stacked, jnp.array([5], jnp.int32))
    small = cache.resize(6)
    assert small.capacity == 6 and small.score.shape == (2, 1, 2, 6) and small.nbytes() * 8 == cache.nbytes() * 6
    np.testing.assert_array_equal(small.pos[0, 0, 0], [0, 1, 2, 3, 4, -1])
    big = small.resize(10)
    np.testing.assert_array_equal(big.pos[0, 0, 0], [0, 1, 2, 3, 4] + [-1] * 5)
    np.testing.assert_array_equal(big.score[0, 0, 0], [0, 1, 2, 3, 4, 5, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="resize: capacity: expected at least the longest row's 5 entries, got 4"):
        cache.resize(4)
    cut = cache.truncate(jnp.array([3], jnp.int32))
    np.testing.assert_array_equal(cut.score[0, 0, 0], [0, 1, 2, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(cut.budget, cache.budget)


# ---- the model-level oracle -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AllowedAttention:
    """Cache-free oracle: query ``t`` of layer ``l`` attends to key position ``s`` only where
    ``layers/allowed[l, b, h, t, s]`` (and the usual causal/window rules)."""

    name: str = "allowed"

    def init(self, rng, config):
        return {}

    def wrap(self, hooks: Hooks) -> Hooks:
        def attention(q, kv, ctx):
            allowed = ctx.method_params[self.name]["allowed"]
            b, t, hq, d = q.shape
            logits = attention_logits(q, kv.k, d**-0.5)
            mask = attention_mask(ctx.positions, kv, ctx.config.sliding_window) & allowed
            probs = masked_softmax(logits, mask[:, :, None])
            out = jnp.einsum("bhgts,bhsd->bthgd", probs.astype(q.dtype), kv.v.astype(q.dtype))
            return out.reshape(b, t, hq, kv.v.shape[-1])

        return hooks.replace(attention=attention)


def decode_with_policy(model, params, policy, prompts, feed, capacity=32):
    """Prefill the right-padded ``prompts`` with ``policy``, then decode the tokens ``feed [B, n]`` one by one.
    Returns (prefill logits ``[B, T, V]``, decode logits ``[n, B, V]``, the cache before each decode step + after)."""
    m = model.with_methods(policy)
    b = len(prompts)
    t = max(len(p) for p in prompts)
    tokens = np.zeros((b, t), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    mask = np.arange(t)[None, :] < np.array([len(p) for p in prompts])[:, None]
    logits, cache = forward_cache(m, params, jnp.asarray(tokens), m.init_cache(b, capacity), jnp.asarray(mask))
    caches, steps = [cache], []
    for j in range(feed.shape[1]):
        step, cache = forward_cache(m, params, jnp.asarray(feed[:, j:j + 1]), cache, jnp.ones((b, 1), bool))
        steps.append(np.asarray(step[:, 0]))
        caches.append(cache)
    return np.asarray(logits), np.stack(steps), caches


def masked_oracle(model, params, prompts, feed, caches):
    """The cache-free forward of prompt + fed tokens where decode query ``j`` sees exactly the entries held in
    the cache before step ``j`` (and itself); prompt queries see the whole causal prefix. ``caches=None``: nothing
    hidden (the plain model)."""
    cfg = model.config
    b, n = feed.shape
    lens = np.array([len(p) for p in prompts])
    t = int(lens.max()) + n
    tokens = np.zeros((b, t), np.int32)
    allowed = np.ones((cfg.num_layers, b, cfg.num_kv_heads, t, t), bool)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
        tokens[i, len(p): len(p) + n] = feed[i]
        for j in range(n if caches is not None else 0):
            qpos = len(p) + j
            held = np.asarray(caches[j].pos[:, i])  # [L, Hkv, S]
            row = np.zeros((cfg.num_layers, cfg.num_kv_heads, t), bool)
            for layer in range(cfg.num_layers):
                for h in range(cfg.num_kv_heads):
                    row[layer, h, held[layer, h][held[layer, h] >= 0]] = True
            row[..., qpos] = True
            allowed[:, i, :, qpos] = row
    m = model.with_methods(AllowedAttention())
    mparams = {**params, "methods": {"allowed": {"layers": {"allowed": jnp.asarray(allowed)}}}}
    full = np.asarray(forward(m, mparams, jnp.asarray(tokens)))
    return full, np.stack([full[np.arange(b), lens + j] for j in range(n)])


@pytest.mark.parametrize("policy", [H2O(keep_ratio=0.5, decode_every=2), RandomKeep(keep_ratio=0.5, decode_every=2)],
                         ids=["h2o", "random"])
def test_decode_over_evicted_cache_equals_masked_full_forward_with_decode_eviction(model_params, policy):
    """Re-eviction every 2 decode steps, ragged prompts: every logit equals the cache-free forward whose attention
    hides exactly the evicted entries; rows hold their budget after each eviction and never more than budget + 2.
    (On this short random prompt H2O's accumulated attention favours the first tokens in every row; RandomKeep
    gives every (layer, sequence, head) row its own kept set.)"""
    model, params = model_params
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (12, 7)]
    feed = rng.integers(0, VOCAB, (2, 5)).astype(np.int32)
    pre, steps, caches = decode_with_policy(model, params, policy, prompts, feed)

    budgets = np.array([6, 4])  # ceil(0.5 * 12), ceil(0.5 * 7)
    for j, c in enumerate(caches):
        length = np.asarray(c.length)
        np.testing.assert_array_equal(np.asarray(c.budget), np.broadcast_to(budgets[None, :, None], length.shape))
        want = budgets + (j % 2)  # after the prefill and every second step: back to the budget
        np.testing.assert_array_equal(length, np.broadcast_to(want[None, :, None], length.shape), err_msg=f"{j}")
        np.testing.assert_array_equal(np.asarray(c.next_pos), [12 + j, 7 + j])
    last = caches[-1]
    rows = {tuple(kept_positions(last.layer(layer), 0, h)) for layer in range(2) for h in range(2)}
    assert len(rows) > 1 if isinstance(policy, RandomKeep) else rows == {(0, 1, 2, 13, 14, 15, 16)}

    full, want = masked_oracle(model, params, prompts, feed, caches)
    np.testing.assert_allclose(steps, want, atol=2e-5, rtol=2e-5)
    for i, p in enumerate(prompts):  # the prompt's own logits are the base model's
        np.testing.assert_allclose(pre[i, : len(p)], full[i, : len(p)], atol=2e-5, rtol=2e-5)
    _, plain = masked_oracle(model, params, prompts, feed, None)
    assert np.abs(plain - want).max() > 1e-2  # eviction mattered


def test_moe_sliding_window_model_with_snapkv_equals_masked_full_forward():
    """A Mixtral-style model (MoE FFN, sliding window 6): SnapKV's votes and the decode step both follow the
    window rule, and the decode logits equal the masked cache-free forward."""
    cfg = dataclasses.replace(CFG, num_experts=4, num_experts_per_tok=2, sliding_window=6)
    model, params = tiny_model(cfg)
    rng = np.random.default_rng(6)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (11, 16)]
    feed = rng.integers(0, VOCAB, (2, 1)).astype(np.int32)
    _, steps, caches = decode_with_policy(model, params, SnapKV(budget=6, window=3, kernel_size=3), prompts, feed)
    np.testing.assert_array_equal(np.asarray(caches[0].length), 6)
    _, want = masked_oracle(model, params, prompts, feed, caches)
    np.testing.assert_allclose(steps, want, atol=2e-5, rtol=2e-5)
    rows = {tuple(kept_positions(caches[0].layer(layer), 1, h)) for layer in range(2) for h in range(2)}
    assert len(rows) > 1  # the votes differ between layers and heads


def test_keep_ratio_one_is_the_plain_model(model_params):
    model, params = model_params
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (9, 5)]
    feed = rng.integers(0, VOCAB, (2, 2)).astype(np.int32)
    plain_pre, plain_steps, plain_caches = decode_with_policy(model, params, _NoEviction(), prompts, feed)
    pre, steps, caches = decode_with_policy(model, params, H2O(keep_ratio=1.0), prompts, feed)
    np.testing.assert_array_equal(pre, plain_pre)
    np.testing.assert_array_equal(steps, plain_steps)
    np.testing.assert_array_equal(np.asarray(caches[-1].length), np.asarray(plain_caches[-1].length))
    np.testing.assert_array_equal(np.asarray(caches[-1].pos), np.asarray(plain_caches[-1].pos))


@dataclasses.dataclass(frozen=True)
class _NoEviction:
    name: str = "none"

    def init(self, rng, config):
        return {}

    def wrap(self, hooks):
        return hooks


# ---- generation -----------------------------------------------------------------------------------------------


def test_generate_with_a_policy_shrinks_the_cache(model_params):
    model, params = model_params
    rng = np.random.default_rng(8)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (120, 77)]
    policy_model = model.with_methods(StreamingLLM(keep_ratio=0.25, sink_tokens=2))
    max_new = 4

    _, dense_cache = prefill(model, params, prompts, max_new_tokens=max_new)
    logits, cache = prefill(policy_model, params, prompts, max_new_tokens=max_new)
    assert dense_cache.capacity == 128  # round_up(120 + 4, 64)
    np.testing.assert_array_equal(np.asarray(cache.length[:, :, 0]), np.broadcast_to([30, 20], (2, 2)))
    assert cache.capacity == 30 + max_new  # evicted_capacity(30) == 30: no rounding under 32 kept
    assert cache.nbytes() / dense_cache.nbytes() == pytest.approx(34 / 128)
    np.testing.assert_array_equal(np.asarray(cache.pos[0, 0, 0, :4]), [0, 1, 92, 93])  # sinks, then recent

    out = generate(policy_model, params, prompts, max_new_tokens=max_new, stop_tokens=[])
    streamed = np.stack(list(generate_stream(policy_model, params, prompts, max_new_tokens=max_new,
                                             stop_tokens=[])), axis=1)
    np.testing.assert_array_equal(out, streamed)
    np.testing.assert_array_equal(out[:, 0], np.asarray(jnp.argmax(logits, -1)))
    assert out.shape == (2, max_new)


# ---- errors ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make,match", [
    (lambda: StreamingLLM(keep_ratio=1.5), r"StreamingLLM.keep_ratio': expected a value in \(0, 1\], got 1.5"),
    (lambda: H2O(keep_ratio=0.0), r"H2O.keep_ratio': expected a value in \(0, 1\], got 0.0"),
    (lambda: RecentOnly(keep_ratio=-0.2), r"expected a value in \(0, 1\], got -0.2"),
    (lambda: RecentOnly(), r"keep_ratio/budget': expected exactly one of .*'keep_ratio': None, 'budget': None"),
    (lambda: RecentOnly(keep_ratio=0.5, budget=8), r"expected exactly one of.*'keep_ratio': 0.5, 'budget': 8"),
    (lambda: RandomKeep(budget=0), r"RandomKeep.budget': expected a positive int .*got 0"),
    (lambda: RandomKeep(budget=2.5), r"RandomKeep.budget': expected a positive int .*got 2.5"),
    (lambda: StreamingLLM(budget=8, decode_every=-1), r"decode_every': expected an int >= 0.*got -1"),
    (lambda: StreamingLLM(budget=8, sink_tokens=-1), r"sink_tokens': expected an int >= 0, got -1"),
    (lambda: H2O(budget=8, recent_ratio=1.5), r"H2O.recent_ratio': expected a value in \[0, 1\].*got 1.5"),
    (lambda: SnapKV(budget=8, pooling="mean"), r"SnapKV.pooling': expected 'max' or 'avg', got 'mean'"),
    (lambda: SnapKV(budget=8, kernel_size=4), r"SnapKV.kernel_size': expected an odd int >= 1.*got 4"),
    (lambda: SnapKV(budget=8, window=0), r"SnapKV.window': expected an int >= 1.*got 0"),
    (lambda: SnapKV(budget=8, decode_every=2), r"SnapKV.decode_every': expected 0 \(SnapKV only compresses"),
])
def test_bad_policy_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_model_or_cache_raises(model_params):
    model, params = model_params

    @dataclasses.dataclass(frozen=True)
    class ImageConfig:  # not a decoder with a KV cache
        num_layers: int = 2

    with pytest.raises(ValueError, match=r"H2O: model: expected a decoder LM with a KV cache .*got ImageConfig "
                                         r"without num_heads, num_kv_heads, head_size"):
        H2O(keep_ratio=0.5).init(jax.random.key(0), ImageConfig())

    # a budget larger than the cache, found when the capacity is known (tracing the prefill)
    with pytest.raises(ValueError, match=r"H2O.budget: expected at most the cache capacity \(64 slots per row\), "
                                         r"got 100"):
        generate(model.with_methods(H2O(budget=100)), params, [[1, 2, 3]], max_new_tokens=2)

    # attention scores need keys of the query head dim (a compressed-K/V cache cannot be scored by attention)
    valid = np.ones((1, 4), bool)
    kv, positions = prompt_kv(np.ones((1, 4, 2, 4), np.float32), np.ones((1, 4, 2, 4), np.float32), valid, 8)
    q = jnp.ones((1, 4, 4, 8))
    with pytest.raises(ValueError, match=r"SnapKV: model: expected cached keys of the query head dim 8 .*got keys "
                                         r"of dim 4"):
        SnapKV(budget=2).compress(kv, q, ctx_for(positions, valid))
    assert RecentOnly(budget=2).compress(kv, q, ctx_for(positions, valid)).length.tolist() == [[2, 2]]

    # decode-time eviction on a cache that was not prefilled by the policy
    with pytest.raises(ValueError, match=r"StreamingLLM.decode_every: expected a cache prefilled with this policy"):
        StreamingLLM(budget=2, decode_every=1).compress(kv, q[:, :1], ctx_for(positions[:, :1], valid[:, :1],
                                                                              mode="decode"))
    with pytest.raises(ValueError, match="distinct names"):
        model.with_methods(StreamingLLM(budget=4), H2O(budget=4))
    assert isinstance(StreamingLLM(budget=4), KVEvictionPolicy) and hash(SnapKV(keep_ratio=0.5))
