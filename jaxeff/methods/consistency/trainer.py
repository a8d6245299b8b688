"""Few-step students distilled from a DiT teacher run (``train.vdit``): multistep consistency distillation (MCD),
LCM, MLCM and SCott, with progress, checkpoints and exact resume.

    cfg = load_config(ConsistencyConfig, "configs/cd_fmnist_mcd.yaml")
    result = train_consistency(cfg, resume=True)

Every method is ``consistency_distillation_loss`` (``losses.py``) with a preset:

| method | segments S | f | teacher | target θ⁻ | data | sampler |
|---|---|---|---|---|---|---|
| ``mcd`` | 4 | x̂ | DDIM (η = 0) | the student, stop-grad | noised real data | multistep consistency, S steps |
| ``lcm`` | 1 | c_skip z + c_out x̂ | DDIM (η = 0) | EMA 0.95 | noised real data | LCM (fresh noise) |
| ``mlcm`` | 8 | x̂ | DDIM (η = 0) | the student, stop-grad | teacher trajectories (no data) | TLCM milestones |
| ``scott`` | 1 | c_skip z + c_out x̂ | η-DDIM (η = 0.2), h = 3 sub-steps | EMA 0.95 | noised real data | LCM |

Every field of a preset can be overridden (``segments``, ``ema_decay``, ``eta``, ``sub_steps``, ``adv_weight``).
The teacher's guidance (``guidance_scale``, default the teacher's) is baked into its steps, so students sample
without guidance. The student starts from the teacher's weights and sees the conditioning (captions or classes)
without dropout. SCott's adversarial term (``adv_weight`` > 0, default 0.4): a discriminator made of the frozen
teacher (run at ``t_d`` uniform in ``[0, disc_max_t)`` on the re-noised image) whose per-layer self-attention
outputs, mean-pooled over tokens, feed a trainable two-layer head; hinge losses, real training images as positives
(the paper's discriminator is the teacher U-Net with LoRA on the decoder; the exact input was not recoverable).

The run directory holds ``config.yaml``, ``metrics.jsonl``, ``checkpoints/`` (student, EMA target, discriminator
and their optimizer states) and, at the end, ``final.json``. Runs on a mesh (``mesh``, default: data parallel over
every device): the batch is split over the data axes, the student, its EMA target and the teacher are sharded by
the model's logical axes (``fsdp``/``tensor``), the discriminator head is replicated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import shutil
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from tqdm.auto import tqdm

from jaxeff import sharding as shd
from jaxeff.config import ConfigError, config_error, from_dict, to_dict
from jaxeff.diffusion.consistency import (
    consistency_output,
    lcm_sample,
    lcm_timesteps,
    mcm_boundaries,
    mcm_sample,
    tlcm_sample,
    tlcm_subset,
)
from jaxeff.methods.consistency.losses import (
    DISTANCES,
    SPACES,
    consistency_distillation_loss,
    distillation_grid,
    hinge_discriminator_loss,
    hinge_generator_loss,
    segment_timesteps,
    trajectory_states,
)
from jaxeff.sharding import MeshConfig
from jaxeff.training import checkpointing as ckpt
from jaxeff.training.config import CheckpointConfig, LoopConfig, OptimConfig
from jaxeff.training.metrics import TB_DIR, MetricsLogger, StepMetrics
from jaxeff.training.optim import lr_schedule, make_optimizer
from jaxeff.training.steps import opt_state_shardings, replicated
from jaxeff.training.vdit import ClipSource, load_vdit_run, make_denoiser

METHODS = ("mcd", "lcm", "mlcm", "scott")
_PRESETS = {
    "mcd": dict(segments=4, ema_decay=0.0, eta=0.0, sub_steps=1, adv_weight=0.0, boundary_scalings=False),
    "lcm": dict(segments=1, ema_decay=0.95, eta=0.0, sub_steps=1, adv_weight=0.0, boundary_scalings=True),
    "mlcm": dict(segments=8, ema_decay=0.0, eta=0.0, sub_steps=1, adv_weight=0.0, boundary_scalings=False),
    "scott": dict(segments=1, ema_decay=0.95, eta=0.2, sub_steps=3, adv_weight=0.4, boundary_scalings=True),
}


@dataclasses.dataclass(frozen=True)
class ConsistencyConfig:
    """A distillation run. ``null`` fields take the method's preset (module docstring)."""

    teacher: str = "runs/dit_fmnist"
    output_dir: str = "runs/cd"
    seed: int = 0
    method: str = "mcd"
    segments: Optional[int] = None
    skip: int = 20
    ema_decay: Optional[float] = None
    eta: Optional[float] = None
    sub_steps: Optional[int] = None
    adv_weight: Optional[float] = None
    adv_balance: str = "grad_norm"
    disc_lr: float = 2e-4
    disc_max_t: int = 500
    space: str = "z"
    distance: str = "l2"
    guidance_scale: Optional[float] = None
    optim: OptimConfig = OptimConfig(lr=1e-4, warmup_steps=50, min_lr_ratio=0.1, weight_decay=0.0)
    train: LoopConfig = LoopConfig(steps=1000, batch_size=32, log_every=20, eval_every=0)
    checkpoint: CheckpointConfig = CheckpointConfig(every=250, keep=2, async_save=False)
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        if self.method not in METHODS:
            raise config_error("method", f"one of {METHODS}", self.method)
        if self.space not in SPACES:
            raise config_error("space", f"one of {SPACES}", self.space)
        if self.adv_balance not in ("grad_norm", "none"):
            raise config_error("adv_balance", "'grad_norm' or 'none'", self.adv_balance)
        if self.distance not in DISTANCES:
            raise config_error("distance", f"one of {DISTANCES}", self.distance)
        r = self.resolved()
        if r["segments"] < 1:
            raise config_error("segments", "an int >= 1", r["segments"])
        if self.method == "mlcm" and r["segments"] != 8:
            raise config_error("segments", "8 for mlcm (the TLCM sampler's milestones)", r["segments"])
        if not 0.0 <= r["ema_decay"] < 1.0:
            raise config_error("ema_decay", "a float in [0, 1) (0: no EMA)", r["ema_decay"])
        if r["eta"] < 0:
            raise config_error("eta", "a float >= 0", r["eta"])
        if r["sub_steps"] < 1:
            raise config_error("sub_steps", "an int >= 1", r["sub_steps"])
        if r["adv_weight"] < 0:
            raise config_error("adv_weight", "a float >= 0", r["adv_weight"])
        if self.train.grad_accum != 1:
            raise config_error("train.grad_accum", "1 (not supported by the distillation trainer)",
                               self.train.grad_accum)
        distillation_grid(self.skip)  # raises on a bad skip
        if not 1 <= self.disc_max_t <= 1000:
            raise config_error("disc_max_t", "an int in [1, 1000]", self.disc_max_t)
        if self.guidance_scale is not None and not (self.guidance_scale > 0 and math.isfinite(self.guidance_scale)):
            raise config_error("guidance_scale", "a positive float (1: no guidance) or null (the teacher's)",
                               self.guidance_scale)

    def distill_guidance(self, tcfg) -> float:
        """The guidance baked into the student: ``guidance_scale``, or the teacher run ``tcfg``'s when unset."""
        return tcfg.diffusion.guidance_scale if self.guidance_scale is None else self.guidance_scale

    def resolved(self) -> dict:
        """The method's preset with this config's explicit fields applied."""
        out = dict(_PRESETS[self.method])
        for k in ("segments", "ema_decay", "eta", "sub_steps", "adv_weight"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out


@dataclasses.dataclass
class ConsistencyResult:
    run_dir: str
    start_step: int
    final_step: int
    losses: dict
    wall_time_s: float


# ---- the discriminator (SCott) ---------------------------------------------------------------------------------


def init_disc_head(rng, in_dim: int, hidden: int = 256) -> dict:
    k1, k2 = jax.random.split(rng)
    return {"l0": {"w": jax.random.normal(k1, (in_dim, hidden)) * in_dim ** -0.5, "b": jnp.zeros((hidden,))},
            "l1": {"w": jax.random.normal(k2, (hidden, 1)) * hidden ** -0.5, "b": jnp.zeros((1,))}}


def disc_logits(model, teacher_params, head, x, text, t_d, noise, sched):
    """The discriminator: frozen teacher features of ``x`` re-noised to ``t_d``, a trainable head."""
    z = sched.add_noise(x, noise, t_d)
    out = model.apply(teacher_params, z, t_d.astype(jnp.float32), text, return_attention_outputs=True)
    feats = jnp.mean(out.attention_outputs, axis=2)  # [L, B, H*D]
    feats = jnp.transpose(feats, (1, 0, 2)).reshape(x.shape[0], -1)
    h = jax.nn.gelu(feats @ head["l0"]["w"] + head["l0"]["b"])
    return (h @ head["l1"]["w"] + head["l1"]["b"])[:, 0]


# ---- training --------------------------------------------------------------------------------------------------


def _say(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)


def _prepare(out_dir: pathlib.Path, resume: bool, overwrite: bool) -> None:
    cdir = ckpt.checkpoint_dir(out_dir)
    if cdir.exists() and any(cdir.iterdir()) and not resume and not overwrite:
        raise ConfigError(f"config field 'output_dir': expected a directory without checkpoints for a new run, got "
                          f"{str(out_dir)!r} which has some; pass --resume to continue it or --overwrite")
    if overwrite and not resume:
        shutil.rmtree(cdir, ignore_errors=True)
        shutil.rmtree(out_dir / TB_DIR, ignore_errors=True)
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)
        (out_dir / "final.json").unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def make_step(cfg: ConsistencyConfig, model, tcfg, tx, dtx, mesh=None):
    """The distillation step ``(state, teacher_params, clips, text) -> (state, metrics)`` (to be jitted); ``mesh``
    activates the model's activation-sharding constraints."""
    r = cfg.resolved()
    sched = tcfg.diffusion.noise_schedule()
    prediction = tcfg.diffusion.prediction
    g = cfg.distill_guidance(tcfg)
    boundaries = mcm_boundaries(r["segments"], sched.num_train_timesteps)
    grid = distillation_grid(cfg.skip, sched.num_train_timesteps)
    grid_j = jnp.asarray(grid, jnp.int32)
    M = r["segments"]
    adv = r["adv_weight"] > 0

    def step(state, teacher_params, clips, text):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        k_t, k_n, k_s, k_u, k_solve, k_d, k_dn = jax.random.split(key, 7)
        B = clips.shape[0]
        teacher = make_denoiser(model, teacher_params, text, jnp.zeros_like(text), g)
        if cfg.method == "mlcm":
            seg = jax.random.randint(k_s, (B,), 0, M)  # 0: the top segment (one teacher step from the noise)
            t = segment_timesteps(boundaries, seg, jax.random.uniform(k_u, (B,)), grid)
            z_T = jax.random.normal(k_n, clips.shape, jnp.float32)
            z_t = jax.lax.stop_gradient(trajectory_states(teacher, sched, z_T, t, seg + 1, M,
                                                          prediction=prediction))
        else:
            t = grid_j[jax.random.randint(k_t, (B,), 0, grid_j.shape[0])]
            z_t = sched.add_noise(clips, jax.random.normal(k_n, clips.shape, jnp.float32), t)

        params_target = state["params"]["ema"] if r["ema_decay"] > 0 else None
        student_out = lambda p: model.apply(p, z_t, t.astype(jnp.float32), text).sample
        if adv:
            t_d = jax.random.randint(k_d, (B,), 0, cfg.disc_max_t)
            d_noise = jax.random.normal(k_dn, clips.shape)

        def cd_loss(p_student, out):
            """The consistency loss, given the student's output ``out`` at ``z_t``."""
            tp = params_target if params_target is not None else jax.lax.stop_gradient(p_student)
            target = lambda z, tt: model.apply(tp, z, tt.astype(jnp.float32), text).sample
            return consistency_distillation_loss(
                lambda z, tt: out, target, teacher, sched, z_t, t, boundaries=boundaries, skip=cfg.skip,
                prediction=prediction, boundary_scalings=r["boundary_scalings"], eta=r["eta"],
                sub_steps=r["sub_steps"], rng=k_solve if r["eta"] > 0 else None, space=cfg.space,
                distance=cfg.distance)

        params = state["params"]
        if not adv:
            (total, aux), g_student = jax.value_and_grad(lambda p: cd_loss(p, student_out(p)),
                                                         has_aux=True)(params["student"])
            metrics = {"cd_loss": total}
        else:
            # The two terms' gradients meet at the student's output: one forward, one backward through the student.
            p_s = params["student"]
            out, pull = jax.vjp(student_out, p_s)
            (cd, aux), g_cd = jax.value_and_grad(lambda o: cd_loss(p_s, o), has_aux=True)(out)

            def gen_loss(o):
                f = consistency_output(sched, o, z_t, t, prediction=prediction,
                                       boundary_scalings=r["boundary_scalings"])
                return hinge_generator_loss(disc_logits(model, teacher_params, params["disc"], f, text, t_d, d_noise,
                                                        sched))

            g_loss, g_adv = jax.value_and_grad(gen_loss)(out)
            lam = jnp.asarray(r["adv_weight"], jnp.float32)
            if cfg.adv_balance == "grad_norm":
                lam = lam * optax.tree.norm(g_cd) / (optax.tree.norm(g_adv) + 1e-12)
            lam = jax.lax.stop_gradient(lam)
            (g_student,) = pull(g_cd + lam * g_adv)
            total = cd + lam * g_loss
            metrics = {"cd_loss": cd, "g_loss": g_loss, "adv_lambda": lam}
        f_student = aux["f_student"]
        upd, opt_s = tx.update(g_student, state["opt_state"]["student"], params["student"])
        new_params = {**params, "student": optax.apply_updates(params["student"], upd)}
        new_opt = {**state["opt_state"], "student": opt_s}
        if r["ema_decay"] > 0:
            d = r["ema_decay"]
            new_params["ema"] = jax.tree.map(lambda e, s: d * e + (1 - d) * s, params["ema"], new_params["student"])
        if adv:
            def d_loss_fn(head):
                real = disc_logits(model, teacher_params, head, clips, text, t_d, d_noise, sched)
                fake = disc_logits(model, teacher_params, head, jax.lax.stop_gradient(f_student), text, t_d,
                                   d_noise, sched)
                return hinge_discriminator_loss(real, fake)

            d_loss, d_grads = jax.value_and_grad(d_loss_fn)(params["disc"])
            d_upd, d_opt = dtx.update(d_grads, state["opt_state"]["disc"], params["disc"])
            new_params["disc"] = optax.apply_updates(params["disc"], d_upd)
            new_opt["disc"] = d_opt
            metrics["d_loss"] = d_loss
        metrics["loss"] = total
        return {**state, "params": new_params, "opt_state": new_opt, "step": state["step"] + 1}, metrics

    if mesh is None:
        return step

    def step_on_mesh(*args):
        with shd.activate(mesh):
            return step(*args)

    return step_on_mesh


SAMPLERS = ("mcm", "lcm", "tlcm")


def default_sampler(cfg: ConsistencyConfig) -> str:
    """The method's own sampler: ``mcm`` (deterministic multistep consistency) for MCD, ``lcm`` (re-noising with
    boundary scalings) for LCM and SCott, ``tlcm`` (re-noising on the TLCM milestones, the official inference)
    for MLCM."""
    if cfg.method == "mlcm":
        return "tlcm"
    return "lcm" if cfg.resolved()["boundary_scalings"] else "mcm"


def student_sample_fn(cfg: ConsistencyConfig, model, tcfg, num_steps: int, sampler: Optional[str] = None):
    """``fn(params, text, z_T, rng, self_attention=None) -> samples`` (traceable, not jitted): a few-step sampler
    for the student, without guidance; ``sampler`` (default: ``default_sampler(cfg)``) may also be ``mcm`` for an
    MLCM student (deterministic steps on its segment boundaries, which are the TLCM milestones).
    ``self_attention`` is the model's self-attention hook (a sparse attention, or a traced mask during a mask
    search). Raises ``ValueError`` for a step count outside what the student was trained for: ``mcm`` on a student
    with ``S`` segments samples on its own boundaries, so with a divisor of ``S`` steps; ``tlcm`` with 1..8; ``lcm``
    with 1 .. ``1000 // skip``."""
    r = cfg.resolved()
    sched = tcfg.diffusion.noise_schedule()
    prediction = tcfg.diffusion.prediction
    sampler = default_sampler(cfg) if sampler is None else sampler
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {SAMPLERS}, got {sampler!r}")
    if sampler != default_sampler(cfg) and not (sampler == "mcm" and cfg.method == "mlcm"):
        raise ValueError(f"sampler: a {cfg.method} student samples with {default_sampler(cfg)!r}"
                         f"{' or mcm' if cfg.method == 'mlcm' else ''}, got {sampler!r}")
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps: expected a positive int, got {num_steps!r}")
    if sampler == "tlcm":
        tlcm_subset(num_steps)  # raises outside 1..8
    elif sampler == "lcm":
        ts = lcm_timesteps(num_steps, sched.num_train_timesteps // cfg.skip, sched.num_train_timesteps)
    elif r["segments"] % num_steps:
        raise ValueError(f"num_steps: a {cfg.method} student distilled with {r['segments']} segments samples on its "
                         f"segment boundaries, so with a divisor of {r['segments']} steps; got {num_steps}")

    def sample(params, text, z_T, rng, self_attention=None):
        f = lambda z, t: model.apply(params, z, t.astype(jnp.float32), text, self_attention=self_attention).sample
        if sampler == "tlcm":
            return tlcm_sample(f, z_T, sched, num_steps, rng=rng, prediction=prediction, clip_sample=1.0)
        if sampler == "lcm":
            return lcm_sample(f, z_T, sched, num_steps, rng=rng, prediction=prediction, timesteps=ts,
                              clip_sample=1.0)
        return mcm_sample(f, z_T, sched, mcm_boundaries(num_steps, sched.num_train_timesteps),
                          prediction=prediction, clip_sample=1.0)

    return sample


def make_sampler(cfg: ConsistencyConfig, model, tcfg, num_steps: int, self_attention=None,
                 sampler: Optional[str] = None):
    """``fn(params, text, z_T, rng) -> samples``, jitted: ``student_sample_fn`` with a fixed (hashable)
    self-attention hook (``None``: the model's dense attention)."""
    fn = student_sample_fn(cfg, model, tcfg, num_steps, sampler)
    return jax.jit(lambda params, text, z_T, rng: fn(params, text, z_T, rng, self_attention))


def train_consistency(cfg: ConsistencyConfig, *, resume: bool = False, overwrite: bool = False) -> ConsistencyResult:
    t0 = time.time()
    out_dir = pathlib.Path(cfg.output_dir).absolute()
    _prepare(out_dir, resume, overwrite)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    r = cfg.resolved()
    mesh = shd.make_mesh(cfg.mesh)
    shape = cfg.mesh.shape(mesh.size)
    data_par = shape[0] * shape[1] * shape[2]
    if cfg.train.batch_size % data_par:
        raise config_error("train.batch_size", f"a multiple of the data-parallel size {data_par}",
                           cfg.train.batch_size)
    rep = replicated(mesh)
    tcfg, model, teacher, tstep = load_vdit_run(cfg.teacher, mesh=mesh)
    n_train = tcfg.diffusion.num_train_timesteps
    if cfg.method == "mlcm" and n_train != 1000:
        raise ConfigError(f"config field 'teacher': mlcm samples on the TLCM milestones of a 1000-step schedule, "
                          f"the teacher {cfg.teacher} has {n_train} training timesteps")
    distillation_grid(cfg.skip, n_train)  # raises for a skip the teacher's schedule cannot hold
    param_sh = shd.tree_shardings(model.param_axes(), teacher, mesh)
    source = ClipSource(tcfg)
    loop = cfg.train
    B = loop.batch_size
    _say(f"[consistency] {cfg.method}: teacher {cfg.teacher} (step {tstep}), {r}, mesh {dict(mesh.shape)}")

    tx = make_optimizer(cfg.optim, loop.steps)
    dtx = optax.adam(cfg.disc_lr, b1=0.0, b2=0.99)
    params = {"student": jax.tree.map(jnp.copy, teacher)}
    sh_params = {"student": param_sh}
    if r["ema_decay"] > 0:
        params["ema"] = jax.tree.map(jnp.copy, teacher)
        sh_params["ema"] = param_sh
    opt_state = {"student": tx.init(params["student"])}
    sh_opt = {"student": opt_state_shardings(opt_state["student"], params["student"], param_sh, mesh)}
    if r["adv_weight"] > 0:
        L, H, D = tcfg.model.num_layers, tcfg.model.num_attention_heads, tcfg.model.attention_head_dim
        params["disc"] = init_disc_head(jax.random.key(cfg.seed + 1), L * H * D)
        opt_state["disc"] = dtx.init(params["disc"])
        sh_params["disc"] = jax.tree.map(lambda _: rep, params["disc"])
        sh_opt["disc"] = jax.tree.map(lambda _: rep, opt_state["disc"])
    state = {"params": params, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.key_data(jax.random.key(cfg.seed))}
    sh = {"params": sh_params, "opt_state": sh_opt, "step": rep, "rng": rep}
    state = jax.device_put(state, sh)
    manager = ckpt.open_manager(out_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    start = 0
    restored = manager.latest_step() if resume else None
    if restored is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        p, o, meta = ckpt.restore(manager, abstract, sh)
        state = {**state, "params": p, "opt_state": o, "step": jax.device_put(np.int32(meta["step"]), rep)}
        start = int(meta["step"])
        _say(f"[consistency] resumed from checkpoint step {start}")
    elif resume:
        _say(f"[consistency] --resume: no checkpoint in {ckpt.checkpoint_dir(out_dir)}, starting from step 0")

    logger = MetricsLogger(out_dir, resume_step=restored)
    schedule = lr_schedule(cfg.optim, loop.steps)
    step_fn = jax.jit(make_step(cfg, model, tcfg, tx, dtx, mesh), donate_argnums=(0,),
                      in_shardings=(sh, param_sh, shd.data_sharding(mesh, 5), shd.data_sharding(mesh, 3)),
                      out_shardings=(sh, rep))
    bar = tqdm(total=loop.steps, initial=start, desc=cfg.method, disable=not loop.progress, file=sys.stderr,
               dynamic_ncols=True, mininterval=1.0)
    steps = StepMetrics(logger, bar, schedule=schedule, postfix=lambda v, r: dict(loss=f"{v['loss']:.5f}"))
    for s in range(start + 1, loop.steps + 1):
        clips, text = source.train_batch(s - 1, B)
        state, m = step_fn(state, teacher, shd.shard_host_batch(clips, mesh), shd.shard_host_batch(text, mesh))
        steps.add(s, m)
        last = s == loop.steps
        if s % loop.log_every == 0 or last:
            steps.flush()
        if (cfg.checkpoint.every and s % cfg.checkpoint.every == 0) or last:
            steps.flush()
            ckpt.save(manager, state, {"step": s})
    bar.close()
    manager.wait_until_finished()
    manager.close()
    wall = time.time() - t0
    final = {"method": cfg.method, "resolved": r, "teacher": cfg.teacher, "teacher_step": int(tstep),
             "steps": loop.steps, "final_loss": steps.losses.get(loop.steps), "wall_time_s": wall}
    (out_dir / "final.json").write_text(json.dumps(final, indent=1))
    logger.close()
    return ConsistencyResult(str(out_dir), start, loop.steps, steps.losses, wall)


def load_student(run_dir, step: Optional[int] = None, mesh=None):
    """``(cfg, tcfg, model, student_params, step)`` of a distillation run (its latest checkpoint by default),
    restored onto ``mesh`` (default: one device) with the model's parameter shardings."""
    run_dir = pathlib.Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{run_dir} is not a consistency distillation run directory (no config.yaml)")
    cfg = from_dict(ConsistencyConfig, yaml.safe_load(cfg_path.read_text()))
    mesh = mesh or shd.make_mesh(MeshConfig(data=1), jax.devices()[:1])
    tcfg, model, teacher, _ = load_vdit_run(cfg.teacher, mesh=mesh)
    rep = replicated(mesh)
    r = cfg.resolved()
    param_sh = shd.tree_shardings(model.param_axes(), teacher, mesh)
    abstract = {"student": jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), teacher,
                                        param_sh)}
    if r["ema_decay"] > 0:
        abstract["ema"] = abstract["student"]
    if r["adv_weight"] > 0:
        L, H, D = tcfg.model.num_layers, tcfg.model.num_attention_heads, tcfg.model.attention_head_dim
        shape = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep)
        abstract["disc"] = jax.tree.map(shape, jax.eval_shape(lambda: init_disc_head(jax.random.key(0), L * H * D)))
    try:
        params, step = ckpt.restore_params(run_dir, abstract, jax.tree.map(lambda a: a.sharding, abstract), step)
    except (ValueError, KeyError, TypeError) as e:
        at = "" if step is None else f" (step {step})"
        raise ValueError(f"{run_dir}: its checkpoint{at} does not match the model of its teacher run "
                         f"{cfg.teacher} (was the teacher retrained with another shape?): {e}") from e
    return cfg, tcfg, model, params["student"], step
