"""The distillation trainer: SCott reduces to LCM, a tiny run with exact resume, the students' samplers, errors."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxeff.config import ConfigError, load_config
from jaxeff.methods.consistency.trainer import (
    ConsistencyConfig,
    init_disc_head,
    load_student,
    make_sampler,
    make_step,
    train_consistency,
)
from jaxeff.models.vdit import VideoDiT
from jaxeff.training import checkpointing as ckpt
from jaxeff.training.optim import make_optimizer
from jaxeff.training.vdit import ClipSource, load_vdit_run, train_vdit
from tests.vdit_tiny import CONFIG, FRAMES, tiny_config

CD_CONFIG = CONFIG.parent / "cd_fmnist_mcd.yaml"


def _cfg(teacher, out, *extra):
    return load_config(ConsistencyConfig, CD_CONFIG, [f"teacher={teacher}", f"output_dir={out}", "train.steps=4",
                                                      "train.batch_size=8", "train.log_every=1",
                                                      "train.progress=false", "checkpoint.every=2",
                                                      "checkpoint.keep=3", *extra])


def test_scott_without_noise_substeps_or_adversary_is_lcm(tmp_path):
    tcfg = tiny_config(tmp_path)
    model = VideoDiT(tcfg.model)
    teacher = model.init(jax.random.key(0))
    clips, text = ClipSource(tcfg).train_batch(0, 2)
    outs = []
    for extra in (["method=lcm"], ["method=scott", "eta=0.0", "sub_steps=1", "adv_weight=0.0"]):
        cfg = _cfg(tmp_path, tmp_path / "x", *extra)
        tx = optax.adam(1e-3)
        student = jax.tree.map(lambda a: a * 1.01, teacher)
        state = {"params": {"student": student, "ema": teacher}, "opt_state": {"student": tx.init(student)},
                 "step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(3))}
        new, m = jax.jit(make_step(cfg, model, tcfg, tx, None))(state, teacher, jnp.asarray(clips), jnp.asarray(text))
        outs.append((float(m["loss"]), new["params"]))
    assert outs[0][0] == outs[1][0] and outs[0][0] > 0
    for a, b in zip(jax.tree.leaves(outs[0][1]), jax.tree.leaves(outs[1][1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_scott_adversarial_gradient(tmp_path):
    """The adversarial term meets the consistency loss at the student's output: with a fixed weight the update is
    that of ``grad(L_CD + w L_adv)`` taken directly; ``grad_norm`` rescales w by the ratio of the two gradients'
    norms there."""
    from jaxeff.diffusion.consistency import consistency_output, mcm_boundaries
    from jaxeff.methods.consistency.losses import (
        consistency_distillation_loss,
        distillation_grid,
        hinge_generator_loss,
    )
    from jaxeff.methods.consistency.trainer import disc_logits
    from jaxeff.training.vdit import make_denoiser

    tcfg = tiny_config(tmp_path)
    model = VideoDiT(tcfg.model)
    teacher = model.init(jax.random.key(0))
    clips, text = (jnp.asarray(a) for a in ClipSource(tcfg).train_batch(0, 2))
    L, H, D = tcfg.model.num_layers, tcfg.model.num_attention_heads, tcfg.model.attention_head_dim
    disc = init_disc_head(jax.random.key(5), L * H * D)
    student = jax.tree.map(lambda a: a * 1.01, teacher)
    sgd = optax.sgd(1.0)
    lams = {}
    for balance in ("none", "grad_norm"):
        cfg = _cfg(tmp_path, tmp_path / "x", "method=scott", "sub_steps=2", f"adv_balance={balance}")
        state = {"params": {"student": student, "ema": teacher, "disc": disc},
                 "opt_state": {"student": sgd.init(student), "disc": optax.adam(1e-3).init(disc)},
                 "step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(3))}
        new, m = jax.jit(make_step(cfg, model, tcfg, sgd, optax.adam(1e-3)))(state, teacher, clips, text)
        lams[balance] = float(m["adv_lambda"])
        if balance != "none":
            continue
        # the same step's randomness, written out: the direct gradient of L_CD + 0.4 L_adv
        key = jax.random.fold_in(jax.random.key(3), 0)
        k_t, k_n, _, _, k_solve, k_d, k_dn = jax.random.split(key, 7)
        sched, r = tcfg.diffusion.noise_schedule(), cfg.resolved()
        grid = jnp.asarray(distillation_grid(cfg.skip), jnp.int32)
        t = grid[jax.random.randint(k_t, (2,), 0, grid.shape[0])]
        z_t = sched.add_noise(clips, jax.random.normal(k_n, clips.shape, jnp.float32), t)
        t_d = jax.random.randint(k_d, (2,), 0, cfg.disc_max_t)
        d_noise = jax.random.normal(k_dn, clips.shape)
        assert cfg.guidance_scale == 1.5 != tcfg.diffusion.guidance_scale  # the distillation's own guidance
        tch = make_denoiser(model, teacher, text, jnp.zeros_like(text), cfg.guidance_scale)

        def total(p):
            out = model.apply(p, z_t, t.astype(jnp.float32), text).sample
            cd, _ = consistency_distillation_loss(
                lambda z, tt: out, lambda z, tt: model.apply(teacher, z, tt.astype(jnp.float32), text).sample,
                tch, sched, z_t, t, boundaries=mcm_boundaries(1), skip=cfg.skip,
                prediction=tcfg.diffusion.prediction, boundary_scalings=True, eta=r["eta"],
                sub_steps=r["sub_steps"], rng=k_solve)
            f = consistency_output(sched, out, z_t, t, prediction=tcfg.diffusion.prediction, boundary_scalings=True)
            return cd + 0.4 * hinge_generator_loss(disc_logits(model, teacher, disc, f, text, t_d, d_noise, sched))

        g = jax.jit(jax.grad(total))(student)
        for a, b, gg in zip(jax.tree.leaves(new["params"]["student"]), jax.tree.leaves(student), jax.tree.leaves(g)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b - gg), rtol=1e-4, atol=1e-6)
    assert lams["none"] == pytest.approx(0.4) and lams["grad_norm"] != pytest.approx(0.4)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cd") / "teacher"
    train_vdit(tiny_config(out, steps=2))
    return out


def test_tiny_run_resumes_exactly_and_samples(teacher_run, tmp_path):
    cfg = _cfg(teacher_run, tmp_path / "mcd", "method=mcd", "segments=2")
    res = train_consistency(cfg)
    assert sorted(res.losses) == [1, 2, 3, 4] and all(np.isfinite(v) for v in res.losses.values())
    part = tmp_path / "part"
    shutil.copytree(res.run_dir, part)
    shutil.rmtree(ckpt.checkpoint_dir(part) / "4")
    res2 = train_consistency(_cfg(teacher_run, part, "method=mcd", "segments=2"), resume=True)
    assert res2.start_step == 2 and [res2.losses[s] for s in (3, 4)] == [res.losses[s] for s in (3, 4)]
    c1, tcfg, model, student, step = load_student(res.run_dir)
    _, _, _, student2, _ = load_student(part)
    assert step == 4 and c1 == cfg
    for a, b in zip(jax.tree.leaves(student), jax.tree.leaves(student2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, _, text = ClipSource(tcfg).eval_set()
    z = jax.random.normal(jax.random.key(0), (2, 3, FRAMES, 16, 16))
    for n in (1, 2):
        x = make_sampler(cfg, model, tcfg, n)(student, jnp.asarray(text[:2]), z, jax.random.key(1))
        assert x.shape == z.shape and np.all(np.isfinite(np.asarray(x))) and float(jnp.max(jnp.abs(x))) <= 1
    with pytest.raises(ConfigError, match="--resume"):
        train_consistency(cfg)


def test_sharded_run_equals_one_device(teacher_run, tmp_path, devices8):
    """8 devices (batch over data x fsdp, parameters sharded over fsdp) give the one-device losses."""
    # SCott: the student, its EMA target and the discriminator head all placed on the mesh (one solver sub-step
    # keeps the two compilations small; sub-steps are covered on one device)
    cfg = _cfg(teacher_run, tmp_path / "sharded", "method=scott", "sub_steps=1", "train.steps=2",
               "checkpoint.every=0", "mesh.data=4", "mesh.fsdp=2")
    res = train_consistency(cfg)
    tcfg, model, teacher, _ = load_vdit_run(teacher_run)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    dtx = optax.adam(cfg.disc_lr, b1=0.0, b2=0.99)
    L, H, D = tcfg.model.num_layers, tcfg.model.num_attention_heads, tcfg.model.attention_head_dim
    disc = init_disc_head(jax.random.key(cfg.seed + 1), L * H * D)
    state = {"params": {"student": teacher, "ema": teacher, "disc": disc},
             "opt_state": {"student": tx.init(teacher), "disc": dtx.init(disc)},
             "step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(cfg.seed))}
    step = jax.jit(make_step(cfg, model, tcfg, tx, dtx))
    source = ClipSource(tcfg)
    for s in (1, 2):
        clips, text = source.train_batch(s - 1, cfg.train.batch_size)
        state, m = step(state, teacher, jnp.asarray(clips), jnp.asarray(text))
        assert float(m["loss"]) == pytest.approx(res.losses[s], rel=1e-4)
    # the SCott run (student, EMA target and discriminator checkpointed) loads and samples like the others
    _, _, _, student, step_ = load_student(res.run_dir)
    assert step_ == 2
    _, _, text = source.eval_set()
    z = jax.random.normal(jax.random.key(0), (2, 3, FRAMES, 16, 16))
    x = make_sampler(cfg, model, tcfg, 2)(student, jnp.asarray(text[:2]), z, jax.random.key(1))
    assert np.all(np.isfinite(np.asarray(x)))
    with pytest.raises(ConfigError, match="data-parallel"):
        train_consistency(_cfg(teacher_run, tmp_path / "bad", "train.batch_size=4", "mesh.data=8"))


@pytest.mark.parametrize("method", ["lcm", "mlcm"])  # scott: test_sharded_run_equals_one_device
def test_other_methods_train_and_sample(teacher_run, tmp_path, method):
    cfg = _cfg(teacher_run, tmp_path / method, f"method={method}", "train.steps=2", "checkpoint.every=0")
    res = train_consistency(cfg)
    assert sorted(res.losses) == [1, 2] and all(np.isfinite(v) for v in res.losses.values())
    _, tcfg, model, student, _ = load_student(res.run_dir)
    _, _, text = ClipSource(tcfg).eval_set()
    z = jax.random.normal(jax.random.key(0), (2, 3, FRAMES, 16, 16))
    x = make_sampler(cfg, model, tcfg, 2)(student, jnp.asarray(text[:2]), z, jax.random.key(1))
    assert np.all(np.isfinite(np.asarray(x)))


@pytest.mark.parametrize("method, extra, good, bad", [
    ("mcd", ["segments=4"], (1, 2, 4), (3, 8)),   # on its own boundaries only
    ("mlcm", [], (1, 3, 8), (9,)),                # the TLCM milestones
    ("lcm", [], (1, 7, 50), (51,)),               # the 1000 // skip distillation grid
])
def test_sampler_step_range(tmp_path, method, extra, good, bad):
    tcfg = tiny_config(tmp_path)
    model = VideoDiT(tcfg.model)
    cfg = _cfg(tmp_path, tmp_path / "x", f"method={method}", *extra)
    for n in good:
        make_sampler(cfg, model, tcfg, n)
    for n in bad:
        with pytest.raises(ValueError, match="num_steps"):
            make_sampler(cfg, model, tcfg, n)
    if method == "mlcm":  # also deterministically on its 8 segment boundaries: divisors of 8
        make_sampler(cfg, model, tcfg, 4, sampler="mcm")
        with pytest.raises(ValueError, match="num_steps"):
            make_sampler(cfg, model, tcfg, 3, sampler="mcm")
    with pytest.raises(ValueError, match="sampler"):
        make_sampler(cfg, model, tcfg, 1, sampler="mcm" if method == "lcm" else "lcm")


@pytest.mark.parametrize("override, match", [
    (["method=dmd"], "method"),
    (["method=mlcm", "segments=4"], "segments"),
    (["ema_decay=1.0"], "ema_decay"),
    (["train.grad_accum=2", "train.batch_size=4"], "grad_accum"),
    (["skip=0"], "skip"),
    (["space=w"], "space"),
    (["guidance_scale=0"], "guidance_scale"),
    (["guidance_scale=.nan"], "guidance_scale"),
])
def test_config_errors(tmp_path, override, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        _cfg(tmp_path, tmp_path / "x", *override)


def test_load_student_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a consistency"):
        load_student(tmp_path)


def test_student_of_a_retrained_teacher_and_schedule_mismatch(tmp_path):
    train_vdit(tiny_config(tmp_path / "teacher", steps=1))
    cfg = _cfg(tmp_path / "teacher", tmp_path / "mcd", "method=mcd", "segments=2", "train.steps=1",
               "checkpoint.every=0")
    train_consistency(cfg)
    # the teacher run is replaced by one of another shape: the student no longer loads, with a clear error
    train_vdit(tiny_config(tmp_path / "teacher", steps=1, extra=["model.ffn_dim=32"]), overwrite=True)
    named = (r"does not match the model of its teacher.*\['student'\]\['layers'\]\['mlp'\]\['down'\]\['kernel'\]: "
             r"stored \(2, 64, 32\), expected \(2, 32, 32\)")
    with pytest.raises(ValueError, match=named):
        load_student(tmp_path / "mcd")
    # a teacher run with a 500-step schedule (the schedule does not change the parameters' shapes)
    shutil.copytree(tmp_path / "teacher", tmp_path / "t500")
    config = tmp_path / "t500" / "config.yaml"
    config.write_text(config.read_text().replace("num_train_timesteps: 1000", "num_train_timesteps: 500"))
    assert "num_train_timesteps: 500" in config.read_text()
    with pytest.raises(ConfigError, match="1000-step"):
        train_consistency(_cfg(tmp_path / "t500", tmp_path / "mlcm", "method=mlcm", "train.steps=1"))
