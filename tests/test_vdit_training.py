"""The video DiT trainer: a tiny run, bit-exact resume, the run directory, sampling and configuration errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.config import ConfigError
from jaxeff.training import checkpointing as ckpt
from jaxeff.training.vdit import ClipSource, load_vdit_run, sample_clips, train_vdit
from tests.vdit_tiny import FRAMES, tiny_config


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vdit") / "full"
    cfg = tiny_config(out)
    return cfg, train_vdit(cfg)


def test_tiny_run_trains_and_writes_its_run_directory(full_run):
    cfg, res = full_run
    assert res.start_step == 0 and res.final_step == 4 and sorted(res.losses) == [1, 2, 3, 4]
    assert all(np.isfinite(v) for v in res.losses.values())
    assert res.eval_loss is not None and np.isfinite(res.eval_loss) and res.eval_x0_mse > 0
    run = ckpt.checkpoint_dir(res.run_dir)
    assert sorted(int(p.name) for p in run.iterdir() if p.name.isdigit()) == [2, 4]
    rows = [json.loads(line) for line in open(f"{res.run_dir}/metrics.jsonl")]
    kinds = {r["kind"] for r in rows}
    assert {"train", "eval"} <= kinds
    loaded_cfg, model, params, step = load_vdit_run(res.run_dir)
    assert loaded_cfg == cfg and step == 4
    assert jax.tree.structure(params) == jax.tree.structure(jax.eval_shape(model.init, jax.random.key(0)))


def test_resume_continues_bit_exactly(full_run, tmp_path):
    cfg, res = full_run
    # A run that stopped after step 2: the full run's directory with only its step-2 checkpoint.
    part = tmp_path / "part"
    shutil.copytree(res.run_dir, part)
    shutil.rmtree(ckpt.checkpoint_dir(part) / "4")
    (part / "metrics.jsonl").unlink()
    cfg2 = tiny_config(part)
    res2 = train_vdit(cfg2, resume=True)
    assert res2.start_step == 2 and sorted(res2.losses) == [3, 4]
    for s in (3, 4):
        assert res2.losses[s] == res.losses[s]
    _, _, p_full, _ = load_vdit_run(res.run_dir)
    _, _, p_res, _ = load_vdit_run(part)
    for a, b in zip(jax.tree.leaves(p_full), jax.tree.leaves(p_res)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checkpoint_of_another_shape_names_the_parameters(full_run, tmp_path):
    _, res = full_run
    # a copy of the run whose config now asks for a narrower feed-forward than its checkpoint holds
    other = tmp_path / "other"
    shutil.copytree(res.run_dir, other)
    config = other / "config.yaml"
    config.write_text(config.read_text().replace("ffn_dim: 64", "ffn_dim: 32"))
    assert "ffn_dim: 32" in config.read_text()
    named = (r"do not match the model: \['layers'\]\['mlp'\]\['down'\]\['kernel'\]: stored \(2, 64, 32\), "
             r"expected \(2, 32, 32\)")
    with pytest.raises(ValueError, match=named):
        load_vdit_run(other)
    with pytest.raises(ValueError, match="do not match the model"):
        train_vdit(tiny_config(other, steps=6, extra=["model.ffn_dim=32"]), resume=True)


def test_new_run_refuses_a_directory_with_checkpoints(full_run):
    cfg, res = full_run
    with pytest.raises(ConfigError, match="--resume"):
        train_vdit(cfg)


def test_sample_clips_with_guidance(full_run):
    cfg, res = full_run
    tcfg, model, params, _ = load_vdit_run(res.run_dir)
    _, _, text = ClipSource(tcfg).eval_set()
    text = jnp.asarray(text[:2])
    clips = sample_clips(model, params, text, tcfg.diffusion, jax.random.key(0), steps=2,
                         frames_hw=(FRAMES, 16, 16))
    assert clips.shape == (2, 3, FRAMES, 16, 16)
    assert np.all(np.isfinite(np.asarray(clips))) and float(jnp.max(jnp.abs(clips))) <= 1.0
    z = jax.random.normal(jax.random.key(1), clips.shape)
    a = sample_clips(model, params, text, tcfg.diffusion, None, steps=2, z_T=z, guidance_scale=1.0)
    b = sample_clips(model, params, text, tcfg.diffusion, None, steps=2, z_T=z, guidance_scale=4.0)
    assert not np.allclose(np.asarray(a), np.asarray(b))  # guidance changes the samples
    with pytest.raises(ValueError, match="z_T or frames_hw"):
        sample_clips(model, params, text, tcfg.diffusion, jax.random.key(0))


@pytest.mark.parametrize("override, match", [
    (["data.frames=5", "model.patch_size=[2,4,4]"], "patch_size"),
    (["data.caption_dropout=1.0"], "caption_dropout"),
    (["diffusion.schedule=quadratic"], "diffusion.schedule"),
    (["diffusion.sample_steps=0"], "sample_steps"),
    (["model.in_channels=4"], "in_channels"),
    (["data.size=8"], "size"),
])
def test_config_errors(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config(tmp_path, extra=override)


def test_load_vdit_run_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a video DiT run"):
        load_vdit_run(tmp_path)
