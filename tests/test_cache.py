"""KV cache oracles: ``append_kv`` slot semantics, ``truncate`` as exact rollback of speculative tokens, and
attention over rows compacted by an eviction policy equal to dense attention with the evicted positions masked."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import forward, forward_cache, tiny_model

from jaxeff import Hooks, KVCache, LayerKV
from jaxeff.attention.dense import dense_attention
from jaxeff.cache import append_kv, compact_kv

VOCAB, CAP = 64, 16


@pytest.fixture(scope="module")
def model_params():
    return tiny_model()


# ---- append_kv ----------------------------------------------------------------------------------------------


def _append_oracle(k, v, pos, length, new_k, new_v, positions, valid):
    """Slot-by-slot numpy version of ``append_kv`` (row layout ``[B, Hkv, S, ...]``, new tokens ``[B, T, Hkv, D]``)."""
    k, v, pos, length = k.copy(), v.copy(), pos.copy(), length.copy()
    b_, h_, s_ = pos.shape
    for b in range(b_):
        for h in range(h_):
            slot = length[b, h]
            for t in range(new_k.shape[1]):
                if slot < s_:  # beyond capacity: dropped, never written over another slot
                    k[b, h, slot], v[b, h, slot] = new_k[b, t, h], new_v[b, t, h]
                    pos[b, h, slot] = positions[b, t] if valid[b, t] else -1
                slot += 1
            length[b, h] = min(length[b, h] + valid[b].sum(), s_)
    return k, v, pos, length


def test_append_kv_per_row_lengths_capacity_and_padding():
    rng = np.random.default_rng(0)
    b, h, s, d, t = 2, 3, 6, 4, 3
    # rows at different fill levels, including full-but-one (5) and full (6)
    length = np.array([[0, 2, 5], [3, 6, 1]], np.int32)
    pos = np.where(np.arange(s) < length[..., None], np.arange(s), -1).astype(np.int32)
    k = rng.standard_normal((b, h, s, d)).astype(np.float32) * (pos >= 0)[..., None]
    v = rng.standard_normal((b, h, s, d)).astype(np.float32) * (pos >= 0)[..., None]
    new_k = rng.standard_normal((b, t, h, d)).astype(np.float32)
    new_v = rng.standard_normal((b, t, h, d)).astype(np.float32)
    positions = np.array([[6, 7, 8], [6, 7, 8]], np.int32)
    valid = np.array([[True, True, True], [True, False, False]])  # sequence 1 is right-padded

    got = jax.jit(append_kv)(LayerKV(k=k, v=v, pos=pos, length=length), new_k, new_v, positions, valid)
    want = _append_oracle(k, v, pos, length, new_k, new_v, positions, valid)
    for name, g, w in zip(("k", "v", "pos", "length"), (got.k, got.v, got.pos, got.length), want):
        np.testing.assert_array_equal(np.asarray(g), w, err_msg=name)
    # spelled out for the cases that matter:
    np.testing.assert_array_equal(got.length, [[3, 5, 6], [4, 6, 2]])
    np.testing.assert_array_equal(got.pos[0, 2], [0, 1, 2, 3, 4, 6])  # 7 and 8 did not fit: dropped
    np.testing.assert_array_equal(got.k[1, 1], k[1, 1])  # a full row is left untouched
    np.testing.assert_array_equal(got.pos[1, 0], [0, 1, 2, 6, -1, -1])  # the pads hold pos -1 past the length

    # the next append overwrites the pad slots: pads never advanced the length
    again = jax.jit(append_kv)(got, new_k[:, :1], new_v[:, :1], np.array([[9], [7]], np.int32), np.ones((b, 1), bool))
    np.testing.assert_array_equal(again.pos[1, 0], [0, 1, 2, 6, 7, -1])
    np.testing.assert_array_equal(again.k[1, 0, 4], new_k[1, 0, 0])


def test_create_rejects_bad_capacity():
    with pytest.raises(ValueError, match="capacity.*got 0"):
        KVCache.create(2, 1, 2, 0, 8)


# ---- truncate: exact rollback ------------------------------------------------------------------------------


def test_truncate_then_redecode_equals_never_decoding_rejected_tokens(model_params):
    """Two rounds of "verify a block of 3 guessed tokens, keep a per-sequence prefix, roll back the rest" (what
    speculative and Jacobi decoding do), then plain decoding. Every logit computed from accepted tokens equals the
    full forward of the accepted sequence, and the final cache equals one that never saw the rejected tokens."""
    model, params = model_params
    rng = np.random.default_rng(1)
    prompt_len, block, b = 6, 3, 2
    truth = rng.integers(0, VOCAB, size=(b, CAP)).astype(np.int32)  # the sequence that survives
    accepted = [np.array([1, 0]), np.array([3, 2])]  # tokens kept from each block, per sequence
    ones = lambda n: jnp.ones((b, n), bool)

    cache = model.init_cache(b, CAP)
    logits, cache = forward_cache(model, params, jnp.asarray(truth[:, :prompt_len]), cache, ones(prompt_len))
    logits = np.asarray(logits)
    got = {(i, p): logits[i, p] for i in range(b) for p in range(prompt_len)}  # (sequence, position) -> logits
    n = np.full(b, prompt_len)
    for acc in accepted:
        guess = np.stack([truth[i, n[i]:n[i] + block] for i in range(b)])
        for i in range(b):  # the rejected guesses are wrong tokens
            guess[i, acc[i]:] = (guess[i, acc[i]:] + 1 + rng.integers(0, VOCAB - 1, block - acc[i])) % VOCAB
        logits, cache = forward_cache(model, params, jnp.asarray(guess), cache, ones(block))
        logits = np.asarray(logits)
        np.testing.assert_array_equal(np.asarray(cache.next_pos), n + block)
        for i in range(b):
            for j in range(acc[i]):  # logits at an accepted token depend only on accepted tokens
                got[i, n[i] + j] = logits[i, j]
        n = n + acc
        cache = jax.jit(KVCache.truncate)(cache, jnp.asarray(n, jnp.int32))
        np.testing.assert_array_equal(np.asarray(cache.length[:, :, 0]), np.broadcast_to(n, (2, b)))
    for _ in range(2):
        step = truth[np.arange(b), n][:, None]
        logits, cache = forward_cache(model, params, jnp.asarray(step), cache, ones(1))
        logits = np.asarray(logits)
        for i in range(b):
            got[i, n[i]] = logits[i, 0]
        n = n + 1

    reference = np.asarray(forward(model, params, jnp.asarray(truth)))
    for (i, p), lg in got.items():
        np.testing.assert_allclose(lg, reference[i, p], atol=2e-5, rtol=2e-5, err_msg=f"seq {i} pos {p}")
    assert len(got) == sum(n)

    # the cache equals one filled directly with the surviving tokens (right-padded prefill)
    direct = model.init_cache(b, CAP)
    mask = np.arange(CAP)[None, :] < n[:, None]
    _, direct = forward_cache(model, params, jnp.asarray(truth), direct, jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(cache.next_pos), np.asarray(direct.next_pos))
    np.testing.assert_array_equal(np.asarray(cache.length), np.asarray(direct.length))
    np.testing.assert_array_equal(np.asarray(cache.pos), np.asarray(direct.pos))
    filled = np.asarray(cache.pos >= 0)[..., None]
    np.testing.assert_allclose(np.asarray(cache.k) * filled, np.asarray(direct.k) * filled, atol=2e-5)
    np.testing.assert_allclose(np.asarray(cache.v) * filled, np.asarray(direct.v) * filled, atol=2e-5)


# ---- attention over compacted (evicted) rows ----------------------------------------------------------------


def _masked_attention_oracle(q, k, v, kv_pos, allowed_pos, q_pos, window=None):
    """numpy GQA attention. q ``[B, T, Hq, D]``; k, v ``[B, Hkv, S, D]`` holding positions ``kv_pos`` (-1 empty);
    allowed_pos ``[B, Hkv, S]`` bool (False: evicted). A query with nothing to attend to gives zeros."""
    b_, t_, hq, d = q.shape
    hkv = k.shape[1]
    out = np.zeros((b_, t_, hq, v.shape[-1]))
    for b in range(b_):
        for t in range(t_):
            for h in range(hq):
                g = h // (hq // hkv)
                ok = allowed_pos[b, g] & (kv_pos[b, g] >= 0) & (kv_pos[b, g] <= q_pos[b, t])
                if window is not None:
                    ok &= q_pos[b, t] - kv_pos[b, g] < window
                if not ok.any():
                    continue
                s = (k[b, g, ok] @ q[b, t, h]) / np.sqrt(d)
                p = np.exp(s - s.max())
                out[b, t, h] = (p / p.sum()) @ v[b, g, ok]
    return out


@pytest.mark.parametrize("window", [None, 5])
def test_attention_over_compacted_rows_equals_masked_dense_attention(window):
    rng = np.random.default_rng(2)
    b, hkv, g, cap, n, d = 2, 2, 2, 12, 10, 8  # 10 tokens cached at positions 0..9, capacity 12
    k = rng.standard_normal((b, hkv, cap, d)).astype(np.float32)
    v = rng.standard_normal((b, hkv, cap, d)).astype(np.float32)
    pos = np.broadcast_to(np.where(np.arange(cap) < n, np.arange(cap), -1), (b, hkv, cap)).astype(np.int32)
    kv = LayerKV(k=k, v=v, pos=pos, length=np.full((b, hkv), n, np.int32))
    keep = rng.random((b, hkv, cap)) < 0.5  # a different subset for every (sequence, head)
    keep[0, 0, :n] = [1, 0, 0, 0, 0, 0, 0, 0, 0, 1]  # extremes: almost everything evicted ...
    keep[1, 1, :n] = True  # ... and nothing evicted
    compacted = jax.jit(compact_kv)(kv, keep)

    n_kept = (keep & (pos >= 0)).sum(-1)
    np.testing.assert_array_equal(compacted.length, n_kept)
    for i in range(b):
        for h in range(hkv):  # kept entries at the front, in order, with their own positions and keys
            idx = np.flatnonzero(keep[i, h] & (pos[i, h] >= 0))
            np.testing.assert_array_equal(compacted.pos[i, h, : len(idx)], idx)
            assert np.all(np.asarray(compacted.pos[i, h, len(idx):]) == -1)
            np.testing.assert_array_equal(compacted.k[i, h, : len(idx)], k[i, h, idx])
    assert not np.array_equal(np.asarray(compacted.k), k)  # it did move entries

    q = rng.standard_normal((b, 3, hkv * g, d)).astype(np.float32)
    q_pos = np.array([[0, 6, 9], [4, 9, 9]], np.int32)
    got = jax.jit(dense_attention, static_argnames="sliding_window")(q, compacted, q_pos, sliding_window=window)
    want = _masked_attention_oracle(q, k, v, pos, keep, q_pos, window)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    # the eviction must matter for the comparison to mean anything
    assert np.abs(want - _masked_attention_oracle(q, k, v, pos, pos >= 0, q_pos, window)).max() > 1e-2


@dataclasses.dataclass(frozen=True)
class CompactingEviction:
    """After every step, compacts each layer's rows to the positions not flagged in the method parameter
    ``layers/evict`` ``[L, B, Hkv, P]`` (1.0 = evict position p)."""

    name: str = "evict"

    def init(self, rng, config):
        return {}

    def wrap(self, hooks: Hooks) -> Hooks:
        inner = hooks.kv_compress

        def kv_compress(kv, q, ctx):
            kv = inner(kv, q, ctx)
            return compact_kv(kv, ~_evicted(kv.pos, ctx.method_params[self.name]["evict"]))

        return hooks.replace(kv_compress=kv_compress)


@dataclasses.dataclass(frozen=True)
class MaskingEviction:
    """The oracle of ``CompactingEviction``: keeps every entry, and decode-time attention ignores the flagged
    positions (prefill attention runs before the compaction, so it sees them)."""

    name: str = "evict"

    def init(self, rng, config):
        return {}

    def wrap(self, hooks: Hooks) -> Hooks:
        inner = hooks.attention

        def attention(q, kv, ctx):
            if ctx.mode == "decode":
                kv = kv.replace(pos=jnp.where(_evicted(kv.pos, ctx.method_params[self.name]["evict"]), -1, kv.pos))
            return inner(q, kv, ctx)

        return hooks.replace(attention=attention)


def _evicted(pos, evict):
    """``[B, Hkv, S]`` bool: slot holds a position flagged in ``evict`` ``[B, Hkv, P]``."""
    flagged = jnp.take_along_axis(evict, jnp.clip(pos, 0, evict.shape[-1] - 1), axis=-1) > 0
    return flagged & (pos >= 0) & (pos < evict.shape[-1])


def test_model_decoding_over_compacted_cache_equals_masked_attention(model_params):
    """End to end through the hooks: a cache whose rows were compacted after the prefill decodes exactly like a
    full cache whose evicted positions are masked, though new tokens land at the lowered lengths."""
    model, params = model_params
    rng = np.random.default_rng(3)
    b, prompt_len = 2, 8
    evict = (rng.random((model.config.num_layers, b, model.config.num_kv_heads, prompt_len)) < 0.4)
    evict[..., -1] = False  # the last prompt token stays (a common policy choice; not needed for exactness)
    mparams = {**params, "methods": {"evict": {"layers": {"evict": jnp.asarray(evict, jnp.float32)}}}}
    tokens = jnp.asarray(rng.integers(0, VOCAB, size=(b, prompt_len + 4)), jnp.int32)
    results = {}
    for method in (CompactingEviction(), MaskingEviction()):
        m = model.with_methods(method)
        cache = m.init_cache(b, CAP)
        logits, cache = forward_cache(m, mparams, tokens[:, :prompt_len], cache, jnp.ones((b, prompt_len), bool))
        steps = [logits]
        for t in range(prompt_len, tokens.shape[1]):
            logits, cache = forward_cache(m, mparams, tokens[:, t:t + 1], cache, jnp.ones((b, 1), bool))
            steps.append(logits)
        results[method.__class__.__name__] = (jnp.concatenate(steps, axis=1), cache)
    got, cache = results["CompactingEviction"]
    want, full_cache = results["MaskingEviction"]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
    total = prompt_len + 4
    np.testing.assert_array_equal(np.asarray(cache.length), total - evict.sum(-1))
    np.testing.assert_array_equal(np.asarray(full_cache.length), total)
    np.testing.assert_array_equal(np.asarray(cache.next_pos), total)  # eviction does not change positions
    reference = np.asarray(forward(model, params, tokens))
    assert np.abs(np.asarray(got)[:, prompt_len:] - reference[:, prompt_len:]).max() > 1e-2  # eviction mattered
    np.testing.assert_allclose(np.asarray(got)[:, :prompt_len], reference[:, :prompt_len], atol=2e-5, rtol=2e-5)
