"""Efficient-vDiT end to end (stage 1 -> 2 -> 3) on a tiny teacher: the report, resume, the search with the
student's sampler, and configuration errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.attention.tile_masks import attention_tile_sparsity
from jaxeff.config import ConfigError, load_config
from jaxeff.data import fashion_mnist as fm
from jaxeff.methods.consistency.trainer import load_student, make_sampler, student_sample_fn
from jaxeff.methods.efficient_vdit import EfficientVDiTConfig, forward_passes, run_efficient_vdit, student_timesteps
from jaxeff.methods.tile_sparse.attention import TileSparseAttention
from jaxeff.training.vdit import ClipSource, train_vdit
from tests.vdit_tiny import CONFIG, FRAMES, TOKENS_PER_FRAME, tiny_config

E2E_CONFIG = CONFIG.parent / "efficient_vdit_tiny.yaml"


def _overrides(tmp_path, *extra):
    return [f"teacher={tmp_path / 'teacher'}", f"output_dir={tmp_path / 'e2e'}", "stage1.segments=2",
            "stage1.train.steps=2", "stage1.train.batch_size=8", "stage1.train.log_every=1",
            "stage1.train.progress=false", "stage1.checkpoint.every=1", "search.threshold=.inf",
            "search.calib_clips=2", "kd.steps=2", "kd.batch_size=2", "kd.log_every=1", "kd.checkpoint_every=1",
            "eval.samples=4", "eval.batch_size=4", "eval.real_clips=16", *extra]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("evdit")
    train_vdit(tiny_config(root / "teacher", steps=2))
    return root


def test_end_to_end_report_and_resume(teacher_dir, monkeypatch):
    monkeypatch.setenv("JAXEFF_CACHE", str(teacher_dir / "cache"))
    cfg = load_config(EfficientVDiTConfig, E2E_CONFIG, _overrides(teacher_dir))
    report = run_efficient_vdit(cfg)
    T = FRAMES
    assert report["layer_k"] == [1, 1]  # r = inf: the sparsest candidate in every layer
    assert report["attention_sparsity"] == pytest.approx(attention_tile_sparsity(T, 1))
    assert set(report["scores"]) == {"teacher", "mcd", "sparse_no_kd", "student"}
    assert report["stage1"]["segments"] == 2 and report["stage1"]["sample_steps"] == 2
    assert report["kd_timesteps"] == [999, 499]  # the 2-step student's timesteps
    sc = report["scores"]
    # the teacher's default sampler: 4 guided DDIM steps (tiny config) = 8 passes; the student: 2 unguided steps
    assert sc["teacher"]["forward_passes"] == 8 and sc["student"]["forward_passes"] == 2
    assert sc["student"]["steps_speedup"] == 4.0
    assert sc["student"]["steps_x_attention_speedup"] == pytest.approx(4.0 / (1 - attention_tile_sparsity(T, 1)))
    assert sc["teacher"]["speedup"] == 1.0 and sc["teacher"]["fd_change_vs_teacher"] == 0.0
    for s in sc.values():
        assert np.isfinite(s["fd"]) and 0 <= s["caption_acc"] <= 1 and s["sample_s"] > 0
    assert report["output_rel_err_before_kd"] > 0
    out = teacher_dir / "e2e"
    assert (out / "stage1" / "final.json").exists() and (out / "sparse" / "search.json").exists()
    assert json.loads((out / "report.json").read_text())["layer_k"] == [1, 1]
    with pytest.raises(ConfigError, match="--overwrite"):
        run_efficient_vdit(cfg)
    # --resume reuses stage 1, the search and the finished distillation: the same students, the same scores
    again = run_efficient_vdit(cfg, resume=True)
    assert again["output_rel_err_after_kd"] == report["output_rel_err_after_kd"]
    for name in ("mcd", "student"):
        assert again["scores"][name]["fd"] == report["scores"][name]["fd"]
    # a finished stage 1 of another configuration is not silently reused
    other = load_config(EfficientVDiTConfig, E2E_CONFIG, _overrides(teacher_dir, "stage1.segments=4"))
    with pytest.raises(ConfigError, match="stage1"):
        run_efficient_vdit(other, resume=True)

    # the student's sampler with a sparse hook == the jitted sampler with the same hook
    ccfg, tcfg, model, student, _ = load_student(out / "stage1")
    _, _, text = ClipSource(tcfg).eval_set()
    z = jax.random.normal(jax.random.key(0), (2, 3, FRAMES, 16, 16))
    hook = TileSparseAttention((1, None), FRAMES, TOKENS_PER_FRAME)
    a = make_sampler(ccfg, model, tcfg, 2, self_attention=hook)(student, jnp.asarray(text[:2]), z, jax.random.key(1))
    b = student_sample_fn(ccfg, model, tcfg, 2)(student, jnp.asarray(text[:2]), z, jax.random.key(1), hook)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    dense = make_sampler(ccfg, model, tcfg, 2)(student, jnp.asarray(text[:2]), z, jax.random.key(1))
    assert float(jnp.max(jnp.abs(dense - a))) > 0  # the hook is really used


def test_student_timesteps_and_passes(teacher_dir):
    cfg = load_config(EfficientVDiTConfig, E2E_CONFIG, _overrides(teacher_dir, "stage1.segments=4"))
    tcfg = tiny_config(teacher_dir / "teacher")
    assert student_timesteps(cfg.consistency_config(teacher_dir), tcfg, 4) == (999, 749, 499, 249)
    mlcm = load_config(EfficientVDiTConfig, E2E_CONFIG, _overrides(teacher_dir, "stage1.method=mlcm",
                                                                  "stage1.segments=8"))
    assert student_timesteps(mlcm.consistency_config(teacher_dir), tcfg, 4) == (999, 749, 499, 124)
    assert forward_passes(50, 2.0) == 100 and forward_passes(50, 1.0) == 50


@pytest.mark.parametrize("override, match", [
    (["stage1.method=lcm"], "stage1.method"),
    (["sample_steps=3"], "num_steps"),      # a 2-segment MCD student samples with 1 or 2 steps
    (["kd.timesteps=[]"], "kd.timesteps"),
    (["kd.guided=true"], "kd.guided"),     # the stage-1 student samples without guidance
    (["kd.source=teacher_trajectory"], "kd.source"),  # its sampler is not DDIM
])
def test_config_errors(teacher_dir, override, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        cfg = load_config(EfficientVDiTConfig, E2E_CONFIG, _overrides(teacher_dir, *override,
                                                                      f"output_dir={teacher_dir / 'bad'}"))
        run_efficient_vdit(cfg)


@pytest.mark.skipif(not fm.available(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_teacher_of_another_dataset_is_an_error(tmp_path):
    images = ["data.dataset=fashion_mnist", "data.frames=1", "data.size=32", "model.in_channels=1",
              "model.out_channels=1"]
    train_vdit(tiny_config(tmp_path / "teacher", steps=1, extra=images))
    cfg = load_config(EfficientVDiTConfig, E2E_CONFIG, _overrides(tmp_path))
    with pytest.raises(ConfigError, match="moving_shapes"):
        run_efficient_vdit(cfg)


def test_cli_reports_config_errors(capsys):
    from train.efficient_vdit import main

    assert main(["--config", str(E2E_CONFIG), "stage1.method=lcm"]) == 2
    assert "stage1.method" in capsys.readouterr().err
