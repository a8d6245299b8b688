"""Efficient-vDiT on the video DiT: the Attention Tile hook, the layer-wise mask search, the KD loss and the
stage-2/3 pipeline."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.attention.tile_masks import VideoTokenLayout, attention_tile_mask, attention_tile_sparsity
from jaxeff.config import ConfigError, load_config
from jaxeff.methods.tile_sparse import (
    TileSparseAttention,
    kd_loss,
    masked_dense_attention,
    search_layer_k,
    uniform,
)
from jaxeff.methods.tile_sparse.pipeline import KDConfig, TileSparseConfig, make_trajectory_pool, run_tile_sparse
from jaxeff.models.vdit import VDiTConfig, VideoDiT, dense_self_attention
from jaxeff.training.vdit import train_vdit
from tests.vdit_tiny import CONFIG, FRAMES, TOKENS_PER_FRAME, tiny_config

T, S = FRAMES, TOKENS_PER_FRAME


def _qkv(N, seed=0, B=2, H=2, D=16):
    ks = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(k, (B, H, N, D), jnp.float32) for k in ks]


def _token_mask(tile_mask, tokens_per_frame):
    return np.repeat(np.repeat(tile_mask, tokens_per_frame, axis=0), tokens_per_frame, axis=1)


@pytest.mark.parametrize("k", [0, 1, 2])
@pytest.mark.parametrize("tokens_per_frame, block", [(16, None), (6, 4)])  # (6, 4): frames padded 6 -> 8
def test_hook_equals_masked_dense_attention(k, tokens_per_frame, block):
    frames = 5
    q, kk, v = _qkv(frames * tokens_per_frame, seed=k)
    hook = TileSparseAttention((k,), frames, tokens_per_frame, block_size=block)
    got = hook(q, kk, v, 0)
    want = masked_dense_attention(q, kk, v, _token_mask(attention_tile_mask(frames, k), tokens_per_frame))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
    if k == 0:  # k = 0: each frame attends only to itself
        per_frame = [dense_self_attention(*(x[:, :, f * tokens_per_frame:(f + 1) * tokens_per_frame]
                                            for x in (q, kk, v))) for f in range(frames)]
        np.testing.assert_allclose(np.asarray(got), np.asarray(jnp.concatenate(per_frame, axis=2)), atol=2e-5)
    # reference-frame rows attend to everything: equal to dense attention rows
    if k > 0:
        dense = dense_self_attention(q, kk, v)
        rows = slice(0, k * tokens_per_frame)
        np.testing.assert_allclose(np.asarray(got[:, :, rows]), np.asarray(dense[:, :, rows]), atol=2e-5)


def test_sparsity_and_dense_layers():
    hook = TileSparseAttention((None, 1, 2, 7), 8, 64)
    assert hook.block_size == 64 and hook.is_dense(0) and hook.is_dense(3) and not hook.is_dense(1)
    assert hook.tables[0] is None and hook.tables[3] is None
    want = (attention_tile_sparsity(8, 1) + attention_tile_sparsity(8, 2)) / 4
    assert hook.sparsity == pytest.approx(want)
    assert hook.block_sparsity == pytest.approx(want)  # one block per frame: block sparsity = tile sparsity
    assert uniform(3, 2, 8, 64).layer_k == (2, 2, 2)
    assert hash(hook) == hash(TileSparseAttention((None, 1, 2, 7), 8, 64))  # usable as a static jit argument
    q, k, v = _qkv(8 * 64, B=1)
    np.testing.assert_array_equal(np.asarray(hook(q, k, v, 0)), np.asarray(dense_self_attention(q, k, v)))


def test_hook_errors():
    with pytest.raises(ValueError, match=r"layer_k\[1\]"):
        TileSparseAttention((1, 9), 8, 16)
    with pytest.raises(ValueError, match="num_frames"):
        TileSparseAttention((1,), 0, 16)
    hook = TileSparseAttention((1, 2), 4, 16)
    q, k, v = _qkv(4 * 16)
    with pytest.raises(ValueError, match="layer_index"):
        hook(q, k, v, 2)
    q, k, v = _qkv(4 * 16 + 1)
    with pytest.raises(ValueError, match="video tokens"):
        hook(q, k, v, 0)


# ---- on the video DiT ------------------------------------------------------------------------------------------

TINY = dict(patch_size=(1, 4, 4), num_attention_heads=2, attention_head_dim=16, in_channels=3, out_channels=3,
            text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=16)


@pytest.fixture(scope="module")
def dit():
    model = VideoDiT(VDiTConfig(**TINY))
    # weights large enough that attention patterns matter (the default init leaves the blocks near identity)
    params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(1), x.shape, x.dtype),
                          model.init(jax.random.key(0)))
    z = jax.random.normal(jax.random.key(2), (2, 3, T, 16, 16))
    t = jnp.array([700.0, 200.0])
    text = jax.random.normal(jax.random.key(3), (2, 4, 16))
    return model, params, (z, t, text)


def test_full_masks_equal_the_dense_model(dit):
    model, params, (z, t, text) = dit
    dense = model.apply(params, z, t, text).sample
    full = model.apply(params, z, t, text, self_attention=TileSparseAttention((None, T - 1), T, S)).sample
    np.testing.assert_array_equal(np.asarray(dense), np.asarray(full))
    sparse = model.apply(params, z, t, text, self_attention=TileSparseAttention((1, 0), T, S)).sample
    assert float(jnp.mean(jnp.square(sparse - dense))) > 1e-6  # the masks do change the output


def test_kd_loss_is_zero_for_the_teacher_and_positive_for_a_sparse_student(dit):
    model, params, (z, t, text) = dit
    full = TileSparseAttention((None, None), T, S)
    loss, m = kd_loss(model, params, params, z, t, text, full)
    assert float(loss) == 0.0 and float(m["kd_attn"]) == 0.0
    loss, m = kd_loss(model, params, params, z, t, text, TileSparseAttention((0, 0), T, S), gamma=0.5,
                      target=jnp.zeros_like(z))
    assert float(m["kd_final"]) > 0 and float(m["kd_attn"]) > 0 and float(m["kd_data"]) > 0
    assert float(loss) == pytest.approx(float(m["kd_final"] + m["kd_attn"] + 0.5 * m["kd_data"]), rel=1e-6)
    with pytest.raises(ValueError, match="gamma"):
        kd_loss(model, params, params, z, t, text, full, gamma=1.0)
    grads = jax.grad(lambda p: kd_loss(model, p, params, z, t, text, TileSparseAttention((0, 0), T, S))[0])(params)
    assert float(sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(grads))) > 0


def test_guided_kd_loss_distils_the_guided_output(dit):
    model, params, (z, t, text) = dit
    full = TileSparseAttention((None, None), T, S)
    loss, m = kd_loss(model, params, params, z, t, text, full, guidance_scale=2.0)
    assert float(loss) == 0.0
    sparse = TileSparseAttention((0, 0), T, S)
    _, m = kd_loss(model, params, params, z, t, text, sparse, beta=0.0, guidance_scale=2.0)

    def guided(hook):
        cond = model.apply(params, z, t, text, self_attention=hook).sample
        uncond = model.apply(params, z, t, jnp.zeros_like(text), self_attention=hook).sample
        return uncond + 2.0 * (cond - uncond)

    want = jnp.mean(jnp.square(guided(sparse) - guided(None)))
    assert float(m["kd_final"]) == pytest.approx(float(want), rel=1e-5)
    # the per-layer term covers both branches: it differs from the conditional branch's alone
    _, m_g = kd_loss(model, params, params, z, t, text, sparse, alpha=0.0, guidance_scale=2.0)
    _, m_c = kd_loss(model, params, params, z, t, text, sparse, alpha=0.0)
    assert float(m_g["kd_attn"]) > 0 and float(m_g["kd_attn"]) != pytest.approx(float(m_c["kd_attn"]))


def test_mask_search_thresholds(dit):
    model, params, (z, t, text) = dit
    calib = [(z, t, text)]
    strict = search_layer_k(model, params, calib, num_frames=T, tokens_per_frame=S, threshold=0.0, progress=False)
    assert strict.layer_k == (None, None) and strict.sparsity == 0.0  # r = 0 keeps every layer dense
    loose = search_layer_k(model, params, calib, num_frames=T, tokens_per_frame=S, threshold=float("inf"),
                           progress=False)
    assert loose.layer_k == (1, 1)  # r = inf: the sparsest candidate everywhere
    assert loose.sparsity == pytest.approx(attention_tile_sparsity(T, 1))
    mid = search_layer_k(model, params, calib, num_frames=T, tokens_per_frame=S, threshold=0.0, min_k=0,
                         greedy=False, progress=False)
    assert set(mid.errors) == {0, 1} and all(e > 0 for e in mid.errors[0].values() if e)
    # the errors the search measured are the sparse model's: recompute one with the block-sparse hook
    e01 = mid.errors[0][1]
    y = model.apply(params, z, t, text).sample
    ys = model.apply(params, z, t, text, self_attention=TileSparseAttention((1, None), T, S)).sample
    assert float(jnp.mean(jnp.square(ys - y)) / jnp.mean(jnp.square(y))) == pytest.approx(e01, rel=1e-3)
    # a threshold between two candidates' errors picks the sparsest under it
    r = (mid.errors[0][1] + mid.errors[0][0]) / 2 if mid.errors[0][0] > mid.errors[0][1] else None
    if r is not None:
        pick = search_layer_k(model, params, calib, num_frames=T, tokens_per_frame=S, threshold=r, min_k=0,
                              greedy=False, progress=False)
        assert pick.layer_k[0] == 1
    json.dumps(mid.to_json())
    with pytest.raises(ValueError, match="threshold"):
        search_layer_k(model, params, calib, num_frames=T, tokens_per_frame=S, threshold=-1.0)
    with pytest.raises(ValueError, match="min_k"):
        search_layer_k(model, params, calib, num_frames=T, tokens_per_frame=S, threshold=0.1, min_k=3, max_k=2)


# ---- the pipeline ----------------------------------------------------------------------------------------------


def test_pipeline_end_to_end_and_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXEFF_CACHE", str(tmp_path / "cache"))
    train_vdit(tiny_config(tmp_path / "teacher", steps=2))
    overrides = [f"teacher={tmp_path / 'teacher'}", f"output_dir={tmp_path / 'sparse'}", "search.threshold=.inf",
                 "search.calib_clips=2", "search.calib_timesteps=[500]", "kd.steps=2", "kd.batch_size=2",
                 "kd.log_every=1", "kd.checkpoint_every=1", "kd.guided=true", "eval.samples=4",
                 "eval.sample_steps=2", "eval.batch_size=4", "eval.real_clips=16",
                 # on-policy distillation: the student's own sampling trajectories, regenerated every step
                 "kd.source=student_trajectory", "kd.trajectory_clips=2", "kd.trajectory_refresh=1"]
    cfg = load_config(TileSparseConfig, CONFIG.parent / "vdit_sparse_tiny.yaml", overrides)
    report = run_tile_sparse(cfg)
    assert report["layer_k"] == [1, 1]
    assert report["attention_sparsity"] == pytest.approx(attention_tile_sparsity(T, 1))
    assert set(report["scores"]) == {"teacher", "sparse_no_kd", "student"}
    for s in report["scores"].values():
        assert np.isfinite(s["fd"]) and 0 <= s["caption_acc"] <= 1
    assert report["output_rel_err_before_kd"] > 0 and report["kd_guided"] is True
    assert report["kd_source"] == "student_trajectory"
    assert report["output_rel_err_after_kd"] != report["output_rel_err_before_kd"]  # the student was trained
    out = tmp_path / "sparse"
    assert json.loads((out / "report.json").read_text())["layer_k"] == [1, 1]
    assert json.loads((out / "search.json").read_text())["threshold"] == float("inf")
    with pytest.raises(Exception, match="--overwrite"):
        run_tile_sparse(cfg)
    # --resume reuses the search and the finished distillation: the same student, the same scores
    again = run_tile_sparse(cfg, resume=True)
    assert again["output_rel_err_after_kd"] == report["output_rel_err_after_kd"]
    assert again["scores"]["student"]["fd"] == report["scores"]["student"]["fd"]
    # eval.seed: the run's own seed reproduces the default evaluation, another seed draws other samples
    assert report["eval_seed"] == cfg.seed
    same = run_tile_sparse(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, seed=cfg.seed)), resume=True)
    assert same["scores"]["teacher"]["fd"] == report["scores"]["teacher"]["fd"]
    other = run_tile_sparse(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, seed=cfg.seed + 1)),
                            resume=True)
    assert other["eval_seed"] == cfg.seed + 1
    assert other["scores"]["teacher"]["fd"] != report["scores"]["teacher"]["fd"]
    assert other["output_rel_err_after_kd"] == report["output_rel_err_after_kd"]  # the same student


def test_trajectory_pool_holds_the_states_of_the_guided_sampler(dit):
    from jaxeff.data.video import embed_captions, moving_shapes
    from jaxeff.diffusion import ddim_trajectory, ddim_timesteps
    from jaxeff.training.vdit import ClipSource, make_denoiser

    model, params, _ = dit
    tcfg = tiny_config("unused")
    source = ClipSource(tcfg)
    pool = make_trajectory_pool(model, tcfg, source, num_clips=2, steps=3, self_attention=None, batch_size=1, seed=0)
    z, t, text = pool(params, 0)
    assert z.shape == (2, 3, 3, T, 16, 16) and text.shape[0] == 2
    np.testing.assert_array_equal(t, ddim_timesteps(3, spacing=tcfg.diffusion.sample_spacing))
    _, captions, _ = moving_shapes(source.shapes, np.arange(2), seed=tcfg.data.seed + 4)
    np.testing.assert_array_equal(text, embed_captions(captions, source.table))
    d = tcfg.diffusion
    denoise = make_denoiser(model, params, jnp.asarray(text), jnp.zeros_like(jnp.asarray(text)), d.guidance_scale)
    want, _ = ddim_trajectory(denoise, jnp.asarray(z[:, 0]), d.noise_schedule(), 3, prediction=d.prediction,
                              spacing=d.sample_spacing)
    np.testing.assert_allclose(z, np.swapaxes(np.asarray(want), 0, 1), rtol=1e-4, atol=1e-4)
    z1, _, text1 = pool(params, 1)  # another round: fresh noise and captions
    assert not np.allclose(z1[:, 0], z[:, 0]) and not np.array_equal(text1, text)


def test_kd_config_errors():
    with pytest.raises(ConfigError, match="kd.source"):
        KDConfig(source="noise")
    with pytest.raises(ConfigError, match="kd.gamma"):
        KDConfig(source="teacher_trajectory", gamma=1.0)
    with pytest.raises(ConfigError, match="kd.timesteps"):
        KDConfig(source="teacher_trajectory", timesteps=(500,))
    with pytest.raises(ConfigError, match="kd.trajectory_clips"):
        KDConfig(source="teacher_trajectory", trajectory_clips=0)


def test_layout_padding_roundtrip():
    lay = VideoTokenLayout(3, 6, 4)
    x = jnp.arange(2 * 18 * 3, dtype=jnp.float32).reshape(2, 18, 3)
    np.testing.assert_array_equal(np.asarray(lay.unpad(lay.pad(x, axis=1), axis=1)), np.asarray(x))
