"""The Wan-style video DiT: parity with diffusers' WanTransformer3DModel, checkpoint import/export, the
self-attention hook, attention outputs, gradients, classifier-free guidance and clear errors."""

import dataclasses
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxeff import sharding as shd
from jaxeff.checkpoint.diffusers_wan import (
    INDEX_NAME,
    WEIGHTS_NAME,
    load_wan_transformer,
    save_wan_transformer,
    wan_tensor_map,
)
from jaxeff.checkpoint.hf_config import CheckpointError
from jaxeff.config import ConfigError
from jaxeff.models.vdit import (
    VDiTConfig,
    VideoDiT,
    dense_self_attention,
    guided_sample_prediction,
    rope_tables,
)

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
            text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32)
LATENTS = (2, 4, 3, 8, 8)  # -> token grid (3, 4, 4), N = 48
N_TOKENS = 48


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    latents = rng.standard_normal(LATENTS).astype(np.float32)
    timesteps = np.array([999.0, 250.0], np.float32)
    text = rng.standard_normal((2, 5, 32)).astype(np.float32)
    return latents, timesteps, text


@pytest.fixture(scope="module")
def scratch():
    """A tiny model initialised from scratch, every parameter perturbed so that each one matters."""
    model = VideoDiT(VDiTConfig(**TINY))
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda p: jnp.asarray(np.asarray(p) + 0.1 * rng.standard_normal(p.shape).astype(np.float32)),
                          model.init(jax.random.key(0)))
    return model, params


@pytest.fixture(scope="module")
def reference(tmp_path_factory, inputs):
    """A tiny random diffusers WanTransformer3DModel (float32), saved with ``save_pretrained``, and its output."""
    torch = pytest.importorskip("torch", reason="torch is needed for the diffusers parity tests")
    diffusers = pytest.importorskip("diffusers", reason="diffusers is needed for the parity tests")
    torch.manual_seed(0)
    tm = diffusers.WanTransformer3DModel(**TINY).eval()
    with torch.no_grad():  # scale_shift_tables, norm weights (ones) and biases all away from their init
        for p in tm.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("wan_diffusers")
    tm.save_pretrained(str(path))
    latents, timesteps, text = inputs
    with torch.no_grad():
        ref = tm(torch.from_numpy(latents), torch.from_numpy(timesteps), torch.from_numpy(text)).sample.numpy()
    return types.SimpleNamespace(torch=torch, diffusers=diffusers, model=tm, path=path, out=ref)


def _torch_out(ref, tm, inputs):
    t = ref.torch
    with t.no_grad():
        return tm(*(t.from_numpy(a) for a in inputs)).sample.numpy()


# ---- parity with diffusers ------------------------------------------------------------------------------------


def test_matches_diffusers(reference, inputs):
    model, params = load_wan_transformer(reference.path)
    assert model.config == VDiTConfig(**TINY)
    out = model.apply(params, *inputs)
    assert out.sample.shape == LATENTS and out.sample.dtype == jnp.float32
    assert out.attention_outputs is None
    err = float(np.max(np.abs(np.asarray(out.sample) - reference.out)))
    print(f"max |jaxeff - diffusers| = {err:.3g} (output max {np.abs(reference.out).max():.3g})")
    assert err <= 1e-4


def test_sharded_diffusers_checkpoint_loads(reference, tmp_path):
    reference.model.save_pretrained(str(tmp_path), max_shard_size="20KB")
    assert (tmp_path / INDEX_NAME).is_file() and not (tmp_path / WEIGHTS_NAME).exists()
    _, sharded = load_wan_transformer(tmp_path)
    _, single = load_wan_transformer(reference.path)
    jax.tree.map(np.testing.assert_array_equal, sharded, single)


@pytest.mark.parametrize("max_shard_size", ["10GB", "30KB"])
def test_export_loads_in_diffusers(reference, inputs, tmp_path, max_shard_size):
    model, params = load_wan_transformer(reference.path)
    save_wan_transformer(model, params, tmp_path, max_shard_size=max_shard_size)
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "WanTransformer3DModel"
    assert (tmp_path / INDEX_NAME).is_file() == (max_shard_size == "30KB")
    tm = reference.diffusers.WanTransformer3DModel.from_pretrained(str(tmp_path)).eval()
    np.testing.assert_allclose(_torch_out(reference, tm, inputs), reference.out, rtol=0, atol=1e-6)
    _, again = load_wan_transformer(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_bfloat16_load_runs_close(reference, inputs):
    model, params = load_wan_transformer(reference.path, dtype="bfloat16")
    assert model.config.param_dtype == "bfloat16"
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
    out = np.asarray(jax.jit(model.apply)(params, *inputs).sample)
    assert out.dtype == np.float32
    assert np.max(np.abs(out - reference.out)) < 0.1 * np.abs(reference.out).max()


# ---- checkpoint errors ----------------------------------------------------------------------------------------


@pytest.fixture()
def saved(scratch, tmp_path):
    model, params = scratch
    save_wan_transformer(model, params, tmp_path)
    return tmp_path


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("field,value", [("image_dim", 1280), ("added_kv_proj_dim", 32), ("pos_embed_seq_len", 514)])
def test_image_to_video_config_rejected(saved, field, value):
    _edit_config(saved, **{field: value})
    with pytest.raises(ConfigError, match=f"'{field}'.*text-to-video.*{value}"):
        load_wan_transformer(saved)


def test_other_unsupported_configs_rejected(saved):
    _edit_config(saved, _class_name="WanVACETransformer3DModel")
    with pytest.raises(ConfigError, match="_class_name.*WanVACETransformer3DModel"):
        load_wan_transformer(saved)
    _edit_config(saved, _class_name="WanTransformer3DModel", window_size=[-1, -1])
    with pytest.raises(ConfigError, match="unknown field.*window_size"):
        load_wan_transformer(saved)


def test_missing_unexpected_and_mismatched_tensors(saved):
    file = saved / WEIGHTS_NAME
    tensors = load_file(str(file))
    del tensors["blocks.1.attn2.norm_k.weight"]
    tensors["blocks.2.attn1.to_q.weight"] = np.zeros((32, 32), np.float32)
    tensors["proj_out.bias"] = np.zeros((15,), np.float32)
    save_file(tensors, str(file))
    with pytest.raises(CheckpointError) as e:
        load_wan_transformer(saved)
    msg = str(e.value)
    assert "1 missing tensor(s): blocks.1.attn2.norm_k.weight" in msg
    assert "1 unexpected tensor(s): blocks.2.attn1.to_q.weight" in msg
    assert "proj_out.bias [15] (expected [16])" in msg


def test_config_disagreeing_with_weights(saved):
    _edit_config(saved, ffn_dim=128)
    with pytest.raises(CheckpointError, match=r"shape mismatch.*blocks\.0\.ffn\.net\.0\.proj\.bias \[64\] "
                                              r"\(expected \[128\]\)"):
        load_wan_transformer(saved)


def test_missing_weights_file(saved):
    (saved / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match="neither diffusion_pytorch_model.safetensors nor"):
        load_wan_transformer(saved)


def test_export_checks_params(scratch, tmp_path):
    model, params = scratch
    bad = dict(params, out={**params["out"], "scale_shift_table": jnp.zeros((3, 32))})
    with pytest.raises(CheckpointError, match=r"out/scale_shift_table has shape \[3, 32\].*\[2, 32\]"):
        save_wan_transformer(model, bad, tmp_path)


def test_tensor_map_covers_every_parameter(scratch):
    model, params = scratch
    table = wan_tensor_map(model.config)
    covered = {tm.path for tm in table.values()}
    paths = {tuple(k.key for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert covered == paths
    assert len(table) == len(set(table))


def test_local_checkpoint_round_trip(saved, scratch, inputs):
    model, params = scratch
    loaded_model, loaded = load_wan_transformer(saved)
    assert loaded_model == model
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


# ---- the self-attention hook and attention outputs ------------------------------------------------------------


def test_dense_hook_is_identical_and_sees_every_layer(scratch, inputs):
    model, params = scratch
    seen = []

    def hook(q, k, v, layer_index):
        seen.append(layer_index)
        assert q.shape == k.shape == v.shape == (2, 2, N_TOKENS, 16)
        return dense_self_attention(q, k, v)

    base = model.apply(params, *inputs)
    hooked = model.apply(params, *inputs, self_attention=hook)
    np.testing.assert_array_equal(np.asarray(hooked.sample), np.asarray(base.sample))
    assert seen == [0, 1]


def test_zero_hook_changes_output_and_attention_outputs(scratch, inputs):
    model, params = scratch
    base = model.apply(params, *inputs, return_attention_outputs=True)
    assert base.attention_outputs.shape == (2, 2, N_TOKENS, 32)  # [L, B, N, heads * head_dim]
    assert float(jnp.min(jnp.abs(base.attention_outputs).max(axis=(1, 2, 3)))) > 0
    zero = model.apply(params, *inputs, self_attention=lambda q, k, v, layer: jnp.zeros_like(q),
                       return_attention_outputs=True)
    assert float(jnp.max(jnp.abs(zero.sample - base.sample))) > 1e-3
    # the recorded outputs are the hook's own (before the output projection)
    np.testing.assert_array_equal(np.asarray(zero.attention_outputs), 0.0)


def test_hook_acts_per_layer(scratch, inputs):
    model, params = scratch

    def hook(q, k, v, layer_index):
        out = dense_self_attention(q, k, v)
        return jnp.zeros_like(out) if layer_index == 1 else out

    base = model.apply(params, *inputs, return_attention_outputs=True).attention_outputs
    part = model.apply(params, *inputs, self_attention=hook, return_attention_outputs=True).attention_outputs
    np.testing.assert_array_equal(np.asarray(part[0]), np.asarray(base[0]))
    np.testing.assert_array_equal(np.asarray(part[1]), 0.0)


def test_hook_with_wrong_output_shape(scratch, inputs):
    model, params = scratch
    with pytest.raises(ValueError, match=r"self_attention hook.*\(2, 2, 48, 16\) at layer 0, got \(2, 48, 2, 16\)"):
        model.apply(params, *inputs, self_attention=lambda q, k, v, l: q.transpose(0, 2, 1, 3))


# ---- training, guidance ---------------------------------------------------------------------------------------


def test_jit_grad_finite_and_remat(scratch, inputs):
    model, params = scratch
    latents, timesteps, text = (jnp.asarray(a) for a in inputs)
    target = jnp.asarray(np.random.default_rng(1).standard_normal(LATENTS).astype(np.float32))

    def loss_fn(m, p):
        return jnp.mean(jnp.square(m.apply(p, latents, timesteps, text).sample - target))

    loss, g = jax.jit(jax.value_and_grad(loss_fn, argnums=1), static_argnums=0)(model, params)
    assert np.isfinite(float(loss))
    leaves = jax.tree.leaves(g)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)
    assert all(float(jnp.max(jnp.abs(x))) > 0 for x in leaves)  # every parameter reaches the loss
    # remat=True: each of the L layers is one rematerialised (jax.checkpoint) call
    remat = VideoDiT(dataclasses.replace(model.config, remat=True))
    for m, n in ((model, 0), (remat, 2)):
        jaxpr = jax.make_jaxpr(lambda p: loss_fn(m, p))(params)
        assert sum(e.primitive.name in ("checkpoint", "remat", "remat2") for e in jaxpr.jaxpr.eqns) == n


def test_classifier_free_guidance(scratch, inputs):
    model, params = scratch
    latents, timesteps, text = (a[:1] for a in inputs)
    null = np.zeros_like(text)
    # cond and uncond of the same latents, as rows 0 and 1 of one batch
    both = np.asarray(model.apply(params, np.concatenate([latents, latents]), np.concatenate([timesteps] * 2),
                                  np.concatenate([text, null])).sample)
    cond, uncond = both[:1], both[1:]
    assert np.abs(cond - uncond).max() > 1e-3
    g1 = np.asarray(guided_sample_prediction(model, params, latents, timesteps, text, null, 1.0))
    np.testing.assert_allclose(g1, cond, rtol=0, atol=1e-5)
    g3 = np.asarray(guided_sample_prediction(model, params, latents, timesteps, text, null, 3.0))
    np.testing.assert_allclose(g3, uncond + 3.0 * (cond - uncond), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="null_text_embeds"):
        guided_sample_prediction(model, params, latents, timesteps, text, null[:, :3], 2.0)


# ---- input errors ---------------------------------------------------------------------------------------------


def test_input_errors(scratch, inputs):
    model, params = scratch
    latents, timesteps, text = inputs
    with pytest.raises(ValueError, match=r"latents: expected float \[batch, channels, frames, height, width\]"):
        model.apply(params, latents[0], timesteps, text)
    with pytest.raises(ValueError, match="in_channels=4.*got 3"):
        model.apply(params, latents[:, :3], timesteps, text)
    with pytest.raises(ValueError, match=r"height must be a positive multiple.*\(2\), got 7"):
        model.apply(params, latents[:, :, :, :7], timesteps, text)
    with pytest.raises(ValueError, match=r"width must be a positive multiple.*got 5"):
        model.token_grid((1, 4, 3, 8, 5))
    with pytest.raises(ValueError, match=r"text_embeds: expected \[batch=2, length, text_dim=32\].*\(2, 5, 16\)"):
        model.apply(params, latents, timesteps, text[..., :16])
    with pytest.raises(ValueError, match=r"timesteps: expected shape \[batch\]"):
        model.apply(params, latents, timesteps[:1], text)
    with pytest.raises(ValueError, match="exceeds rope_max_seq_len=32"):
        model.apply(params, np.zeros((1, 4, 1, 66, 2), np.float32), timesteps[:1], text[:1])
    assert model.token_grid(LATENTS) == (3, 4, 4)


def test_frames_not_divisible_by_temporal_patch():
    model = VideoDiT(VDiTConfig(**{**TINY, "patch_size": (2, 2, 2)}))
    assert model.token_grid((1, 4, 4, 8, 8)) == (2, 4, 4)
    with pytest.raises(ValueError, match=r"frames must be a positive multiple of the patch size.*\(2\), got 3"):
        model.token_grid(LATENTS)


# ---- config and init ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes,field", [
    ({"attention_head_dim": 15}, "attention_head_dim"),
    ({"attention_head_dim": 4}, "attention_head_dim"),
    ({"patch_size": (1, 2)}, "patch_size"),
    ({"qk_norm": "rms_norm"}, "qk_norm"),
    ({"num_layers": 0}, "num_layers"),
    ({"eps": 0.0}, "eps"),
    ({"dtype": "float16"}, "dtype"),
])
def test_config_validation(changes, field):
    with pytest.raises(ConfigError, match=f"model.{field}"):
        VDiTConfig(**{**TINY, **changes})


def test_diffusers_config_round_trip():
    cfg = VDiTConfig(**TINY)
    d = cfg.to_diffusers_config()
    assert d["_class_name"] == "WanTransformer3DModel" and d["image_dim"] is None
    assert VDiTConfig.from_diffusers_config(json.loads(json.dumps(d))) == cfg
    assert VDiTConfig.from_diffusers_config(d, dtype="bfloat16").dtype == "bfloat16"
    # omitted keys take diffusers' defaults; out_channels null means in_channels
    full = VDiTConfig.from_diffusers_config({"out_channels": None})
    assert (full.num_layers, full.inner_dim, full.out_channels, full.patch_size) == (40, 5120, 16, (1, 2, 2))
    with pytest.raises(ConfigError, match="qk_norm"):
        VDiTConfig.from_diffusers_config({**d, "qk_norm": None})
    with pytest.raises(ConfigError, match="qk_norm"):
        dataclasses.replace(cfg, qk_norm=None).to_diffusers_config()


def test_rope_split_and_tables():
    cfg = VDiTConfig(**TINY)
    assert cfg.rope_split == (8, 4, 4)
    cos, sin = rope_tables(cfg, (3, 4, 4))
    assert cos.shape == sin.shape == (48, 8)
    ang = np.arctan2(sin, cos)
    # token n = (t * 4 + h) * 4 + w: pair 0 turns with the frame (1 rad/step), pair 4 with the row, pair 6 the column
    n = (2 * 4 + 1) * 4 + 3
    np.testing.assert_allclose(ang[n, [0, 4, 6]], np.angle(np.exp(1j * np.array([2.0, 1.0, 3.0]))), atol=1e-6)


def test_init_from_scratch_and_param_axes():
    cfg = VDiTConfig(**{**TINY, "cross_attn_norm": False, "qk_norm": None})
    model = VideoDiT(cfg)
    params = model.init(jax.random.key(0))
    axes = model.param_axes()
    assert jax.tree.structure(params) == jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, tuple))
    jax.tree.map(lambda p, a: len(a) == p.ndim or pytest.fail(f"{a} vs {p.shape}"), params, axes,
                 is_leaf=lambda x: isinstance(x, tuple))
    assert "cross_norm" not in params["layers"] and "q_norm" not in params["layers"]["self_attn"]
    sst = np.asarray(params["layers"]["scale_shift_table"])
    assert sst.shape == (2, 6, 32) and abs(sst.std() * np.sqrt(32) - 1) < 0.2
    assert float(jnp.abs(params["layers"]["mlp"]["up"]["bias"]).max()) == 0
    assert abs(float(params["layers"]["mlp"]["up"]["kernel"].std()) - 0.02) < 0.004
    out = model.apply(params, np.ones(LATENTS, np.float32), np.array([10.0, 500.0]), np.ones((2, 3, 32)))
    assert bool(jnp.all(jnp.isfinite(out.sample)))


def test_sharded_forward_matches(scratch, inputs, devices8):
    model, params = scratch
    mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=2), devices8)
    sharded = jax.device_put(params, shd.param_shardings(model, mesh))
    assert shd.describe(sharded)["layers/self_attn/q/kernel"] == jax.sharding.PartitionSpec(None, "fsdp", "tensor")

    def fwd(p, *a):
        with shd.activate(mesh):
            return model.apply(p, *a).sample

    out = jax.jit(fwd)(sharded, *inputs)
    np.testing.assert_allclose(np.asarray(out), np.asarray(model.apply(params, *inputs).sample), rtol=0, atol=1e-5)


def test_load_needs_no_torch(reference):
    code = ("import sys; sys.modules['torch'] = None; sys.modules['diffusers'] = None\n"
            "from jaxeff.checkpoint.diffusers_wan import load_wan_transformer\n"
            f"m, p = load_wan_transformer({str(reference.path)!r}); print(m.config.num_layers)")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "2"
