"""Training a video DiT on the embedded moving-shapes clips: the dense teacher of the video methods.

    cfg = load_config(VDiTTrainConfig, "configs/vdit_tiny.yaml", ["train.steps=50"])
    result = train_vdit(cfg, resume=True)

The model denoises pixel-space clips ``[B, 3, T, H, W]`` in ``[-1, 1]`` (no VAE: nothing can be downloaded here, and
the DiT does not care what its channels hold) under a VP schedule (``jaxeff.diffusion``), text-conditioned by the
clip's caption through cross-attention, with caption dropout so classifier-free guidance works at sampling time.

The run directory has the layout of the LM trainer's (``config.yaml``, ``model.yaml``, ``metrics.jsonl``, ``tb/``,
``checkpoints/<step>/`` with params, opt_state, meta) and the same guarantees: batches are a pure function of
(seed, step), so ``--resume`` continues bit-exactly from the latest finalised checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import sys
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from tqdm.auto import tqdm

from jaxeff import sharding as shd
from jaxeff.config import ConfigError, config_error, from_dict, to_dict
from jaxeff.data.video import (
    MovingShapesConfig,
    caption_embedding_table,
    embed_captions,
    moving_shapes,
)
from jaxeff.diffusion.sampling import ddim_sample
from jaxeff.diffusion.schedule import PREDICTIONS, SCHEDULES, SPACINGS, NoiseSchedule
from jaxeff.models.vdit import VDiTConfig, VideoDiT
from jaxeff.sharding import MeshConfig
from jaxeff.training import checkpointing as ckpt
from jaxeff.training.config import CheckpointConfig, LoopConfig, OptimConfig
from jaxeff.training.metrics import TB_DIR, MetricsLogger, StepMetrics
from jaxeff.training.optim import lr_schedule, make_optimizer
from jaxeff.training.trainer import PAUSE_ENV, _pause_for_test  # the LM trainer's test hook
from jaxeff.training.steps import abstract_state, init_state, replicated, state_shardings


# ---- configuration ---------------------------------------------------------------------------------------------


DATASETS = ("moving_shapes", "fashion_mnist")


@dataclasses.dataclass(frozen=True)
class VideoDataConfig:
    """The training data: geometry, seed, held-out set and caption dropout.

    ``dataset``: ``moving_shapes`` (the embedded procedural clips with two-object captions, ``jaxeff.data.video``;
    training clip ``i`` of step ``s`` is index ``s * batch_size + i`` of seed ``seed``, never repeated; the held-out
    clips are indices ``0..eval_clips-1`` of seed ``seed + 1``) or ``fashion_mnist`` (one-frame grey images,
    zero-padded to ``size``, with the class as a one-token caption; training images are visited in a per-epoch
    permutation seeded by ``(seed, epoch)``, the held-out set is the first ``eval_clips`` test images)."""

    dataset: str = "moving_shapes"
    frames: int = 8
    size: int = 32
    num_objects: int = 2
    seed: int = 0
    eval_clips: int = 64
    caption_dropout: float = 0.1

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise config_error("data.dataset", f"one of {DATASETS}", self.dataset)
        if self.eval_clips <= 0:
            raise config_error("data.eval_clips", "a positive int", self.eval_clips)
        if not 0.0 <= self.caption_dropout < 1.0:
            raise config_error("data.caption_dropout", "a float in [0, 1)", self.caption_dropout)
        if self.dataset == "fashion_mnist":
            if self.frames != 1:
                raise config_error("data.frames", "1 for fashion_mnist (images)", self.frames)
            if self.size < 28:
                raise config_error("data.size", "at least 28 for fashion_mnist", self.size)
            return
        try:
            self.shapes()
        except ValueError as e:
            raise ConfigError(f"config section 'data': {e}") from None

    @property
    def channels(self) -> int:
        return 1 if self.dataset == "fashion_mnist" else 3

    def shapes(self) -> MovingShapesConfig:
        return MovingShapesConfig(frames=self.frames, size=self.size, num_objects=self.num_objects)


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """The noise schedule, the model's parameterisation and the evaluation sampler.

    ``sample_steps`` DDIM steps (η = 0, ``sample_spacing``) with guidance ``guidance_scale`` make the teacher's
    default sampler."""

    schedule: str = "cosine"
    prediction: str = "v_prediction"
    num_train_timesteps: int = 1000
    sample_steps: int = 50
    sample_spacing: str = "trailing"
    guidance_scale: float = 3.0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise config_error("diffusion.schedule", f"one of {SCHEDULES}", self.schedule)
        if self.prediction not in PREDICTIONS:
            raise config_error("diffusion.prediction", f"one of {PREDICTIONS}", self.prediction)
        if self.sample_spacing not in SPACINGS:
            raise config_error("diffusion.sample_spacing", f"one of {SPACINGS}", self.sample_spacing)
        if self.num_train_timesteps < 2:
            raise config_error("diffusion.num_train_timesteps", "an int >= 2", self.num_train_timesteps)
        if not 1 <= self.sample_steps <= self.num_train_timesteps:
            raise config_error("diffusion.sample_steps", f"an int in [1, {self.num_train_timesteps}]",
                               self.sample_steps)
        if self.guidance_scale < 0:
            raise config_error("diffusion.guidance_scale", "a float >= 0 (1: no guidance)", self.guidance_scale)

    def noise_schedule(self) -> NoiseSchedule:
        return NoiseSchedule.create(self.schedule, self.num_train_timesteps)


@dataclasses.dataclass(frozen=True)
class VDiTTrainConfig:
    """A video DiT training run. Sections: ``model`` (``VDiTConfig``, diffusers' Wan field names), ``data``,
    ``diffusion``, ``optim``, ``train`` (the loop: steps, batch_size, grad_accum, log/eval cadence), ``checkpoint``,
    ``mesh``."""

    output_dir: str = "runs/vdit"
    seed: int = 0
    model: VDiTConfig = VDiTConfig()
    data: VideoDataConfig = VideoDataConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    optim: OptimConfig = OptimConfig(lr=1e-3, warmup_steps=50, weight_decay=0.01)
    train: LoopConfig = LoopConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        m, d = self.model, self.data
        c = d.channels
        if m.in_channels != c or m.out_channels != c:
            raise config_error("model.in_channels/out_channels", f"{c} and {c} (the {d.dataset} channels)",
                               (m.in_channels, m.out_channels))
        pt, ph, pw = m.patch_size
        if d.frames % pt or d.size % ph or d.size % pw:
            raise config_error("data.frames/size", f"multiples of model.patch_size={tuple(m.patch_size)}",
                               (d.frames, d.size))
        if self.train.trainable != "all":
            raise config_error("train.trainable", "'all' (the teacher trains every parameter)", self.train.trainable)

    def validate(self, num_devices: int) -> tuple[int, ...]:
        shape = self.mesh.shape(num_devices)
        data_par = shape[0] * shape[1] * shape[2]
        for name, bs in (("train.batch_size", self.train.micro_batch_size), ("train.eval_batch_size",
                                                                             self.train.eval_bs)):
            if bs % data_par:
                raise config_error(name, f"a multiple of the data-parallel size {data_par} (per micro-batch)", bs)
        if self.data.eval_clips % self.train.eval_bs:
            raise config_error("data.eval_clips", f"a multiple of the eval batch size {self.train.eval_bs}",
                               self.data.eval_clips)
        return shape


@dataclasses.dataclass
class VDiTTrainResult:
    run_dir: str
    start_step: int
    final_step: int
    losses: dict
    eval_loss: Optional[float]
    eval_x0_mse: Optional[float]
    clips_per_s: float
    wall_time_s: float


# ---- data and conditioning -------------------------------------------------------------------------------------


class ClipSource:
    """Batches of (clips, caption embeddings) as pure functions of their position (see ``VideoDataConfig``)."""

    def __init__(self, cfg: VDiTTrainConfig):
        self.cfg = cfg
        d = cfg.data
        if d.dataset == "fashion_mnist":
            from jaxeff.data import fashion_mnist as fm

            self._fm = fm
            self.images, self.labels = fm.load("train")
            self.table = fm.class_embedding_table(cfg.model.text_dim)
            self.shapes = None
            self.caption_len = 1
        else:
            self.shapes = d.shapes()
            self.table = caption_embedding_table(cfg.model.text_dim)
            self.caption_len = self.shapes.caption_len

    def _fm_indices(self, positions: np.ndarray) -> np.ndarray:
        n = len(self.images)
        out = np.empty(len(positions), np.int64)
        epochs = positions // n
        for e in np.unique(epochs):
            perm = np.random.default_rng([self.cfg.data.seed, int(e)]).permutation(n)
            sel = epochs == e
            out[sel] = perm[positions[sel] % n]
        return out

    def train_batch(self, step: int, batch_size: int):
        pos = np.arange(step * batch_size, (step + 1) * batch_size)
        if self.shapes is None:
            idx = self._fm_indices(pos)
            return (self._fm.to_clips(self.images[idx], self.cfg.data.size),
                    self._fm.embed_labels(self.labels[idx], self.table))
        clips, captions, _ = moving_shapes(self.shapes, pos, seed=self.cfg.data.seed)
        return clips, embed_captions(captions, self.table)

    def eval_set(self):
        """``(clips, captions, caption embeddings)`` of the held-out set (captions: class ids for fashion_mnist)."""
        n = self.cfg.data.eval_clips
        if self.shapes is None:
            images, labels = self._fm.load("test")
            if n > len(images):
                raise config_error("data.eval_clips", f"at most {len(images)} (the test split)", n)
            return (self._fm.to_clips(images[:n], self.cfg.data.size), labels[:n],
                    self._fm.embed_labels(labels[:n], self.table))
        clips, captions, _ = moving_shapes(self.shapes, np.arange(n), seed=self.cfg.data.seed + 1)
        return clips, captions, embed_captions(captions, self.table)

    def null_text(self, batch_size: int) -> np.ndarray:
        return np.zeros((batch_size, self.caption_len, self.cfg.model.text_dim), np.float32)


# ---- loss and steps --------------------------------------------------------------------------------------------


def denoising_loss(model: VideoDiT, params, clips, text, rng, sched: NoiseSchedule, prediction: str,
                   caption_dropout: float, self_attention=None):
    """Mean squared error of the model's ``prediction`` at a uniformly drawn timestep; ``(loss, metrics)``."""
    B = clips.shape[0]
    k_t, k_n, k_d = jax.random.split(rng, 3)
    t = jax.random.randint(k_t, (B,), 0, sched.num_train_timesteps)
    noise = jax.random.normal(k_n, clips.shape, jnp.float32)
    z = sched.add_noise(clips, noise, t)
    if caption_dropout > 0:
        keep = jax.random.bernoulli(k_d, 1.0 - caption_dropout, (B,))
        text = jnp.where(keep[:, None, None], text, 0.0)
    out = model.apply(params, z, t.astype(jnp.float32), text, self_attention=self_attention).sample
    target = sched.target(prediction, clips, noise, t)
    loss = jnp.mean(jnp.square(out.astype(jnp.float32) - target))
    return loss, {"loss": loss}


def make_train_step(model: VideoDiT, tx, cfg: VDiTTrainConfig, mesh, shardings):
    sched = cfg.diffusion.noise_schedule()
    accum = cfg.train.grad_accum

    def loss_fn(params, clips, text, rng):
        return denoising_loss(model, params, clips, text, rng, sched, cfg.diffusion.prediction,
                              cfg.data.caption_dropout)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, clips, text):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        with shd.activate(mesh):
            if accum == 1:
                (loss, _), grads = grad_fn(state["params"], clips, text, rng)
            else:
                mb = clips.shape[0] // accum
                split = lambda x: x.reshape((accum, mb) + x.shape[1:])

                def body(carry, xs):
                    c, tx_, key = xs
                    (l, _), g = grad_fn(state["params"], c, tx_, key)
                    return jax.tree.map(jnp.add, carry, (l, g)), None

                zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state["params"]))
                (loss, grads), _ = jax.lax.scan(body, zeros, (split(clips), split(text),
                                                              jax.random.split(rng, accum)))
                loss, grads = loss / accum, jax.tree.map(lambda g: g / accum, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
        return new, {"loss": loss, "grad_norm": grad_norm}

    dsh = shd.data_sharding(mesh, 5)
    tsh = shd.data_sharding(mesh, 3)
    return jax.jit(step, in_shardings=(shardings, dsh, tsh), out_shardings=(shardings, replicated(mesh)),
                   donate_argnums=(0,))


def eval_noise(cfg: VDiTTrainConfig, shape) -> tuple[np.ndarray, np.ndarray]:
    """The fixed (timesteps, noise) of the held-out evaluation: timesteps evenly spread over the schedule so every
    noise level counts equally, noise from seed ``seed + 2``."""
    n = shape[0]
    t = np.linspace(0, cfg.diffusion.num_train_timesteps - 1, n).round().astype(np.int32)
    noise = np.random.default_rng([cfg.data.seed + 2, 0]).standard_normal(shape).astype(np.float32)
    return t, noise


def make_eval_step(model: VideoDiT, cfg: VDiTTrainConfig, mesh, param_sh, self_attention=None):
    """``(params, clips, text, t, noise) -> (sum of per-sample loss, sum of per-sample x̂ MSE)``."""
    sched = cfg.diffusion.noise_schedule()
    prediction = cfg.diffusion.prediction

    def step(params, clips, text, t, noise):
        with shd.activate(mesh):
            z = sched.add_noise(clips, noise, t)
            out = model.apply(params, z, t.astype(jnp.float32), text, self_attention=self_attention).sample
        target = sched.target(prediction, clips, noise, t)
        loss = jnp.mean(jnp.square(out - target), axis=(1, 2, 3, 4))
        x_hat, _ = sched.to_x_eps(prediction, out, z, t)
        x_mse = jnp.mean(jnp.square(x_hat - clips), axis=(1, 2, 3, 4))
        return jnp.sum(loss), jnp.sum(x_mse)

    return jax.jit(step)


def evaluate(eval_step, params, eval_data, batch_size: int, mesh) -> tuple[float, float]:
    clips, text, t, noise = eval_data
    tot_loss = tot_x = 0.0
    for i in range(0, len(clips), batch_size):
        sl = slice(i, i + batch_size)
        parts = [shd.shard_host_batch(np.ascontiguousarray(a[sl]), mesh) for a in (clips, text, t, noise)]
        l, x = jax.device_get(eval_step(params, *parts))
        tot_loss += float(l)
        tot_x += float(x)
    return tot_loss / len(clips), tot_x / len(clips)


# ---- sampling --------------------------------------------------------------------------------------------------


def make_denoiser(model: VideoDiT, params, text, null_text, guidance_scale: float,
                  self_attention=None) -> Callable:
    """``fn(z, t) -> model output`` with classifier-free guidance (one batched conditional + unconditional call;
    ``guidance_scale == 1`` runs the conditional pass only)."""
    def fn(z, t):
        tf = t.astype(jnp.float32)
        if guidance_scale == 1.0:
            return model.apply(params, z, tf, text, self_attention=self_attention).sample
        out = model.apply(params, jnp.concatenate([z, z]), jnp.concatenate([tf, tf]),
                          jnp.concatenate([text, null_text]), self_attention=self_attention).sample
        cond, uncond = jnp.split(out, 2)
        return uncond + guidance_scale * (cond - uncond)

    return fn


def sample_clips(model: VideoDiT, params, text, cfg: DiffusionConfig, rng, *, steps: Optional[int] = None,
                 guidance_scale: Optional[float] = None, self_attention=None, z_T=None, frames_hw=None):
    """Clips ``[B, 3, T, H, W]`` in ``[-1, 1]`` for caption embeddings ``text [B, L, D]`` by DDIM (η = 0).
    ``z_T`` fixes the starting noise (paired comparisons of two samplers use the same)."""
    steps = cfg.sample_steps if steps is None else steps
    g = cfg.guidance_scale if guidance_scale is None else guidance_scale
    if z_T is None:
        if frames_hw is None:
            raise ValueError("sample_clips: give z_T or frames_hw=(T, H, W)")
        z_T = jax.random.normal(rng, (text.shape[0], model.config.in_channels) + tuple(frames_hw), jnp.float32)
    denoise = make_denoiser(model, params, text, jnp.zeros_like(text), g, self_attention)
    # x̂ is clamped once, at the end, not inside the steps: diffusers' ``clip_sample`` clamps x̂ but keeps the
    # unclamped ε̂, an inconsistency that compounds over many steps (measured on the Fashion-MNIST teacher with
    # guidance 2: an FID-style score of 128 at 50 steps with it, 16 without; 22 vs 24 at 4 steps).
    out = ddim_sample(denoise, z_T, cfg.noise_schedule(), steps, prediction=cfg.prediction,
                      spacing=cfg.sample_spacing, clip_sample=None)
    return jnp.clip(out, -1.0, 1.0)


# ---- the loop --------------------------------------------------------------------------------------------------


def _prepare_run_dir(run_dir: pathlib.Path, resume: bool, overwrite: bool) -> None:
    cdir = ckpt.checkpoint_dir(run_dir)
    if cdir.exists() and any(cdir.iterdir()) and not resume and not overwrite:
        raise ConfigError(
            f"config field 'output_dir': expected a directory without checkpoints for a new run, got {str(run_dir)!r} "
            f"which has some; pass --resume to continue it, --overwrite to start over, or set output_dir=...")
    if overwrite and not resume:
        shutil.rmtree(cdir, ignore_errors=True)
        shutil.rmtree(run_dir / TB_DIR, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)


def train_vdit(cfg: VDiTTrainConfig, *, resume: bool = False, overwrite: bool = False) -> VDiTTrainResult:
    """Runs (or, with ``resume``, continues) the video DiT training run ``cfg``."""
    t_start = time.time()
    run_dir = pathlib.Path(cfg.output_dir).absolute()
    loop = cfg.train
    cfg.validate(jax.device_count())
    mesh = shd.make_mesh(cfg.mesh)
    _prepare_run_dir(run_dir, resume, overwrite)
    model = VideoDiT(cfg.model)
    source = ClipSource(cfg)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    (run_dir / "model.yaml").write_text(yaml.safe_dump(to_dict(cfg.model), sort_keys=False))

    tx = make_optimizer(cfg.optim, loop.steps)
    schedule = lr_schedule(cfg.optim, loop.steps)
    shardings = state_shardings(model, tx, mesh)
    manager = ckpt.open_manager(run_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save) \
        if cfg.checkpoint.enabled or resume else None
    restored = manager.latest_step() if (resume and manager is not None) else None
    if restored is not None:
        params, opt_state, meta = ckpt.restore(manager, abstract_state(model, tx), shardings, restored)
        state = {"params": params, "opt_state": opt_state,
                 "step": jax.device_put(np.int32(meta["step"]), shardings["step"]),
                 "rng": jax.device_put(np.asarray(meta["rng"], np.uint32), shardings["rng"])}
        start = int(meta["step"])
    else:
        if resume:
            print(f"[vdit] --resume: no checkpoint in {ckpt.checkpoint_dir(run_dir)}, starting from step 0",
                  file=sys.stderr)
        state = init_state(model, tx, jax.random.key(cfg.seed), shardings)
        start = 0
    rng_data = [int(x) for x in np.asarray(jax.device_get(state["rng"])).reshape(-1)]
    n_params = int(sum(x.size for x in jax.tree.leaves(state["params"])))
    logger = MetricsLogger(run_dir, resume_step=restored)

    clips_e, _, text_e = source.eval_set()
    t_e, noise_e = eval_noise(cfg, clips_e.shape)
    eval_data = (clips_e, text_e, t_e, noise_e)
    if restored is None:
        logger.log("baseline", 0, {"num_params": n_params, "eval_clips": int(len(clips_e)),
                                   "tokens_per_clip": int(np.prod(model.token_grid(clips_e.shape)))})

    t_compile = time.time()
    train_step = make_train_step(model, tx, cfg, mesh, shardings)
    eval_step = make_eval_step(model, cfg, mesh, shardings["params"])
    B = loop.batch_size
    clips0, text0 = source.train_batch(0, B)
    train_step = train_step.lower(state, jax.ShapeDtypeStruct(clips0.shape, np.float32),
                                  jax.ShapeDtypeStruct(text0.shape, np.float32)).compile()
    compile_s = time.time() - t_compile
    tqdm.write(f"[vdit] {n_params / 1e6:.2f}M params, {int(np.prod(model.token_grid(clips0.shape)))} tokens/clip, "
               f"mesh {dict(mesh.shape)}; compiled in {compile_s:.1f} s", file=sys.stderr)
    if restored is not None:
        tqdm.write(f"[vdit] resumed from checkpoint step {restored}", file=sys.stderr)

    bar = tqdm(total=loop.steps, initial=start, disable=not loop.progress, desc="vdit", dynamic_ncols=True,
               file=sys.stderr, mininterval=1.0)
    steps = StepMetrics(logger, bar, schedule=schedule, units_per_step=B, rate_name="clips_per_s",
                        postfix=lambda v, r: dict(loss=f"{v['loss']:.4f}", clips_s=f"{r:.1f}"))
    eval_loss = eval_x0 = None

    for step in range(start + 1, loop.steps + 1):
        clips, text = source.train_batch(step - 1, B)
        state, metrics = train_step(state, shd.shard_host_batch(clips, mesh), shd.shard_host_batch(text, mesh))
        steps.add(step, metrics)
        last = step == loop.steps
        if step % loop.log_every == 0 or last:
            steps.flush()
        if (loop.eval_every and step % loop.eval_every == 0) or last:
            steps.flush()
            eval_loss, eval_x0 = evaluate(eval_step, state["params"], eval_data, loop.eval_bs, mesh)
            logger.log("eval", step, {"loss": eval_loss, "x0_mse": eval_x0})
            logger.flush()
            tqdm.write(f"[vdit] step {step}: held-out loss {eval_loss:.4f}, x0 mse {eval_x0:.4f}", file=sys.stderr)
            steps.restart_clock()
        if manager is not None and cfg.checkpoint.enabled and (
                (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or last):
            steps.flush()
            ckpt.save(manager, state, {"step": step, "rng": rng_data})
            steps.restart_clock()
        if PAUSE_ENV in os.environ:
            steps.flush()
            _pause_for_test(step, run_dir)

    bar.close()
    if manager is not None:
        manager.wait_until_finished()
        manager.close()
    wall = time.time() - t_start
    rate = steps.rate()
    logger.log("final", loop.steps, {"eval_loss": eval_loss, "eval_x0_mse": eval_x0, "clips_per_s": rate,
                                     "wall_time_s": wall}, tb=False)
    logger.close()
    return VDiTTrainResult(str(run_dir), start, loop.steps, steps.losses, eval_loss, eval_x0, rate, wall)


# ---- loading a finished run ------------------------------------------------------------------------------------


def load_vdit_run(run_dir, step: Optional[int] = None, mesh=None):
    """``(cfg, model, params, step)`` of a video DiT run directory (its latest checkpoint by default)."""
    run_dir = pathlib.Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{run_dir} is not a video DiT run directory (no config.yaml)")
    cfg = from_dict(VDiTTrainConfig, yaml.safe_load(cfg_path.read_text()))
    model = VideoDiT(cfg.model)
    mesh = mesh or shd.make_mesh(MeshConfig(data=1), jax.devices()[:1])
    abstract = jax.eval_shape(model.init, jax.random.key(0))
    sh = shd.tree_shardings(model.param_axes(), abstract, mesh)
    params, step = ckpt.restore_params(run_dir, abstract, sh, step)
    return cfg, model, params, step
