"""Hugging Face config/safetensors import and export without torch: the config mapping, the tensor layout (checked
against hand-written files), exact round trips (single file, sharded, straight into a sharded mesh, bf16) and the
errors for every kind of broken checkpoint."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import jaxeff
from jaxeff.checkpoint import (
    CheckpointError,
    config_from_hf,
    config_to_hf,
    hf_eos_token_ids,
    hf_tensor_map,
    load_params,
    parse_size,
    read_hf_config,
)
from jaxeff.checkpoint import hf as hf_mod
from jaxeff.models.config import LMConfig, RopeScaling
from jaxeff.models.lm import DecoderLM
from jaxeff.sharding import MeshConfig, make_mesh, param_shardings


def llama_json(**kw):
    base = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 256, "tie_word_embeddings": False,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "bos_token_id": 1, "eos_token_id": 2,
    }
    base.update(kw)
    return base


# Configs covering every mapped feature; each must survive LMConfig -> config.json -> LMConfig unchanged.
CONFIGS = {
    "llama_tied_bias_llama3": LMConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
        tie_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True, rope_theta=5e5, bos_token_id=0,
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 64), architecture="llama", eos_token_id=3,
    ),
    "mistral_window_head_dim": LMConfig(
        vocab_size=64, hidden_size=32, intermediate_size=40, num_layers=3, num_heads=4, num_kv_heads=1,
        head_dim=16, sliding_window=5, architecture="mistral", rope_scaling=RopeScaling("linear", 2.0),
    ),
    "qwen2": LMConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_layers=2, num_heads=2,
                      num_kv_heads=2, qkv_bias=True, architecture="qwen2"),
    "qwen2_window": LMConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_layers=2, num_heads=2,
                             num_kv_heads=1, qkv_bias=True, sliding_window=3, architecture="qwen2"),
    "mixtral": LMConfig(vocab_size=64, hidden_size=32, intermediate_size=24, num_layers=2, num_heads=4,
                        num_kv_heads=2, num_experts=3, num_experts_per_tok=2, architecture="mixtral",
                        router_aux_loss_coef=0.02, rms_norm_eps=1e-5),
}


# ---- config.json ------------------------------------------------------------------------------------------------


def test_config_v5_and_legacy_rope_forms_agree():
    v5 = config_from_hf(llama_json(rope_parameters={"rope_theta": 5e5, "rope_type": "default"}))
    legacy = llama_json(rope_theta=5e5)
    del legacy["rope_parameters"]
    assert config_from_hf(legacy) == v5
    assert v5.rope_theta == 5e5 and v5.rope_scaling == RopeScaling()
    # An older config without any RoPE key gets the architecture's default base.
    none = llama_json(model_type="mixtral", num_local_experts=2)
    del none["rope_parameters"]
    assert config_from_hf(none).rope_theta == 1e6


def test_config_rope_scaling_types():
    l3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192, "rope_theta": 5e5}
    cfg = config_from_hf(llama_json(rope_parameters=l3))
    assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192) and cfg.rope_theta == 5e5
    # Legacy spelling: top-level rope_theta, rope_scaling with "type"; original length defaults to the context.
    legacy = llama_json(rope_theta=5e5, rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0})
    del legacy["rope_parameters"]
    assert config_from_hf(legacy).rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 256)
    lin = config_from_hf(llama_json(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}))
    assert lin.rope_scaling == RopeScaling("linear", 4.0)
    for bad in ("yarn", "dynamic", "longrope"):
        with pytest.raises(CheckpointError, match=f"RoPE type '{bad}' is not supported.*default, linear, llama3"):
            config_from_hf(llama_json(rope_parameters={"rope_type": bad, "factor": 2.0, "rope_theta": 1e4}))
    with pytest.raises(CheckpointError, match="low_freq_factor"):
        config_from_hf(llama_json(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}))
    with pytest.raises(CheckpointError, match="partial_rotary_factor"):
        config_from_hf(llama_json(partial_rotary_factor=0.5))


def test_config_fields():
    cfg = config_from_hf(llama_json(num_key_value_heads=None, head_dim=16, eos_token_id=[7, 8, 9],
                                    attention_bias=True, mlp_bias=True, tie_word_embeddings=True))
    assert cfg.num_kv_heads == 4  # default: one KV head per query head
    assert cfg.head_dim is None and cfg.head_size == 16  # the default head size is stored as None
    assert cfg.eos_token_id == 7 and hf_eos_token_ids(llama_json(eos_token_id=[7, 8, 9])) == [7, 8, 9]
    assert cfg.qkv_bias and cfg.o_bias and cfg.mlp_bias and cfg.tie_embeddings
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads) == (
        128, 64, 96, 2, 4)
    assert cfg.rms_norm_eps == 1e-6 and cfg.max_position_embeddings == 256 and cfg.bos_token_id == 1
    assert config_from_hf(llama_json(head_dim=32)).head_size == 32

    qwen = config_from_hf(llama_json(model_type="qwen2", attention_bias=False))
    assert qwen.qkv_bias and not qwen.o_bias and qwen.architecture == "qwen2"

    mistral = config_from_hf(llama_json(model_type="mistral", sliding_window=7))
    assert mistral.sliding_window == 7 and not mistral.qkv_bias
    no_key = llama_json(model_type="mistral")
    assert config_from_hf(no_key).sliding_window == 4096  # transformers' MistralConfig default

    mix = config_from_hf(llama_json(model_type="mixtral", num_local_experts=8, num_experts_per_tok=2,
                                    router_aux_loss_coef=0.01, sliding_window=None))
    assert (mix.num_experts, mix.num_experts_per_tok, mix.router_aux_loss_coef) == (8, 2, 0.0)
    mix = config_from_hf(llama_json(model_type="mixtral", num_local_experts=8, router_aux_loss_coef=0.01,
                                    output_router_logits=True))
    assert mix.router_aux_loss_coef == 0.01


def test_config_qwen2_sliding_window_rules():
    def qwen(**kw):
        return config_from_hf(llama_json(model_type="qwen2", sliding_window=6, **kw)).sliding_window

    assert qwen() is None  # use_sliding_window defaults to false
    assert qwen(use_sliding_window=True, max_window_layers=0) == 6
    assert qwen(use_sliding_window=True) is None  # max_window_layers=28 >= 2 layers: no layer slides
    assert qwen(use_sliding_window=True, layer_types=["sliding_attention"] * 2) == 6
    with pytest.raises(CheckpointError, match=r"only some layers \(\[1\] of 2\)"):
        qwen(use_sliding_window=True, max_window_layers=1)


def test_config_rejects_other_architectures():
    gpt2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 768, "n_layer": 12}
    with pytest.raises(CheckpointError, match="model_type 'gpt2'.*GPT2LMHeadModel.*llama, mistral, qwen2, mixtral"):
        config_from_hf(gpt2)
    with pytest.raises(CheckpointError, match="model_type None"):
        config_from_hf({"hidden_size": 8})
    with pytest.raises(CheckpointError, match="hidden_act 'gelu'"):
        config_from_hf(llama_json(hidden_act="gelu"))
    with pytest.raises(CheckpointError, match="'intermediate_size' is missing"):
        config_from_hf({k: v for k, v in llama_json().items() if k != "intermediate_size"})
    with pytest.raises(CheckpointError, match="num_kv_heads"):  # LMConfig's own validation, reported as such
        config_from_hf(llama_json(num_key_value_heads=3))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_round_trip(name):
    cfg = CONFIGS[name]
    hf = config_to_hf(cfg)
    assert hf["model_type"] == cfg.architecture and "rope_parameters" in hf and "rope_theta" not in hf
    assert config_from_hf(json.loads(json.dumps(hf))) == cfg


def test_config_export_refuses_what_the_architecture_cannot_hold():
    with pytest.raises(CheckpointError, match="'llama'.*sliding_window=4"):
        config_to_hf(LMConfig(sliding_window=4))
    with pytest.raises(CheckpointError, match="'mistral'.*qkv_bias=True"):
        config_to_hf(LMConfig(qkv_bias=True, architecture="mistral"))
    with pytest.raises(CheckpointError, match="'qwen2'.*qkv_bias=False"):
        config_to_hf(LMConfig(architecture="qwen2"))
    with pytest.raises(CheckpointError, match="attention_bias covers q, k, v and o"):
        config_to_hf(LMConfig(qkv_bias=True))
    with pytest.raises(CheckpointError, match="'llama'.*num_experts=4"):
        config_to_hf(LMConfig(num_experts=4))


def test_config_overrides(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(llama_json()))
    cfg = read_hf_config(tmp_path, scan_layers=False, remat="full", dtype="bfloat16")
    assert not cfg.scan_layers and cfg.remat == "full" and cfg.dtype == "bfloat16"
    with pytest.raises(CheckpointError, match=r"unknown LMConfig field\(s\) \['scan_layer'\]"):
        read_hf_config(tmp_path, scan_layer=False)
    with pytest.raises(CheckpointError, match="model.remat"):
        read_hf_config(tmp_path, remat="sometimes")


# ---- the tensor layout ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_name_table_covers_every_parameter_once(name):
    cfg = CONFIGS[name]
    leaves = hf_mod._leaf_specs(cfg)
    seen = {}
    for tm in hf_tensor_map(cfg).values():
        spec = leaves[tm.path]
        assert len(tm.index) < len(spec.shape)
        assert all(0 <= i < n for i, n in zip(tm.index, spec.shape))
        seen.setdefault(tm.path, set()).add(tm.index)
    assert set(seen) == set(leaves)
    for path, idx in seen.items():
        stack = leaves[path].shape[: len(next(iter(idx)))]
        assert len(idx) == int(np.prod(stack)), path


def _write_hand_made_llama(tmp_path, moe=False):
    """A checkpoint written with plain numpy, each tensor full of distinct values, to check where each value lands
    independently of our own exporter."""
    L, d, H, K, D, I, V, E = 2, 8, 4, 2, 2, 6, 10, 3
    rng = np.random.default_rng(0)
    t = {}
    hf = llama_json(vocab_size=V, hidden_size=d, intermediate_size=I, num_hidden_layers=L, num_attention_heads=H,
                    num_key_value_heads=K, attention_bias=True)
    if moe:
        hf = llama_json(model_type="mixtral", vocab_size=V, hidden_size=d, intermediate_size=I, num_hidden_layers=L,
                        num_attention_heads=H, num_key_value_heads=K, num_local_experts=E, num_experts_per_tok=2)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    t["model.embed_tokens.weight"] = r(V, d)
    t["model.norm.weight"] = r(d)
    t["lm_head.weight"] = r(V, d)
    for i in range(L):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = r(d)
        t[p + "post_attention_layernorm.weight"] = r(d)
        for n, h in (("q", H), ("k", K), ("v", K)):
            t[p + f"self_attn.{n}_proj.weight"] = r(h * D, d)
            if not moe:
                t[p + f"self_attn.{n}_proj.bias"] = r(h * D)
        t[p + "self_attn.o_proj.weight"] = r(d, H * D)
        if moe:
            t[p + "block_sparse_moe.gate.weight"] = r(E, d)
            for j in range(E):
                for w, shape in (("w1", (I, d)), ("w2", (d, I)), ("w3", (I, d))):
                    t[p + f"block_sparse_moe.experts.{j}.{w}.weight"] = r(*shape)
        else:
            t[p + "self_attn.o_proj.bias"] = r(d)
            for n, shape in (("gate", (I, d)), ("up", (I, d)), ("down", (d, I))):
                t[p + f"mlp.{n}_proj.weight"] = r(*shape)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    save_file(t, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    return t, (L, d, H, K, D, I, V, E)


def test_layout_against_hand_written_llama(tmp_path):
    t, (L, d, H, K, D, I, V, _) = _write_hand_made_llama(tmp_path)
    model, p = jaxeff.load_pretrained(tmp_path)
    p = jax.tree.map(np.asarray, p)
    np.testing.assert_array_equal(p["embed"]["embedding"], t["model.embed_tokens.weight"])
    np.testing.assert_array_equal(p["lm_head"]["kernel"], t["lm_head.weight"].T)
    np.testing.assert_array_equal(p["final_norm"]["scale"], t["model.norm.weight"])
    for i in range(L):
        pre = f"model.layers.{i}."
        np.testing.assert_array_equal(p["layers"]["attn_norm"]["scale"][i], t[pre + "input_layernorm.weight"])
        np.testing.assert_array_equal(p["layers"]["mlp_norm"]["scale"][i], t[pre + "post_attention_layernorm.weight"])
        for n, heads in (("q", H), ("k", K), ("v", K)):
            w, b = t[pre + f"self_attn.{n}_proj.weight"], t[pre + f"self_attn.{n}_proj.bias"]
            for h in range(heads):
                for k in range(D):
                    # our kernel[l, in, head, k] is torch weight[head * D + k, in]
                    np.testing.assert_array_equal(p["layers"]["attn"][n]["kernel"][i, :, h, k], w[h * D + k])
                    assert p["layers"]["attn"][n]["bias"][i, h, k] == b[h * D + k]
        wo = t[pre + "self_attn.o_proj.weight"]
        for h in range(H):
            for k in range(D):
                np.testing.assert_array_equal(p["layers"]["attn"]["o"]["kernel"][i, h, k, :], wo[:, h * D + k])
        np.testing.assert_array_equal(p["layers"]["attn"]["o"]["bias"][i], t[pre + "self_attn.o_proj.bias"])
        for n in ("gate", "up", "down"):
            np.testing.assert_array_equal(p["layers"]["mlp"][n]["kernel"][i], t[pre + f"mlp.{n}_proj.weight"].T)


def test_layout_against_hand_written_mixtral(tmp_path):
    t, (L, d, H, K, D, I, V, E) = _write_hand_made_llama(tmp_path, moe=True)
    model, p = jaxeff.load_pretrained(tmp_path)
    assert model.config.num_experts == E
    moe = jax.tree.map(np.asarray, p["layers"]["moe"])
    for i in range(L):
        pre = f"model.layers.{i}.block_sparse_moe."
        np.testing.assert_array_equal(moe["router"]["kernel"][i], t[pre + "gate.weight"].T)
        for j in range(E):
            # w1 is the gate projection, w3 the up projection, w2 the down projection.
            np.testing.assert_array_equal(moe["gate"]["kernel"][i, j], t[pre + f"experts.{j}.w1.weight"].T)
            np.testing.assert_array_equal(moe["up"]["kernel"][i, j], t[pre + f"experts.{j}.w3.weight"].T)
            np.testing.assert_array_equal(moe["down"]["kernel"][i, j], t[pre + f"experts.{j}.w2.weight"].T)


# ---- round trips ------------------------------------------------------------------------------------------------


def _random_model(name, param_dtype="float32"):
    """A model and random parameters, every leaf (norm scales and biases included) distinct, so a swapped pair
    could not go unnoticed. Drawn with numpy: eager jax.random ops would compile once per shape."""
    cfg = dataclasses.replace(CONFIGS[name], param_dtype=param_dtype)
    model = DecoderLM(cfg)
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    rng = np.random.default_rng(sorted(CONFIGS).index(name))
    params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32), s.dtype), shapes)
    return model, params


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_save_load_round_trip_is_exact(tmp_path, name):
    model, params = _random_model(name)
    jaxeff.save_pretrained(model, params, tmp_path / "a")
    model2, params2 = jaxeff.load_pretrained(tmp_path / "a")
    assert model2.config == model.config
    _assert_trees_equal(params, params2)
    # load -> save -> load: the files themselves are reproduced.
    jaxeff.save_pretrained(model2, params2, tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "a" / "config.json").read_text()) == json.loads(
        (tmp_path / "b" / "config.json").read_text())
    with safe_open(str(tmp_path / "a" / "model.safetensors"), "np") as f:
        assert set(f.keys()) == set(hf_tensor_map(model.config))
        assert f.metadata() == {"format": "pt"}


def test_mixtral_export_uses_the_hub_expert_names(tmp_path):
    model, params = _random_model("mixtral")
    jaxeff.save_pretrained(model, params, tmp_path)
    keys = set(load_file(str(tmp_path / "model.safetensors")))
    for j in range(3):
        assert {f"model.layers.1.block_sparse_moe.experts.{j}.{w}.weight" for w in ("w1", "w2", "w3")} <= keys
    assert not any("mlp." in k for k in keys)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["num_local_experts"] == 3


def test_sharded_save_and_load_into_a_mesh(tmp_path, devices8, monkeypatch):
    model, params = _random_model("mixtral")
    jaxeff.save_pretrained(model, params, tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (tmp_path / "model.safetensors").exists()
    assert files == sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert index["metadata"]["total_size"] == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    for f in files:  # each shard respects the limit (no single tensor here is larger than it)
        assert sum(a.nbytes for a in load_file(str(tmp_path / f)).values()) <= 20_000

    mesh = make_mesh(MeshConfig(data=1, fsdp=2, expert=2, tensor=2), devices8)
    reads = []
    real_read = hf_mod._Sources.read
    monkeypatch.setattr(hf_mod._Sources, "read", lambda self, tm, inner, idx: reads.append((tm.hf_name, idx))
                        or real_read(self, tm, inner, idx))
    model2, loaded = jaxeff.load_pretrained(tmp_path, mesh=mesh)
    want = param_shardings(model2, mesh)
    for path, (x, s) in zip(jax.tree_util.tree_flatten_with_path(loaded)[0],
                            zip(jax.tree.leaves(loaded), jax.tree.leaves(want))):
        assert x.sharding.is_equivalent_to(s, x.ndim), path
    _assert_trees_equal(params, loaded)
    # A sharded leaf is read in pieces: the q projection is split over "tensor" by heads (4 heads -> 2 per device)
    # and over "fsdp" by the embedding (32 -> 16 rows), so no read of it covers more than that.
    q_reads = [idx for name, idx in reads if name == "model.layers.0.self_attn.q_proj.weight"]
    assert q_reads and all(idx[0][1] - idx[0][0] == 16 and idx[1][1] - idx[1][0] == 2 for idx in q_reads)
    # Replicated copies are read once, not once per device.
    assert sum(name == "model.norm.weight" for name, _ in reads) == 1

    # Saving again into the same directory as one file removes the old shards and index.
    jaxeff.save_pretrained(model2, loaded, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    _assert_trees_equal(params, jaxeff.load_pretrained(tmp_path)[1])


def test_bfloat16_parameters_and_files(tmp_path):
    model, params = _random_model("qwen2")
    jaxeff.save_pretrained(model, params, tmp_path / "f32")
    m16, p16 = jaxeff.load_pretrained(tmp_path / "f32", param_dtype="bfloat16", dtype="bfloat16")
    assert m16.config.param_dtype == "bfloat16" and m16.config.dtype == "bfloat16"
    _assert_trees_equal(jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), params), p16)

    # A bf16 model writes BF16 tensors, which read back exactly, in bf16 or widened to f32.
    jaxeff.save_pretrained(m16, p16, tmp_path / "bf16")
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "np") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    _assert_trees_equal(p16, jaxeff.load_pretrained(tmp_path / "bf16", param_dtype="bfloat16")[1])
    _, p32 = jaxeff.load_pretrained(tmp_path / "bf16", param_dtype="float32")
    _assert_trees_equal(jax.tree.map(lambda x: np.asarray(x).astype(np.float32), p16), p32)


def test_parse_size():
    assert parse_size(123) == 123
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("20 kb") == 20_000
    for bad in ("lots", "-1GB", 0):
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_size(bad)


def test_harmless_and_tied_extras_are_ignored(tmp_path):
    model, params = _random_model("llama_tied_bias_llama3")
    jaxeff.save_pretrained(model, params, tmp_path)
    t = load_file(str(tmp_path / "model.safetensors"))
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    t["lm_head.weight"] = t["model.embed_tokens.weight"]  # some exporters write the tied head anyway
    save_file(t, str(tmp_path / "model.safetensors"))
    _assert_trees_equal(params, jaxeff.load_pretrained(tmp_path)[1])


# ---- clear errors -----------------------------------------------------------------------------------------------


@pytest.fixture
def saved_llama(tmp_path):
    model, params = _random_model("llama_tied_bias_llama3")
    d = tmp_path / "ckpt"
    jaxeff.save_pretrained(model, params, d)
    return d


def test_error_directory_without_config_or_with_bad_json(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        jaxeff.load_pretrained(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="has no config.json"):
        jaxeff.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(CheckpointError, match="config.json' is not valid JSON"):
        jaxeff.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        jaxeff.load_pretrained(tmp_path)


def test_error_other_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64, "n_layer": 2, "n_head": 4,
         "vocab_size": 128}))
    save_file({"transformer.wte.weight": np.zeros((128, 64), np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model_type 'gpt2'.*supported model types: llama, mistral"):
        jaxeff.load_pretrained(tmp_path)


def test_error_shape_mismatch_names_tensor_and_shapes(saved_llama):
    cfg = json.loads((saved_llama / "config.json").read_text())
    cfg["intermediate_size"] = 40  # the files hold 48
    (saved_llama / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.0.mlp.gate_proj.weight' in .*model.safetensors"
                                              r"'.*expected shape \[40, 32\].*got \[48, 32\]"):
        jaxeff.load_pretrained(saved_llama)


def test_error_missing_and_unexpected_tensors(saved_llama):
    t = load_file(str(saved_llama / "model.safetensors"))
    del t["model.layers.1.self_attn.k_proj.bias"], t["model.norm.weight"]
    t["model.layers.0.self_attn.qkv_proj.weight"] = np.zeros((4, 4), np.float32)
    save_file(t, str(saved_llama / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        jaxeff.load_pretrained(saved_llama)
    msg = str(e.value)
    assert "2 missing tensor(s): model.layers.1.self_attn.k_proj.bias, model.norm.weight" in msg
    assert "1 unexpected tensor(s): model.layers.0.self_attn.qkv_proj.weight" in msg


def test_error_missing_shard_file(saved_llama):
    model, params = jaxeff.load_pretrained(saved_llama)
    jaxeff.save_pretrained(model, params, saved_llama, max_shard_size="10KB")
    index = json.loads((saved_llama / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[1]
    os.remove(saved_llama / gone)
    with pytest.raises(CheckpointError, match=f"shard file\\(s\\) that do not exist.*{gone}"):
        jaxeff.load_pretrained(saved_llama)


def test_error_index_pointing_to_the_wrong_shard(saved_llama):
    model, params = jaxeff.load_pretrained(saved_llama)
    jaxeff.save_pretrained(model, params, saved_llama, max_shard_size="10KB")
    path = saved_llama / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    files = sorted(set(index["weight_map"].values()))
    index["weight_map"]["model.norm.weight"] = files[0] if index["weight_map"]["model.norm.weight"] != files[0] \
        else files[1]
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="wrong file, e.g. 'model.norm.weight'"):
        jaxeff.load_pretrained(saved_llama)
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match="index.json' is not valid JSON"):
        jaxeff.load_pretrained(saved_llama)


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_error_truncated_or_corrupted_file(saved_llama, damage):
    f = saved_llama / "model.safetensors"
    data = bytearray(f.read_bytes())
    if damage == "truncated":
        data = data[: len(data) - 1000]
    else:
        data[12:40] = b"#" * 28
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"safetensors file '.*ckpt/model.safetensors' is truncated or corrupted:"
                                              r" Error while deserializing header") as e:
        jaxeff.load_pretrained(saved_llama)
    assert type(e.value.__cause__).__name__ == "SafetensorError"


def test_error_no_weights_and_unsupported_dtype(saved_llama, tmp_path):
    os.remove(saved_llama / "model.safetensors")
    (saved_llama / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"neither model.safetensors nor .*pytorch_model.bin.*only safetensors"):
        jaxeff.load_pretrained(saved_llama)
    model, params = _random_model("qwen2")
    jaxeff.save_pretrained(model, params, tmp_path / "q")
    t = load_file(str(tmp_path / "q" / "model.safetensors"))
    t["model.norm.weight"] = t["model.norm.weight"].astype(np.int32)
    save_file(t, str(tmp_path / "q" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="'model.norm.weight'.*dtype I32 is not supported"):
        jaxeff.load_pretrained(tmp_path / "q")


def test_error_save_with_wrong_params(tmp_path):
    model, params = _random_model("qwen2")
    bad = jax.tree.map(lambda x: x, params)
    bad["layers"]["attn"]["q"]["kernel"] = bad["layers"]["attn"]["q"]["kernel"][:, :, :1]
    with pytest.raises(CheckpointError, match=r"layers/attn/q/kernel has shape \[2, 32, 1, 16\].*\[2, 32, 2, 16\]"):
        jaxeff.save_pretrained(model, bad, tmp_path)
    del bad["final_norm"]
    with pytest.raises(CheckpointError, match="missing parameter final_norm/scale"):
        jaxeff.save_pretrained(model, bad, tmp_path)


def test_error_load_tokenizer_without_files(saved_llama):
    with pytest.raises(CheckpointError, match="has no tokenizer files"):
        jaxeff.load_tokenizer(saved_llama)


def test_load_params_returns_base_parameters_only(saved_llama):
    model, params = jaxeff.load_pretrained(saved_llama)
    assert set(params) == {"embed", "layers", "final_norm"}  # tied: no lm_head
    again = load_params(saved_llama, model)
    _assert_trees_equal(params, again)
