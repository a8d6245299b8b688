"""Decoder LM oracles: incremental decoding through the KV cache equals the full forward pass, the layer stack's
compilation choices (scan/loop, remat) and MoE implementations agree, the hooks really drive the base model,
RoPE matches transformers, and bad inputs/configs fail clearly."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff import DecoderLM, Hooks, LayerContext, LMConfig, RopeScaling, RouterOutput
from jaxeff.config import ConfigError
from jaxeff.models.hooks import topk_router
from jaxeff.models.layers import apply_rope, rope_cos_sin, rope_inv_freq
from jaxeff.models.moe import moe_ffn
from jaxeff.sharding import DEFAULT_RULES

# LLVM optimisation buys nothing for these tiny programs and halves their compile time.
FAST = {"xla_backend_optimization_level": 0}
B, T, CAP = 2, 12, 16
VOCAB = 64


def tiny_config(**overrides) -> LMConfig:
    # initializer_range 0.2 (not 0.02) so logits are O(1): a wrong mask or a dropped term changes them visibly.
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
              initializer_range=0.2)
    kw.update(overrides)
    return LMConfig(**kw)


def randomized(model: DecoderLM, seed: int) -> dict:
    """Parameters shaped like ``model.init``'s, drawn with numpy (no compilation): kernels normal(0,
    initializer_range), and norm scales and biases random too, since at their initial 1 / 0 a bug in how they are
    applied would be invisible."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    std = model.config.initializer_range

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        name = str(getattr(path[-1], "key", ""))
        value = 1.0 + 0.3 * noise if name == "scale" else 0.3 * noise if name == "bias" else std * noise
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _forward(model, params, tokens):
    return model.apply(params, tokens)


def _forward_cache(model, params, tokens, cache, mask):
    out = model.forward(params, tokens, cache=cache, attention_mask=mask)
    return out.logits, out.cache


def _forward_aux(model, params, tokens):
    out = model.forward(params, tokens)
    return out.logits, out.aux


def _loss_and_grad(model, params, tokens):
    """Next-token cross-entropy; returns ``((loss, logits [B, T, V]), grads)``."""

    def loss_fn(p):
        logits = model.apply(p, tokens)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)
        return jnp.mean(nll), logits

    return jax.value_and_grad(loss_fn, has_aux=True)(params)


forward = jax.jit(_forward, static_argnums=0, compiler_options=FAST)
forward_cache = jax.jit(_forward_cache, static_argnums=0, compiler_options=FAST)
forward_aux = jax.jit(_forward_aux, static_argnums=0, compiler_options=FAST)
loss_and_grad = jax.jit(_loss_and_grad, static_argnums=0, compiler_options=FAST)
forward_logits_at = jax.jit(
    lambda model, params, tokens, idx: model.forward(params, tokens, logits_at=idx).logits,
    static_argnums=0, compiler_options=FAST,
)


def assert_close(actual, expected, tol=2e-5, err_msg=""):
    """Elementwise ``|a - e| <= tol * (1 + max|e|)``: one tolerance relative to the scale of the whole array."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = 1.0 + np.max(np.abs(expected), initial=0.0)
    err = np.max(np.abs(actual - expected), initial=0.0)
    assert err <= tol * scale, f"{err_msg} max abs error {err:.3g} > {tol:.1g} * {scale:.3g}"


def assert_trees_close(actual, expected, tol=2e-5):
    flat_a = jax.tree_util.tree_flatten_with_path(actual)[0]
    flat_e = jax.tree.leaves(expected)
    assert len(flat_a) == len(flat_e)
    for (path, a), e in zip(flat_a, flat_e):
        assert_close(a, e, tol, err_msg=jax.tree_util.keystr(path))


CONFIGS = {
    "dense_gqa": tiny_config(),
    "moe": tiny_config(num_experts=4, num_experts_per_tok=2, architecture="mixtral"),
    # MHA with Qwen2-style qkv bias, tied embeddings and a window (4) much shorter than the sequence (12).
    "mha_bias_tied_window": tiny_config(num_kv_heads=4, qkv_bias=True, tie_embeddings=True, sliding_window=4),
}


@pytest.fixture(scope="module")
def models():
    """{name: (model, params)} for ``CONFIGS``."""
    out = {}
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        model = DecoderLM(cfg)
        out[name] = (model, randomized(model, seed=i))
    return out


@pytest.fixture(scope="module")
def tokens():
    """``[B, T]`` random ids."""
    return jax.random.randint(jax.random.key(7), (B, T), 0, VOCAB, dtype=jnp.int32)


def _decode_logits(model, params, tokens, chunks):
    """Feeds ``tokens`` through the cache in the given chunk lengths (the rest one token at a time) and returns
    the concatenated logits ``[B, T, V]``."""
    cache = model.init_cache(tokens.shape[0], CAP)
    ones = lambda n: jnp.ones((tokens.shape[0], n), bool)  # noqa: E731
    outs, start = [], 0
    for n in list(chunks) + [1] * (tokens.shape[1] - sum(chunks)):
        logits, cache = forward_cache(model, params, tokens[:, start:start + n], cache, ones(n))
        outs.append(logits)
        start += n
    assert int(cache.next_pos[0]) == tokens.shape[1]
    return jnp.concatenate(outs, axis=1), cache


# ---- the cache reproduces the full forward pass -------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_then_decode_equals_full_forward(models, tokens, name):
    model, params = models[name]
    full = forward(model, params, tokens)
    incremental, cache = _decode_logits(model, params, tokens, chunks=[5])
    assert_close(incremental, full, err_msg=name)
    np.testing.assert_array_equal(np.asarray(cache.length), T)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_chunked_prefill_equals_full_forward(models, tokens, name):
    model, params = models[name]
    full = forward(model, params, tokens)
    incremental, _ = _decode_logits(model, params, tokens, chunks=[5, 3])
    assert_close(incremental, full, err_msg=name)


def test_sliding_window_changes_the_result(models, tokens):
    """Guards the window test above: the window must actually cut off context at this sequence length."""
    model, params = models["mha_bias_tied_window"]
    unwindowed = DecoderLM(dataclasses.replace(model.config, sliding_window=None))
    a, b = forward(model, params, tokens), forward(unwindowed, params, tokens)
    assert_close(a[:, :4], b[:, :4])  # the first 4 positions see everything either way
    # position 4 is the first to lose a token (window 4: keys at q - 3 .. q, as Mistral/transformers count)
    assert np.min(np.max(np.abs(np.asarray(a[:, 4:] - b[:, 4:])), axis=-1)) > 1e-3


def test_right_padded_batch_equals_each_prompt_alone(models):
    """Prompts of lengths 7 and 4, right-padded to 8, prefilled together and then decoded for 3 steps, give the
    logits each sequence gets unpadded. The unpadded oracle is the causal full forward of the sequence (ids after
    it cannot influence it)."""
    model, params = models["dense_gqa"]
    rng = np.random.default_rng(0)
    lengths = [7, 4]
    seqs = [rng.integers(1, VOCAB, size=n + 3) for n in lengths]  # prompt + 3 decoded ids
    padded = np.zeros((2, 8), np.int32)
    for i, n in enumerate(lengths):
        padded[i, :n] = seqs[i][:n]
        padded[i, n:] = rng.integers(1, VOCAB, size=8 - n)  # junk under the mask must not matter
    mask = np.arange(8)[None, :] < np.array(lengths)[:, None]
    cache = model.init_cache(2, CAP)
    prefill_logits, cache = forward_cache(model, params, jnp.asarray(padded), cache, jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(cache.next_pos), lengths)
    np.testing.assert_array_equal(np.asarray(cache.length[0, :, 0]), lengths)
    step_logits = []
    for s in range(3):
        step = np.array([[seqs[i][lengths[i] + s]] for i in range(2)], np.int32)
        logits, cache = forward_cache(model, params, jnp.asarray(step), cache, jnp.ones((2, 1), bool))
        step_logits.append(np.asarray(logits[:, 0]))

    alone = np.zeros((2, T), np.int32)
    for i, s in enumerate(seqs):
        alone[i, : len(s)] = s
    reference = np.asarray(forward(model, params, jnp.asarray(alone)))
    for i, n in enumerate(lengths):
        assert_close(prefill_logits[i, :n], reference[i, :n], err_msg=f"prompt {i}")
        for s in range(3):
            assert_close(step_logits[s][i], reference[i, n + s], err_msg=f"prompt {i} step {s}")


def test_logits_at_equals_slicing_full_logits(models, tokens):
    model, params = models["dense_gqa"]
    idx = jnp.array([3, 11], jnp.int32)
    at = forward_logits_at(model, params, tokens, idx)
    assert at.shape == (B, 1, VOCAB)
    full = forward(model, params, tokens)
    assert_close(at[:, 0], full[jnp.arange(B), idx])


# ---- compilation choices and numerics -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_grads(models, tokens):
    model, params = models["dense_gqa"]
    return loss_and_grad(model, params, tokens)


def _equations(jaxpr):
    """Every equation of ``jaxpr``, recursing into sub-jaxprs (scan bodies, remat, pjit)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    yield from _equations(sub)


@pytest.mark.parametrize(
    "change", [dict(scan_layers=False, remat="full"), dict(remat="dots")], ids=["loop_remat_full", "scan_remat_dots"]
)
def test_layer_stack_variants_give_same_logits_and_grads(models, tokens, reference_grads, change):
    """``scan_layers`` / ``remat`` change how the stack is compiled, never what it computes (same param layout).
    The reference is scan without remat; the Python loop is checked with full remat (two compilations fewer than
    every combination, and each variant differs from the reference)."""
    model, params = models["dense_gqa"]
    assert model.config.scan_layers and model.config.remat == "none"
    (loss0, logits0), grads0 = reference_grads
    variant = DecoderLM(dataclasses.replace(model.config, **change))
    # remat changes no value, so check that the layer really is rematerialised, with the configured policy
    policies = [repr(e.params["policy"]) for e in _equations(jax.make_jaxpr(variant.apply)(params, tokens).jaxpr)
                if e.primitive.name in ("remat", "remat2", "checkpoint")]
    assert len(policies) == (model.config.num_layers if not variant.config.scan_layers else 1), policies
    expected_policy = "nothing_saveable" if change["remat"] == "full" else "Dots"
    assert all(expected_policy in p for p in policies), policies
    (loss, logits), grads = loss_and_grad(variant, params, tokens)
    assert_close(logits, logits0)
    assert_close(loss, loss0)
    assert_trees_close(grads, grads0, tol=1e-5)
    # the per-layer gradients must differ between layers, or a stack that reused one layer would pass
    q = np.asarray(grads["layers"]["attn"]["q"]["kernel"])
    assert np.max(np.abs(q[0] - q[1])) > 1e-3 * np.max(np.abs(q))


def test_bfloat16_compute_is_close_to_float32(models, tokens):
    model, params = models["dense_gqa"]
    bf16 = DecoderLM(dataclasses.replace(model.config, dtype="bfloat16"))
    logits = forward(bf16, params, tokens)
    assert logits.dtype == jnp.float32  # the LM head accumulates in float32 whatever the compute dtype
    ref = np.asarray(forward(model, params, tokens))
    got = np.asarray(logits)
    assert np.all(np.isfinite(got))
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < 0.05, f"bf16 logits relative error {rel:.3g}"
    assert rel > 0, "bf16 compute should not be bit-identical to float32 (was the dtype ignored?)"


@jax.jit(static_argnums=0, compiler_options=FAST)
def moe_ffn_and_grads(cfg, x, p, cotangent):
    """One MoE feed-forward ``[B, T, d] -> [B, T, d]`` and the gradients of ``sum(y * cotangent)`` with respect to
    the input and every MoE parameter (router included, through the top-k weights)."""
    b, t, _ = x.shape
    ctx = LayerContext(config=cfg, layer=0, hidden=None, positions=jnp.zeros((b, t), jnp.int32),
                       token_valid=jnp.ones((b, t), bool), mode="train", method_params={})
    f = lambda x, p: moe_ffn(x, p, ctx, topk_router)  # noqa: E731
    return f(x, p), jax.grad(lambda x, p: jnp.sum(f(x, p) * cotangent), argnums=(0, 1))(x, p)


def test_moe_ragged_equals_dense(models, tokens):
    model, params = models["moe"]
    cfg = model.config
    assert cfg.moe_impl == "ragged"
    dense_cfg = dataclasses.replace(cfg, moe_impl="dense")
    assert_close(forward(model, params, tokens), forward(DecoderLM(dense_cfg), params, tokens))
    # Gradients on one MoE layer: the rest of the backward pass is shared by both implementations.
    p = jax.tree.map(lambda a: a[0], params["layers"]["moe"])
    kx, kc = jax.random.split(jax.random.key(11))
    x = jax.random.normal(kx, (B, T, cfg.hidden_size))
    cotangent = jax.random.normal(kc, (B, T, cfg.hidden_size))
    y_r, grads_r = moe_ffn_and_grads(cfg, x, p, cotangent)
    y_d, grads_d = moe_ffn_and_grads(dense_cfg, x, p, cotangent)
    assert_close(y_r, y_d)
    assert_trees_close(grads_r, grads_d, tol=1e-5)
    # every expert must receive gradient, or the comparison would not cover the routing of all of them
    g = np.abs(np.asarray(grads_r[1]["up"]["kernel"])).sum(axis=(1, 2))  # [E]
    assert np.all(g > 0), g
    assert np.abs(np.asarray(grads_r[1]["router"]["kernel"])).max() > 0


@dataclasses.dataclass(frozen=True)
class NullSlotRouter:
    """Wraps the router so that slot 1 of every third token is switched off: routed to the null expert id
    ``num_experts`` when the parameter ``null`` is 1, or (the oracle) kept on its real expert with weight zero when
    it is 0. A parameter rather than a field, so both variants share one compiled program."""

    name: str = "null_slot"

    def init(self, rng, config):
        return {"null": jnp.ones(())}

    def wrap(self, hooks: Hooks) -> Hooks:
        inner = hooks.router

        def router(x, kernel, ctx):
            r = inner(x, kernel, ctx)
            off = (jnp.arange(x.shape[0]) % 3 == 0)[:, None] & (jnp.arange(r.experts.shape[1]) == 1)[None, :]
            null = ctx.method_params[self.name]["null"] > 0
            return RouterOutput(weights=jnp.where(off & ~null, 0.0, r.weights),
                                experts=jnp.where(off & null, ctx.config.num_experts, r.experts), probs=r.probs)

        return hooks.replace(router=router)


def test_null_expert_slots_contribute_nothing(models, tokens):
    model, params = models["moe"]
    cfg = model.config
    ragged = DecoderLM(cfg).with_methods(NullSlotRouter())
    dense = DecoderLM(dataclasses.replace(cfg, moe_impl="dense")).with_methods(NullSlotRouter())
    null_ids = {**params, "methods": {"null_slot": {"null": jnp.ones(())}}}
    zero_weights = {**params, "methods": {"null_slot": {"null": jnp.zeros(())}}}
    expected, aux_zero = forward_aux(dense, zero_weights, tokens)
    got_ragged, aux = forward_aux(ragged, null_ids, tokens)
    assert_close(got_ragged, expected, err_msg="ragged")
    assert_close(forward_aux(dense, null_ids, tokens)[0], expected, err_msg="dense")
    assert_close(forward_aux(ragged, zero_weights, tokens)[0], expected, err_msg="ragged, zero weights")
    base = forward(model, params, tokens)
    assert np.max(np.abs(np.asarray(expected - base))) > 1e-3, "switching slots off should change the output"
    # the expert load counts only real assignments: N tokens * k slots, minus the nulled ones
    n = B * T
    nulled = len(range(0, n, 3))
    load = np.asarray(aux["moe_expert_load"])
    assert load.shape == (cfg.num_layers, cfg.num_experts)
    np.testing.assert_allclose(load.sum(axis=1), n * cfg.num_experts_per_tok - nulled)
    np.testing.assert_allclose(np.asarray(aux_zero["moe_expert_load"]).sum(axis=1), n * cfg.num_experts_per_tok)


# ---- hooks and methods --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ScaleAttention:
    """Multiplies every layer's attention output by a constant."""

    factor: float
    name: str = "scale_attention"

    def init(self, rng, config):
        return {}

    def wrap(self, hooks: Hooks) -> Hooks:
        inner = hooks.attention
        return hooks.replace(attention=lambda q, kv, ctx: inner(q, kv, ctx) * self.factor)


@dataclasses.dataclass(frozen=True)
class LayerGain:
    """Multiplies layer l's attention output by ``layers/gain[l] * global_gain`` (parameters), and records the
    gain and layer index it saw."""

    name: str = "layer_gain"

    def init(self, rng, config):
        return {"layers": {"gain": jnp.ones((config.num_layers,))}, "global_gain": jnp.ones(())}

    def wrap(self, hooks: Hooks) -> Hooks:
        inner = hooks.attention

        def attention(q, kv, ctx):
            mp = ctx.method_params[self.name]
            ctx.record("gain_seen", mp["gain"])
            ctx.record("layer_seen", ctx.layer)
            return inner(q, kv, ctx) * (mp["gain"] * mp["global_gain"]).astype(q.dtype)

        return hooks.replace(attention=attention)


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "loop"])
def test_methods_wrap_attention_with_per_layer_params(models, tokens, scan_layers):
    """Attention output scaled by c_l equals the base model with layer l's output projection scaled by c_l
    (``o`` is linear, no bias): here c_l = 0.5 (ScaleAttention) * gain[l] * global_gain (LayerGain)."""
    model, params = models["dense_gqa"]
    base = DecoderLM(dataclasses.replace(model.config, scan_layers=scan_layers))
    wrapped = base.with_methods(ScaleAttention(0.5), LayerGain())
    mparams = jax.eval_shape(wrapped.init, jax.random.key(0))
    assert set(mparams) == set(params) | {"methods"}
    assert set(mparams["methods"]) == {"scale_attention", "layer_gain"}
    gain = jnp.array([-1.5, 3.0])
    p = {**params, "methods": {"scale_attention": {}, "layer_gain": {"layers": {"gain": gain},
                                                                      "global_gain": jnp.array(0.8)}}}
    logits, aux = forward_aux(wrapped, p, tokens)

    scaled = jax.tree.map(lambda x: x, params)
    c = 0.5 * gain * 0.8
    scaled["layers"]["attn"]["o"]["kernel"] = params["layers"]["attn"]["o"]["kernel"] * c[:, None, None, None]
    assert_close(logits, forward(base, scaled, tokens))
    np.testing.assert_allclose(np.asarray(aux["gain_seen"]), np.asarray(gain))  # stacked [L]
    np.testing.assert_array_equal(np.asarray(aux["layer_seen"]), [0, 1])


def test_method_params_do_not_touch_base_params():
    cfg = tiny_config()
    base = DecoderLM(cfg)
    wrapped = base.with_methods(LayerGain())
    p0, p1 = jax.jit(lambda k: (base.init(k), wrapped.init(k)), compiler_options=FAST)(jax.random.key(3))
    assert set(p1) == set(p0) | {"methods"}
    p1_base = {k: v for k, v in p1.items() if k != "methods"}
    assert jax.tree.structure(p1_base) == jax.tree.structure(p0)
    for a, b in zip(jax.tree.leaves(p1_base), jax.tree.leaves(p0)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # a checkpoint of the base loads unchanged
    assert p1["methods"]["layer_gain"]["layers"]["gain"].shape == (cfg.num_layers,)
    with pytest.raises(ValueError, match="distinct names"):
        wrapped.with_methods(LayerGain())


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(num_experts=4), dict(qkv_bias=True, o_bias=True, mlp_bias=True, tie_embeddings=True)],
    ids=["dense", "moe", "biases_tied"],
)
def test_param_axes_match_init(overrides):
    cfg = tiny_config(**overrides)
    model = DecoderLM(cfg).with_methods(LayerGain())
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    axes = model.param_axes()
    is_axes = lambda x: isinstance(x, tuple)  # noqa: E731
    assert jax.tree.structure(axes, is_leaf=is_axes) == jax.tree.structure(shapes)
    known = {name for name, _ in DEFAULT_RULES}
    for (path, ax), leaf in zip(jax.tree_util.tree_flatten_with_path(axes, is_leaf=is_axes)[0],
                                jax.tree.leaves(shapes)):
        assert len(ax) == leaf.ndim, (jax.tree_util.keystr(path), ax, leaf.shape)
        assert set(ax) - {None} <= known, (jax.tree_util.keystr(path), ax)
    base_count = sum(x.size for k, v in shapes.items() if k != "methods" for x in jax.tree.leaves(v))
    assert base_count == cfg.num_params()


# ---- RoPE against transformers ------------------------------------------------------------------------------


ROPE_CASES = {
    "default": (64, 10000.0, RopeScaling()),
    "linear": (32, 10000.0, RopeScaling(rope_type="linear", factor=4.0)),
    # Llama 3.1's published values: head_dim 64 spans all three frequency bands
    "llama3": (64, 500000.0, RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_max_position_embeddings=8192)),
    "llama3_small": (16, 10000.0, RopeScaling(rope_type="llama3", factor=2.0, low_freq_factor=1.0,
                                              high_freq_factor=2.0, original_max_position_embeddings=64)),
}


def _hf_rotary(head_dim, theta, scaling):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope = {"rope_type": scaling.rope_type, "rope_theta": theta}
    if scaling.rope_type != "default":
        rope["factor"] = scaling.factor
    if scaling.rope_type == "llama3":
        rope.update(low_freq_factor=scaling.low_freq_factor, high_freq_factor=scaling.high_freq_factor,
                    original_max_position_embeddings=scaling.original_max_position_embeddings)
    hf_cfg = transformers.LlamaConfig(
        hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim, rope_parameters=rope,
        max_position_embeddings=4 * scaling.original_max_position_embeddings,
    )
    return torch, LlamaRotaryEmbedding(hf_cfg)


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_inv_freq_matches_transformers(case):
    head_dim, theta, scaling = ROPE_CASES[case]
    _, hf = _hf_rotary(head_dim, theta, scaling)
    ours = rope_inv_freq(head_dim, theta, scaling)
    assert ours.dtype == np.float32 and ours.shape == (head_dim // 2,)
    np.testing.assert_allclose(ours, hf.inv_freq.numpy(), rtol=1e-6)
    if scaling.rope_type == "llama3":
        # the case must exercise the unscaled, the smoothed and the fully scaled bands
        wavelen = 2 * np.pi / rope_inv_freq(head_dim, theta, RopeScaling())
        old = scaling.original_max_position_embeddings
        assert np.any(wavelen < old / scaling.high_freq_factor)
        assert np.any(wavelen > old / scaling.low_freq_factor)
        assert np.any((wavelen >= old / scaling.high_freq_factor) & (wavelen <= old / scaling.low_freq_factor))


def test_rope_rotation_matches_transformers():
    """cos/sin tables and the rotate-half rotation against transformers (llama3 scaling, arbitrary positions)."""
    head_dim, theta, scaling = ROPE_CASES["llama3_small"]
    torch, hf = _hf_rotary(head_dim, theta, scaling)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cfg = tiny_config(hidden_size=4 * head_dim, num_heads=4, num_kv_heads=4, rope_theta=theta, rope_scaling=scaling)
    positions = np.array([[0, 1, 2, 50, 300], [7, 8, 9, 10, 1000]], np.int32)
    cos, sin = rope_cos_sin(jnp.asarray(positions), cfg)
    x = np.random.default_rng(0).standard_normal((2, 5, 4, head_dim)).astype(np.float32)  # [B, T, H, D]
    hf_cos, hf_sin = hf(torch.from_numpy(x), torch.from_numpy(positions.astype(np.int64)))
    np.testing.assert_allclose(np.asarray(cos), hf_cos.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(sin), hf_sin.numpy(), atol=1e-5)
    xt = torch.from_numpy(x.transpose(0, 2, 1, 3))  # transformers rotates [B, H, T, D]
    hf_rot, _ = apply_rotary_pos_emb(xt, xt, hf_cos, hf_sin)
    np.testing.assert_allclose(np.asarray(apply_rope(jnp.asarray(x), cos, sin)),
                               hf_rot.numpy().transpose(0, 2, 1, 3), atol=1e-5)


# ---- bad input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_id", [VOCAB, VOCAB + 100, -1])
def test_out_of_vocab_tokens_raise_or_give_nan(models, tokens, bad_id):
    model, params = models["dense_gqa"]
    bad = tokens.at[1, 5].set(bad_id)
    with pytest.raises(ValueError, match=rf"vocab_size={VOCAB}.*{bad_id}"):
        model.apply(params, bad)
    logits = np.asarray(forward(model, params, bad))  # traced: cannot raise, must not silently embed a wrong row
    assert np.all(np.isnan(logits[1, 5:]))  # (earlier positions of that row may be NaN too: 0 * NaN in attention)
    assert np.all(np.isfinite(logits[0]))  # the other sequence is unaffected


def test_bad_token_arrays_raise(models, tokens):
    model, params = models["dense_gqa"]
    with pytest.raises(ValueError, match="batch, length"):
        model.apply(params, tokens[0])
    with pytest.raises(ValueError, match="batch, length"):
        model.apply(params, tokens[None])
    with pytest.raises(TypeError, match="integer"):
        model.apply(params, tokens.astype(jnp.float32))
    with pytest.raises(ValueError, match="batch size 3 .* batch size 2"):
        model.apply(params, tokens, cache=model.init_cache(3, CAP))


@pytest.mark.parametrize(
    "overrides, field, expected, actual",
    [
        (dict(num_heads=4, num_kv_heads=3), "model.num_kv_heads", "divisor of num_heads=4", "3"),
        (dict(head_dim=7), "model.head_dim", "even", "7"),
        (dict(hidden_size=36, num_heads=4), "model.head_dim", "even", "9"),
        (dict(hidden_size=30, num_heads=4), "model.hidden_size", "multiple of num_heads=4", "30"),
        (dict(num_experts=2, num_experts_per_tok=3), "model.num_experts_per_tok", "num_experts=2", "3"),
        (dict(num_experts=-1), "model.num_experts", "positive number of experts", "-1"),
        (dict(vocab_size=0), "model.vocab_size", "positive int", "0"),
        (dict(num_layers=2.5), "model.num_layers", "positive int", "2.5"),
        (dict(sliding_window=0), "model.sliding_window", "positive int", "0"),
        (dict(rms_norm_eps=0.0), "model.rms_norm_eps", "positive float", "0.0"),
        (dict(architecture="mixtral"), "model.num_experts", "num_experts > 0", "0"),
    ],
)
def test_bad_lm_config_names_field_expected_and_actual(overrides, field, expected, actual):
    with pytest.raises(ConfigError) as info:
        tiny_config(**overrides)
    msg = str(info.value)
    assert f"'{field}'" in msg and expected in msg and actual in msg, msg
