"""Attention-Gate oracles: open gates == the dense model; closed gates leave only the diagonal; masked full forward ==
prefill + compaction + decode; the straight-through gradient is sigmoid'; the gate is causal; the eviction loss drives
the keep rate to its target; budgets are exact; gates save and load on their own; bad input gets clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny import tiny_model

from jaxeff import LMConfig, generate
from jaxeff.cache import LayerKV
from jaxeff.config import ConfigError
from jaxeff.generate import prefill
from jaxeff.methods.kv_eviction import (
    AttentionGate,
    gate_params,
    gated_attention,
    load_gates,
    save_gates,
    ste_flags,
    with_gate_params,
)

VOCAB = 64
CFG = LMConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def base():
    return tiny_model(CFG)


def gated(base, gate: AttentionGate, seed: int = 1, wo_scale: float = 1.0):
    model, params = base
    m = model.with_methods(gate)
    gates = m.init(jax.random.key(seed))["methods"]
    if wo_scale != 1.0:  # sharper gate decisions than the small default init gives
        gates["attention_gate"]["layers"]["wo"] = gates["attention_gate"]["layers"]["wo"] * wo_scale
    return m, {**params, "methods": gates}


def tokens(b=2, t=12, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (b, t)), jnp.int32)


def test_open_gates_equal_the_dense_model(base):
    model, params = base
    m, p = gated(base, AttentionGate(init_bias=50.0))
    x = tokens()
    out = m.forward(p, x)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(model.apply(params, x)), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.aux["gate_keep"]), 1.0)
    # the base parameter tree is untouched by the method: same keys, same arrays
    assert set(p) - {"methods"} == set(params)


def random_qkv(seed: int, b: int, t: int, hkv: int = 2, g: int = 2, d: int = 8, valid=None):
    """``(rng, q [B, T, Hkv*G, D], k, v [B, T, Hkv, D], positions [B, T], LayerKV of the sequence)``."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, t, hkv * g, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, t, hkv, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, t, hkv, d)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    kv = LayerKV.from_sequence(k, v, pos, jnp.ones((b, t), bool) if valid is None else valid)
    return rng, q, k, v, pos, kv


def test_closed_gates_leave_only_the_diagonal():
    b, t, hkv, g = 2, 6, 2, 2
    _, q, k, v, pos, kv = random_qkv(1, b, t, hkv, g)
    out = gated_attention(q, kv, pos, jnp.zeros((b, hkv, t)))
    # each query head h reads its own token's value of KV head h // g
    want = jnp.repeat(v, g, axis=2)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-6)


def test_closed_gates_in_the_model_keep_nothing_but_sinks(base):
    m, p = gated(base, AttentionGate(init_bias=-50.0, sink_tokens=2))
    out = m.forward(p, tokens(t=10))
    np.testing.assert_allclose(np.asarray(out.aux["gate_keep"]), 2 / 10, atol=1e-6)


def test_masked_full_forward_equals_prefill_compaction_decode(base):
    m, p = gated(base, AttentionGate(init_bias=0.0), seed=2, wo_scale=100.0)
    x = tokens(b=2, t=13, seed=3)
    full = m.forward(p, x)
    keep = np.asarray(full.aux["gate_keep"])
    assert np.all((keep > 0.2) & (keep < 0.9)), keep  # a real mix of kept and evicted tokens
    cache = m.init_cache(2, 32)
    logits, cache = m.apply(p, x[:, :-1], cache=cache)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full.logits[:, :-1]), atol=1e-5)
    # the cache really holds fewer entries than the prompt (compacted to the front of each row)
    lengths = np.asarray(cache.length)
    assert lengths.sum() < 0.9 * lengths.size * 12 and lengths.min() >= 1
    np.testing.assert_array_equal((np.asarray(cache.pos) >= 0).sum(-1), lengths)
    step, cache = m.apply(p, x[:, -1:], cache=cache)
    np.testing.assert_allclose(np.asarray(step[:, 0]), np.asarray(full.logits[:, -1]), atol=1e-5)


def test_ragged_prompts_generate_with_a_smaller_cache(base):
    m, p = gated(base, AttentionGate(init_bias=0.0, keep_ratio=0.5), seed=2, wo_scale=100.0)
    prompts = [np.arange(1, 40) % VOCAB, np.arange(5, 22) % VOCAB]
    _, cache = prefill(m, p, prompts, max_new_tokens=4)
    n = np.array([39, 17])
    kept = np.asarray(cache.length)  # [L, B, Hkv]
    np.testing.assert_array_equal(kept, np.broadcast_to(np.ceil(0.5 * n).astype(int)[None, :, None], kept.shape))
    out = generate(m, p, prompts, max_new_tokens=4, stop_tokens=[])
    assert np.asarray(out).shape == (2, 4)


def test_straight_through_gradient_is_sigmoid_prime():
    z = jnp.linspace(-4.0, 4.0, 17)
    f, s = ste_flags(z, 0.5)
    assert set(np.unique(np.asarray(f)).tolist()) <= {0.0, 1.0}
    np.testing.assert_array_equal(np.asarray(f), (np.asarray(s) > 0.5).astype(np.float32))
    grad = jax.grad(lambda z: jnp.sum(ste_flags(z, 0.5)[0]))(z)
    sig = jax.nn.sigmoid(z)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(sig * (1 - sig)), rtol=1e-6)


def test_gate_is_causal(base):
    m, p = gated(base, AttentionGate(init_bias=0.0), seed=2, wo_scale=100.0)
    x = tokens(b=1, t=10, seed=5)
    y = x.at[0, 6].set((x[0, 6] + 7) % VOCAB)
    a, b = m.forward(p, x), m.forward(p, y)
    np.testing.assert_allclose(np.asarray(a.logits[:, :6]), np.asarray(b.logits[:, :6]), atol=1e-6)
    assert not np.allclose(np.asarray(a.logits[:, 6:]), np.asarray(b.logits[:, 6:]))


def _train_keep_rate(base, gate: AttentionGate, steps: int = 40) -> list:
    """Keep rates while SGD minimises the eviction loss alone (no task loss)."""
    m, p = gated(base, gate)
    x = tokens(b=4, t=16, seed=7)
    tx = optax.sgd(5.0)
    g = p["methods"]
    state = tx.init(g)

    @jax.jit
    def step(g, state):
        def loss(g):
            aux = m.forward({**p, "methods": g}, x).aux
            return gate.aux_loss(aux)

        (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(g)
        updates, state = tx.update(grads, state)
        return optax.apply_updates(g, updates), state, metrics

    keeps = []
    for _ in range(steps):
        g, state, metrics = step(g, state)
        keeps.append(float(metrics["gate_keep"]))
    return keeps


def test_eviction_loss_drives_the_keep_rate_to_its_target(base):
    keeps = _train_keep_rate(base, AttentionGate(target_keep=0.4, init_bias=3.0))
    assert keeps[0] > 0.9
    # the hinge stops pushing once a layer is at the target: the rate settles just below it
    assert 0.3 <= keeps[-1] <= 0.42, keeps[-10:]


def test_two_sided_eviction_loss_also_pulls_a_closed_gate_up(base):
    """Gates that start shut (keeping little more than the sink) are pulled up to the target by the two-sided loss;
    the hinge leaves them shut."""
    kw = dict(target_keep=0.5, init_bias=-1.0)
    two_sided = _train_keep_rate(base, AttentionGate(evict_loss="two_sided", **kw))
    hinge = _train_keep_rate(base, AttentionGate(**kw), steps=5)
    assert two_sided[0] < 0.2 and hinge[-1] == hinge[0] < 0.2
    assert 0.4 <= two_sided[-1] <= 0.6, two_sided[-10:]


def test_budget_keeps_exactly_its_tokens(base):
    m, p = gated(base, AttentionGate(budget=5, sink_tokens=1), seed=2, wo_scale=100.0)
    x = tokens(b=2, t=12, seed=8)
    cache = m.init_cache(2, 16)
    _, cache = m.apply(p, x, cache=cache)
    np.testing.assert_array_equal(np.asarray(cache.length), 5)
    assert np.all(np.asarray(cache.pos)[..., 0] == 0)  # the sink is always kept


def test_gates_save_and_load_on_their_own(base, tmp_path):
    gate = AttentionGate(heads=2, head_dim=16, target_keep=0.3)
    m, p = gated(base, gate, seed=4)
    save_gates(tmp_path, gate, p)
    gate2, gates = load_gates(tmp_path, CFG)
    assert gate2 == gate
    p2 = with_gate_params(base[1], gates)
    x = tokens()
    np.testing.assert_array_equal(np.asarray(m.apply(p2, x)), np.asarray(m.apply(p, x)))
    jax.tree.map(np.testing.assert_array_equal, gate_params(p2), gate_params(p))
    other = LMConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2)
    with pytest.raises(ValueError, match="do not fit this model"):
        load_gates(tmp_path, other)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_gates(tmp_path / "nowhere")


@pytest.mark.parametrize("kwargs, field", [
    ({"keep_ratio": 0.0}, "keep_ratio"), ({"keep_ratio": 1.5}, "keep_ratio"), ({"budget": 0}, "budget"),
    ({"keep_ratio": 0.5, "budget": 3}, "keep_ratio/budget"), ({"threshold": 1.0}, "threshold"),
    ({"head_dim": 7}, "head_dim"), ({"target_keep": 0.0}, "target_keep"),
])
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"AttentionGate.{field}"):
        AttentionGate(**kwargs)


def test_budget_larger_than_the_cache_and_unsupported_model(base):
    m, p = gated(base, AttentionGate(budget=40))
    with pytest.raises(ValueError, match="at most the cache capacity"):
        m.apply(p, tokens(), cache=m.init_cache(2, 16))
    with pytest.raises(ValueError, match="expected a decoder LM"):
        AttentionGate().init(jax.random.key(0), object())


def test_causal_chunk_skipping_gives_the_same_gated_attention():
    b, t, hkv = 2, 40, 2
    valid = jnp.arange(t)[None] < jnp.array([[40], [29]])  # right padding in the second row
    rng, q, k, v, pos, kv = random_qkv(3, b, t, hkv, valid=valid)
    keep = jnp.asarray(rng.random((b, hkv, t)) > 0.5, jnp.float32)
    whole = gated_attention(q, kv, pos, keep)
    chunked = gated_attention(q, kv, pos, keep, causal_aligned=True, chunk=16)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), rtol=1e-6, atol=1e-6)  # summation order
    grads = [jax.grad(lambda w, c=c: jnp.sum(gated_attention(q, kv, pos, w, causal_aligned=c, chunk=16) ** 2))(keep)
             for c in (False, True)]
    np.testing.assert_allclose(np.asarray(grads[1]), np.asarray(grads[0]), rtol=1e-5, atol=1e-5)


# ---- local window and prefill="dense" ------------------------------------------------------------------------------


def test_local_window_matches_a_dense_reference():
    """Query ``i`` sees key ``j`` when ``keep[j]`` or ``0 <= i - j <= window``; queries before ``open_before`` see
    every key: the same as dense attention under that explicit boolean mask."""
    b, t, hkv, g, d = 2, 12, 2, 2, 8
    rng, q, k, v, pos, kv = random_qkv(4, b, t, hkv, g, d)
    keep = rng.random((b, hkv, t)) > 0.6
    for window, open_before in ((3, 0), (0, 5), (2, 7)):
        out = gated_attention(q, kv, pos, jnp.asarray(keep, jnp.float32), window=window, open_before=open_before)
        i, j = np.arange(t)[:, None], np.arange(t)[None, :]
        seen = (j <= i) & (keep[:, :, None, :] | ((i - j) <= window) | (i < open_before))  # [B, Hkv, T, S]
        qh = np.asarray(q).reshape(b, t, hkv, g, d)
        logits = np.einsum("bthgd,bshd->bhgts", qh, np.asarray(k)) / np.sqrt(d)
        logits = np.where(seen[:, :, None], logits, -np.inf)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        want = np.einsum("bhgts,bshd->bthgd", probs, np.asarray(v)).reshape(b, t, hkv * g, d)
        np.testing.assert_allclose(np.asarray(out), want, atol=1e-5)


def test_masked_prefill_with_a_local_window_equals_the_full_forward(base):
    """The local window's last tokens are kept at prefill, so the compacted cache gives the full forward's next
    logits; and the window really keeps more than the flags alone."""
    x = tokens(b=2, t=14, seed=3)
    lengths = []
    for window in (0, 4):
        m, p = gated(base, AttentionGate(init_bias=0.0, local_window=window), seed=2, wo_scale=100.0)
        full = m.forward(p, x)
        cache = m.init_cache(2, 32)
        logits, cache = m.apply(p, x[:, :-1], cache=cache)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(full.logits[:, :-1]), atol=1e-5)
        step, cache = m.apply(p, x[:, -1:], cache=cache)
        np.testing.assert_allclose(np.asarray(step[:, 0]), np.asarray(full.logits[:, -1]), atol=1e-5)
        pos = np.asarray(cache.pos)  # [L, B, Hkv, S]: the window's 4 last prompt tokens (9..12) are all there
        if window:
            assert all(((pos == p_).sum(-1) == 1).all() for p_ in range(13 - window, 13))
        lengths.append(np.asarray(cache.length).sum())
    assert lengths[1] > lengths[0]


def test_dense_prefill_full_forward_equals_prefill_compaction_continuation(base):
    """prefill="dense": the training forward (prompt of ``prompt_len`` tokens attended densely, the continuation
    seeing only the kept prompt entries) equals a dense prefill + compaction + teacher-forced continuation."""
    c, t = 10, 16
    gate = AttentionGate(init_bias=0.0, prefill="dense", prompt_len=c, local_window=2)
    m, p = gated(base, gate, seed=2, wo_scale=100.0)
    x = tokens(b=2, t=t, seed=11)
    full = m.forward(p, x)
    keep = np.asarray(full.aux["gate_keep"])  # over the prompt's tokens only
    assert np.all((keep > 0.3) & (keep < 0.99)) and keep.min() < 0.8, keep
    model, params = base
    dense = model.forward(params, x)
    # the prompt is the base model's; the continuation is not (some of the prompt is evicted for it)
    np.testing.assert_allclose(np.asarray(full.logits[:, :c]), np.asarray(dense.logits[:, :c]), atol=1e-5)
    assert not np.allclose(np.asarray(full.logits[:, c:]), np.asarray(dense.logits[:, c:]), atol=1e-3)
    cache = m.init_cache(2, 32)
    logits, cache = m.apply(p, x[:, :c], cache=cache)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(dense.logits[:, :c]), atol=1e-5)
    assert np.asarray(cache.length).sum() < 0.95 * np.asarray(cache.length).size * c
    rest, _ = m.apply(p, x[:, c:], cache=cache)
    np.testing.assert_allclose(np.asarray(rest), np.asarray(full.logits[:, c:]), atol=1e-5)


def test_dense_prefill_gate_reads_the_whole_prompt_but_not_the_continuation(base):
    """The gate of prefill="dense" is bidirectional over the prompt (a later prompt token changes earlier flags) and
    nothing after the prompt reaches the prompt's flags or the continuation's earlier logits."""
    c, t = 8, 14
    m, p = gated(base, AttentionGate(init_bias=0.0, prefill="dense", prompt_len=c), seed=2, wo_scale=100.0)
    x = tokens(b=1, t=t, seed=5)
    gate = m.methods[0]

    def flags(x):
        out = m.forward(p, x)
        return out, np.asarray(out.aux["gate_keep"])

    a, ka = flags(x)
    b_, kb = flags(x.at[0, c - 1].set((x[0, c - 1] + 7) % VOCAB))  # the prompt's last token
    assert not np.allclose(ka, kb)  # earlier prompt tokens' flags read it
    d, kd = flags(x.at[0, c + 2].set((x[0, c + 2] + 7) % VOCAB))  # a continuation token
    np.testing.assert_array_equal(ka, kd)
    np.testing.assert_allclose(np.asarray(a.logits[:, :c + 2]), np.asarray(d.logits[:, :c + 2]), atol=1e-6)
    assert gate.dense_prefill


def test_dense_prefill_errors_name_the_field(base):
    with pytest.raises(ConfigError, match="AttentionGate.prefill"):
        AttentionGate(prefill="sometimes")
    with pytest.raises(ConfigError, match="AttentionGate.prompt_len"):
        AttentionGate(prompt_len=8)  # only with prefill="dense"
    with pytest.raises(ConfigError, match="AttentionGate.local_window"):
        AttentionGate(local_window=-1)
    with pytest.raises(ConfigError, match="AttentionGate.evict_loss"):
        AttentionGate(evict_loss="l1")
    m, p = gated(base, AttentionGate(prefill="dense"))
    with pytest.raises(ValueError, match="AttentionGate.prompt_len: expected the prompt length"):
        m.forward(p, tokens())
    m, p = gated(base, AttentionGate(prefill="dense", prompt_len=12))
    with pytest.raises(ValueError, match="expected fewer than the 12 tokens"):
        m.forward(p, tokens(t=12))


def test_dense_prefill_ragged_prompts_keep_their_budget_and_window(base):
    gate = AttentionGate(init_bias=0.0, keep_ratio=0.5, prefill="dense", local_window=4)
    m, p = gated(base, gate, seed=2, wo_scale=100.0)
    prompts = [np.arange(1, 40) % VOCAB, np.arange(5, 22) % VOCAB]
    logits, cache = prefill(m, p, prompts, max_new_tokens=4)
    n = np.array([39, 17])
    kept = np.asarray(cache.length)  # [L, B, Hkv]
    np.testing.assert_array_equal(kept, np.broadcast_to(np.ceil(0.5 * n).astype(int)[None, :, None], kept.shape))
    pos = np.asarray(cache.pos)
    for row, length in enumerate(n):  # the sink and each row's own last 4 prompt tokens, in every (layer, head)
        for want in (0, *range(length - 4, length)):
            assert ((pos[:, row] == want).sum(-1) == 1).all(), (row, want)
    # the prompt was attended densely: the last logits are the base model's
    model, params = base
    dense_logits, _ = prefill(model, params, prompts, max_new_tokens=4)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(dense_logits), atol=1e-5)
