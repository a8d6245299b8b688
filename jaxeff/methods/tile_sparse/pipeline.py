"""Efficient-vDiT stages 2 and 3 on a trained video DiT run, with the report a user needs to judge the trade.

    cfg = load_config(TileSparseConfig, "configs/vdit_sparse_tiny.yaml")
    report = run_tile_sparse(cfg)

Stage 2 searches one ``k`` per layer (``search.py``); stage 3 distils the dense teacher into the sparse student
(``distill.py``). The report gives the chosen ``k`` per layer, the attention sparsity, the student's output error
against the teacher before and after distillation, and sample quality (``jaxeff.diffusion.video_quality``: Fréchet
distance and caption accuracy) of the dense teacher, the sparse model without distillation and the distilled
student, all sampled from the same noise and captions.

The output directory holds ``config.yaml``, ``search.json``, ``metrics.jsonl``, ``checkpoints/`` (the student's
distillation state, resumable) and ``report.json``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
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
from jaxeff.config import ConfigError, config_error, to_dict
from jaxeff.diffusion.schedule import ddim_timesteps
from jaxeff.methods.tile_sparse.attention import TileSparseAttention
from jaxeff.methods.tile_sparse.distill import kd_loss
from jaxeff.methods.tile_sparse.search import SearchResult, search_layer_k
from jaxeff.sharding import MeshConfig
from jaxeff.training import checkpointing as ckpt
from jaxeff.training.metrics import MetricsLogger
from jaxeff.training.steps import replicated
from jaxeff.training.vdit import ClipSource, eval_noise, load_vdit_run, sample_clips


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Stage 2: threshold ``r`` on the relative error, the criterion (``sample``: clips of a ``sample_steps``-step
    guided DDIM run from fixed noise; ``output``: one-step model outputs at ``calib_timesteps``), candidate range,
    calibration set."""

    threshold: float = 0.05
    criterion: str = "sample"
    min_k: int = 1
    max_k: Optional[int] = None
    greedy: bool = True
    calib_clips: int = 8
    calib_timesteps: tuple[int, ...] = (900, 600, 300, 100)
    sample_steps: int = 10

    def __post_init__(self):
        if self.criterion not in ("sample", "output"):
            raise config_error("search.criterion", "'sample' or 'output'", self.criterion)
        if self.sample_steps < 1:
            raise config_error("search.sample_steps", "a positive int", self.sample_steps)
        if self.threshold < 0:
            raise config_error("search.threshold", "a float >= 0", self.threshold)
        if self.calib_clips <= 0:
            raise config_error("search.calib_clips", "a positive int", self.calib_clips)
        if not self.calib_timesteps:
            raise config_error("search.calib_timesteps", "at least one timestep", self.calib_timesteps)


KD_SOURCES = ("data", "teacher_trajectory", "student_trajectory")


@dataclasses.dataclass(frozen=True)
class KDConfig:
    """Stage 3: distillation steps, batch, optimiser, loss weights (α final output, β per-layer attention
    outputs, γ denoising loss on the data) and the timesteps the noised clips are drawn at. ``guided``: distil the
    classifier-free-guided output at the sampler's guidance scale, every batch in both branches (no caption
    dropout; ``jaxeff.methods.tile_sparse.distill``), instead of the branch caption dropout picks.

    ``source``: where the distilled states come from. ``data``: training clips noised to a timestep (uniform, or
    drawn from ``timesteps``). ``teacher_trajectory``: the states the teacher's guided DDIM sampler visits, from
    ``trajectory_clips`` noise draws with training captions at ``trajectory_steps`` steps (null: the evaluation's
    sampler), generated once before distillation. ``student_trajectory``: the same from the sparse student's own
    sampler, regenerated from the current student every ``trajectory_refresh`` steps with fresh noise and captions
    (on-policy: the student learns the teacher's output on the states its own errors lead it to). The teacher's
    output is the target in every case."""

    steps: int = 200
    batch_size: int = 8
    lr: float = 2e-4
    warmup_steps: int = 10
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 0.0
    log_every: int = 10
    checkpoint_every: int = 100
    timesteps: Optional[tuple[int, ...]] = None  # the timesteps distilled at; null: uniform over the schedule
    guided: bool = False
    source: str = "data"
    trajectory_clips: int = 64
    trajectory_steps: Optional[int] = None
    trajectory_refresh: int = 50

    def __post_init__(self):
        if self.source not in KD_SOURCES:
            raise config_error("kd.source", f"one of {KD_SOURCES}", self.source)
        if self.source != "data":
            if self.gamma > 0:
                raise config_error("kd.gamma", f"0 with kd.source={self.source} (sampler states have no data target)",
                                   self.gamma)
            if self.timesteps is not None:
                raise config_error("kd.timesteps", f"null with kd.source={self.source} (the sampler's timesteps are "
                                   "used)", self.timesteps)
            if self.trajectory_refresh <= 0:
                raise config_error("kd.trajectory_refresh", "a positive int", self.trajectory_refresh)
            if self.trajectory_clips <= 0:
                raise config_error("kd.trajectory_clips", "a positive int", self.trajectory_clips)
            if self.trajectory_steps is not None and self.trajectory_steps < 1:
                raise config_error("kd.trajectory_steps", "null or a positive int", self.trajectory_steps)
        if self.timesteps is not None and not self.timesteps:
            raise config_error("kd.timesteps", "null or at least one timestep", self.timesteps)
        for name in ("batch_size", "log_every"):
            if getattr(self, name) <= 0:
                raise config_error(f"kd.{name}", "a positive int", getattr(self, name))
        if self.steps < 0:
            raise config_error("kd.steps", "an int >= 0 (0: no distillation)", self.steps)
        if self.lr <= 0:
            raise config_error("kd.lr", "a positive float", self.lr)
        if min(self.alpha, self.beta, self.gamma) < 0 or self.alpha + self.beta + self.gamma == 0:
            raise config_error("kd.alpha/beta/gamma", "non-negative weights, not all 0",
                               (self.alpha, self.beta, self.gamma))


@dataclasses.dataclass(frozen=True)
class SparseEvalConfig:
    """Quality measurement: ``samples`` clips per model, ``sample_steps`` DDIM steps (null: the teacher's
    default), ``real_clips`` real clips for the Fréchet reference. ``seed``: the seed of the starting noise (null:
    the run's ``seed``; the captions are the same in every run); set it to score runs of different seeds on the same
    samples."""

    samples: int = 64
    sample_steps: Optional[int] = None
    batch_size: int = 16
    real_clips: int = 512
    sample_no_kd: bool = True
    seed: Optional[int] = None

    def seed_for(self, run_seed: int) -> int:
        """The evaluation's seed in a run of seed ``run_seed``."""
        return run_seed if self.seed is None else self.seed

    def __post_init__(self):
        for name in ("samples", "batch_size", "real_clips"):
            if getattr(self, name) <= 0:
                raise config_error(f"eval.{name}", "a positive int", getattr(self, name))
        if self.samples < 2:
            raise config_error("eval.samples", "at least 2 (a Fréchet distance needs a covariance)", self.samples)


@dataclasses.dataclass(frozen=True)
class TileSparseConfig:
    """``teacher``: a ``train.vdit`` run directory. ``block_size``/``impl``: the block-sparse attention."""

    teacher: str = "runs/vdit_tiny"
    output_dir: str = "runs/vdit_sparse_tiny"
    seed: int = 0
    block_size: Optional[int] = None
    impl: str = "auto"
    guidance_scale: Optional[float] = None  # the sampler's guidance (search and evaluation); null: the teacher's
    search: SearchConfig = SearchConfig()
    kd: KDConfig = KDConfig()
    eval: SparseEvalConfig = SparseEvalConfig()


def _say(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)


def calibration_batches(cfg: TileSparseConfig, tcfg, source: ClipSource):
    """``criterion="output"``: noised training-distribution clips (seed ``data.seed + 3``, disjoint from train/eval)
    at each calibration timestep, with their captions. ``"sample"``: one batch of (starting noise, captions)."""
    from jaxeff.data.video import embed_captions, moving_shapes

    sched = tcfg.diffusion.noise_schedule()
    clips, captions, _ = moving_shapes(source.shapes, np.arange(cfg.search.calib_clips), seed=tcfg.data.seed + 3)
    text = jnp.asarray(embed_captions(captions, source.table))
    if cfg.search.criterion == "sample":
        z_T = np.random.default_rng([tcfg.data.seed + 3, 2]).standard_normal(clips.shape).astype(np.float32)
        return [(jnp.asarray(z_T), text)]
    noise = np.random.default_rng([tcfg.data.seed + 3, 1]).standard_normal(clips.shape).astype(np.float32)
    out = []
    for t in cfg.search.calib_timesteps:
        if not 0 <= t < sched.num_train_timesteps:
            raise config_error("search.calib_timesteps", f"ints in [0, {sched.num_train_timesteps})", t)
        tb = jnp.full((len(clips),), t, jnp.int32)
        z = sched.add_noise(jnp.asarray(clips), jnp.asarray(noise), tb)
        out.append((z, tb.astype(jnp.float32), text))
    return out


def make_output_error(model, sparse, tcfg, batch_size: int):
    """``fn(teacher_params, student_params, eval_data) -> float``: the relative squared error of the student (with
    the sparse attention) against the dense teacher on the held-out evaluation set (fixed timesteps and noise). One
    compilation serves every call."""
    sched = tcfg.diffusion.noise_schedule()

    @jax.jit
    def err(pt, ps, clips, text, t, noise):
        z = sched.add_noise(clips, noise, t)
        tf = t.astype(jnp.float32)
        yt = model.apply(pt, z, tf, text).sample
        ys = model.apply(ps, z, tf, text, self_attention=sparse).sample
        return jnp.sum(jnp.square(ys - yt)), jnp.sum(jnp.square(yt))

    def fn(teacher_params, student_params, eval_data) -> float:
        num = den = 0.0
        clips, text, t, noise = eval_data
        for i in range(0, len(clips), batch_size):
            a, b = err(teacher_params, student_params,
                       *(jnp.asarray(x[i:i + batch_size]) for x in (clips, text, t, noise)))
            num += float(a)
            den += float(b)
        return num / max(den, 1e-30)

    return fn


def in_batches(one, batch_size: int):
    """``fn(params, text, z_T) -> clips``: the jitted ``one(params, text_batch, z_batch)`` over host arrays in
    batches of ``batch_size``, concatenated on the host (a progress bar on stderr when there are several batches)."""
    def fn(params, text: np.ndarray, z_T: np.ndarray) -> np.ndarray:
        starts = range(0, len(text), batch_size)
        bar = tqdm(starts, desc="sampling", unit="batch", file=sys.stderr, leave=False, dynamic_ncols=True,
                   disable=len(starts) < 2)
        outs = [np.asarray(one(params, jnp.asarray(text[i:i + batch_size]), jnp.asarray(z_T[i:i + batch_size])))
                for i in bar]
        return np.concatenate(outs)

    return fn


def make_generator(model, tcfg, steps: int, sparse, batch_size: int):
    """``fn(params, text, z_T) -> clips``: DDIM sampling with guidance (the teacher's sampler) in batches, with the
    given self-attention hook. One compilation serves every call."""
    @jax.jit
    def one(p, tx, z):
        return sample_clips(model, p, tx, tcfg.diffusion, None, steps=steps, self_attention=sparse, z_T=z)

    return in_batches(one, batch_size)


def latent_noise(tcfg, num: int, seed_seq) -> np.ndarray:
    """``num`` standard-normal starting latents ``[num, C, T, H, W]`` of the teacher run ``tcfg``'s clip shape,
    drawn from ``np.random.default_rng(seed_seq)``."""
    shape = (num, tcfg.model.in_channels, tcfg.data.frames, tcfg.data.size, tcfg.data.size)
    return np.random.default_rng(seed_seq).standard_normal(shape).astype(np.float32)


def make_trajectory_pool(model, tcfg, source: ClipSource, num_clips: int, steps: int, self_attention,
                         batch_size: int, seed: int):
    """``fn(params, round) -> (z [N, steps, C, T, H, W], t [steps], text [N, L, D])``: every state a guided
    ``steps``-step DDIM sampler with ``params`` and the ``self_attention`` hook visits from ``num_clips`` noise draws
    (seed ``[seed, 6, round]``) with training-distribution captions (clips ``round * N ...`` of the distillation
    data's seed ``data.seed + 4``). One compilation serves every call."""
    from jaxeff.data.video import embed_captions, moving_shapes
    from jaxeff.diffusion.sampling import ddim_trajectory
    from jaxeff.training.vdit import make_denoiser

    sched, d = tcfg.diffusion.noise_schedule(), tcfg.diffusion
    ts = np.asarray(ddim_timesteps(steps, sched.num_train_timesteps, d.sample_spacing), np.int32)

    @jax.jit
    def one(p, tx, z):
        denoise = make_denoiser(model, p, tx, jnp.zeros_like(tx), d.guidance_scale, self_attention)
        zs, _ = ddim_trajectory(denoise, z, sched, steps, prediction=d.prediction, spacing=d.sample_spacing)
        return jnp.swapaxes(zs, 0, 1)

    batched = in_batches(one, batch_size)

    def fn(params, round_: int = 0):
        _, captions, _ = moving_shapes(source.shapes, np.arange(round_ * num_clips, (round_ + 1) * num_clips),
                                       seed=tcfg.data.seed + 4)
        text = embed_captions(captions, source.table)
        return batched(params, text, latent_noise(tcfg, num_clips, [seed, 6, round_])), ts, text

    return fn


def prepare_output_dir(out_dir: pathlib.Path, finished: str, *, resume: bool, overwrite: bool,
                       names=("checkpoints", "tb", "search.json", "report.json", "metrics.jsonl")) -> None:
    """Refuses to reuse a finished run unless resuming or overwriting; ``overwrite`` removes ``names``."""
    if (out_dir / finished).exists() and not (resume or overwrite):
        raise ConfigError(f"config field 'output_dir': {str(out_dir)!r} already holds a finished run ({finished}); "
                          f"pass --overwrite to redo it or set output_dir=...")
    if overwrite and not resume:
        import shutil

        for name in names:
            p = out_dir / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def search_stage(cfg: TileSparseConfig, out_dir: pathlib.Path, model, params, tcfg, source: ClipSource,
                 num_frames: int, tokens_per_frame: int, *, resume: bool, sample_fn=None) -> tuple:
    """Stage 2 on ``params``: the chosen ``k`` per layer, written to (or, resuming, read from) ``search.json``.
    ``sample_fn`` replaces the teacher's guided DDIM sampler of the ``sample`` criterion (see ``search_layer_k``)."""
    search_path = out_dir / "search.json"
    if resume and search_path.exists():
        _say(f"[tile_sparse] search: reusing {search_path}")
        return tuple(json.loads(search_path.read_text())["layer_k"])
    t_s = time.time()
    result: SearchResult = search_layer_k(
        model, params, calibration_batches(cfg, tcfg, source), num_frames=num_frames,
        tokens_per_frame=tokens_per_frame, threshold=cfg.search.threshold, min_k=cfg.search.min_k,
        max_k=cfg.search.max_k, greedy=cfg.search.greedy, criterion=cfg.search.criterion, diffusion=tcfg.diffusion,
        sample_steps=cfg.search.sample_steps, sample_fn=sample_fn)
    search_path.write_text(json.dumps({**result.to_json(), "seconds": time.time() - t_s}, indent=1))
    return result.layer_k


def distill_stage(cfg: TileSparseConfig, out_dir: pathlib.Path, model, teacher, sparse, tcfg, source: ClipSource,
                  mesh, *, resume: bool) -> tuple:
    """Stage 3: distils the dense ``teacher`` params into a student with the ``sparse`` attention (checkpoints and
    ``metrics.jsonl`` in ``out_dir``, resumable). Returns ``(student_params, rel_err_before, rel_err_after,
    logger)``: the relative output error against the teacher on the held-out set before and after, and the run's
    open ``MetricsLogger``."""
    rep = replicated(mesh)
    kd = cfg.kd
    clips_e, _, text_e = source.eval_set()
    t_e, noise_e = eval_noise(tcfg, clips_e.shape)
    eval_data = (clips_e, text_e, t_e, noise_e)
    output_error = make_output_error(model, sparse, tcfg, cfg.eval.batch_size)
    err_before = output_error(teacher, teacher, eval_data)
    _say(f"[tile_sparse] relative output error of the sparse model before distillation: {err_before:.3g}")

    sched = tcfg.diffusion.noise_schedule()
    if kd.timesteps is not None:
        bad = [t for t in kd.timesteps if not 0 <= t < sched.num_train_timesteps]
        if bad:
            raise config_error("kd.timesteps", f"ints in [0, {sched.num_train_timesteps})", bad)
    kd_ts = None if kd.timesteps is None else jnp.asarray(kd.timesteps, jnp.int32)
    guidance = tcfg.diffusion.guidance_scale if kd.guided else None
    if kd.guided:
        _say(f"[tile_sparse] guided distillation at guidance {guidance:g} (conditional and unconditional branches)")
    warmup = min(kd.warmup_steps, max(kd.steps - 1, 0))
    lr = optax.warmup_cosine_decay_schedule(0.0, kd.lr, warmup, max(kd.steps, 1), kd.lr * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=0.0))
    student0 = jax.tree.map(jnp.copy, teacher)  # the training state is donated: never alias the teacher
    state = {"params": student0, "opt_state": tx.init(student0), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.key_data(jax.random.key(cfg.seed))}
    sh = jax.tree.map(lambda _: rep, state)
    state = jax.device_put(state, sh)
    manager = ckpt.open_manager(out_dir, keep=1, async_save=False) if kd.steps else None
    start = 0
    if resume and manager is not None and manager.latest_step() is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        params, opt_state, meta = ckpt.restore(manager, abstract, sh)
        state = {**state, "params": params, "opt_state": opt_state, "step": jax.device_put(np.int32(meta["step"]), rep)}
        start = int(meta["step"])
        _say(f"[tile_sparse] distillation resumed at step {start}")
    logger = MetricsLogger(out_dir, resume_step=start if start else None)

    def step_fn(st, teacher_params, clips, text, pool_t=None):
        """One distillation step on a batch of clips (``kd.source=data``) or, with ``pool_t``, on ``kd.batch_size``
        states drawn from the trajectory pool ``clips [N, steps, ...]`` (captions ``text [N, L, D]``)."""
        key = jax.random.fold_in(jax.random.wrap_key_data(st["rng"]), st["step"])
        k_t, k_n, k_d = jax.random.split(key, 3)
        target = None
        if pool_t is not None:
            B = kd.batch_size
            i = jax.random.randint(k_n, (B,), 0, clips.shape[0])
            j = jax.random.randint(k_t, (B,), 0, clips.shape[1])
            z, t, text = clips[i, j], pool_t[j], text[i]
        else:
            B = clips.shape[0]
            if kd_ts is None:
                t = jax.random.randint(k_t, (B,), 0, sched.num_train_timesteps)
            else:
                t = kd_ts[jax.random.randint(k_t, (B,), 0, kd_ts.shape[0])]
            noise = jax.random.normal(k_n, clips.shape)
            z = sched.add_noise(clips, noise, t)
            target = sched.target(tcfg.diffusion.prediction, clips, noise, t)
        if not kd.guided:  # guided: both branches of every clip
            keep = jax.random.bernoulli(k_d, 1.0 - tcfg.data.caption_dropout, (B,))
            text = jnp.where(keep[:, None, None], text, 0.0)
        (loss, m), g = jax.value_and_grad(
            lambda p: kd_loss(model, p, teacher_params, z, t.astype(jnp.float32), text, sparse, alpha=kd.alpha,
                              beta=kd.beta, gamma=kd.gamma, target=target, guidance_scale=guidance),
            has_aux=True)(st["params"])
        upd, opt = tx.update(g, st["opt_state"], st["params"])
        return {**st, "params": optax.apply_updates(st["params"], upd), "opt_state": opt,
                "step": st["step"] + 1}, m

    if kd.steps > start:
        train = jax.jit(step_fn, donate_argnums=(0,), out_shardings=(sh, rep))
        if kd.source != "data":
            steps = kd.trajectory_steps or cfg.eval.sample_steps or tcfg.diffusion.sample_steps
            on_student = kd.source == "student_trajectory"
            pool_fn = make_trajectory_pool(model, tcfg, source, kd.trajectory_clips, steps,
                                           sparse if on_student else None, cfg.eval.batch_size, cfg.seed)

            def refresh(params, round_):
                t_p = time.time()
                z_pool, t_pool, text_pool = pool_fn(params, round_)
                _say(f"[tile_sparse] distillation states: the {'student' if on_student else 'teacher'}'s sampling "
                     f"trajectories, {kd.trajectory_clips} clips x {steps} states ({time.time() - t_p:.1f} s)")
                return jnp.asarray(z_pool), jnp.asarray(text_pool), jnp.asarray(t_pool)

            every = kd.trajectory_refresh if on_student else None
            pool = refresh(state["params"] if on_student else teacher, start // every if every else 0)
        bar = tqdm(total=kd.steps, initial=start, desc="distill", file=sys.stderr, dynamic_ncols=True,
                   mininterval=1.0)
        t_kd = time.time()
        if kd.source == "data":
            # Distillation clips: the training distribution from seed data.seed + 4 (never the evaluation clips).
            kd_source = ClipSource(dataclasses.replace(tcfg, data=dataclasses.replace(tcfg.data,
                                                                                     seed=tcfg.data.seed + 4)))
        for s in range(start + 1, kd.steps + 1):
            if kd.source != "data":
                if every and s > start + 1 and (s - 1) % every == 0:
                    pool = refresh(state["params"], (s - 1) // every)
                state, m = train(state, teacher, *pool)
            else:
                clips, text = kd_source.train_batch(s - 1, kd.batch_size)
                state, m = train(state, teacher, jnp.asarray(clips), jnp.asarray(text))
            if s % kd.log_every == 0 or s == kd.steps:
                m = {k: float(v) for k, v in jax.device_get(m).items()}
                logger.log("train", s, m)
                logger.flush()
                bar.set_postfix(loss=f"{m['loss']:.5f}", refresh=False)
            bar.update(1)
            if manager is not None and ((kd.checkpoint_every and s % kd.checkpoint_every == 0) or s == kd.steps):
                ckpt.save(manager, state, {"step": s})
        bar.close()
        if manager is not None:
            manager.wait_until_finished()
        _say(f"[tile_sparse] distillation: {kd.steps - start} steps in {time.time() - t_kd:.1f} s")
    if manager is not None:
        manager.close()
    student = state["params"]
    err_after = output_error(teacher, student, eval_data)
    _say(f"[tile_sparse] relative output error after distillation: {err_after:.3g} (before {err_before:.3g})")
    return student, err_before, err_after, logger


def quality_inputs(ev: SparseEvalConfig, tcfg, source: ClipSource, eval_seed: int):
    """The evaluation's fixed ``(captions, caption embeddings, starting noise)`` and its ``VideoQuality``: the
    captions of the first ``ev.samples`` clips of the data's seed ``data.seed + 5`` (the same in every run), the
    noise from ``eval_seed`` (``ev.seed_for(run seed)``)."""
    from jaxeff.data.video import embed_captions, moving_shapes
    from jaxeff.diffusion.video_quality import VideoQuality

    quality = VideoQuality(source.shapes, num_real=ev.real_clips)
    _, captions, _ = moving_shapes(source.shapes, np.arange(ev.samples), seed=tcfg.data.seed + 5)
    text = embed_captions(captions, source.table)
    return captions, text, latent_noise(tcfg, ev.samples, [eval_seed, 5]), quality


def load_moving_shapes_teacher(cfg: TileSparseConfig):
    """``(tcfg, model, teacher, step, source, T, S)`` of the ``teacher`` run (a video DiT on moving shapes), with
    the config's guidance override applied."""
    tcfg, model, teacher, tstep = load_vdit_run(cfg.teacher)
    if tcfg.data.dataset != "moving_shapes":
        raise ConfigError(f"config field 'teacher': expected a video DiT trained on moving_shapes clips (the quality "
                          f"measure is defined on them), got a run on {tcfg.data.dataset!r}")
    if cfg.guidance_scale is not None:
        tcfg = dataclasses.replace(tcfg, diffusion=dataclasses.replace(tcfg.diffusion,
                                                                      guidance_scale=cfg.guidance_scale))
    source = ClipSource(tcfg)
    grid = model.token_grid((1, tcfg.model.in_channels, tcfg.data.frames, tcfg.data.size, tcfg.data.size))
    return tcfg, model, teacher, tstep, source, int(grid[0]), int(grid[1] * grid[2])


def run_tile_sparse(cfg: TileSparseConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    t0 = time.time()
    out_dir = pathlib.Path(cfg.output_dir).absolute()
    prepare_output_dir(out_dir, "report.json", resume=resume, overwrite=overwrite)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    tcfg, model, teacher, tstep, source, T, S = load_moving_shapes_teacher(cfg)
    _say(f"[tile_sparse] teacher {cfg.teacher} (step {tstep}): {tcfg.model.num_layers} layers, {T} latent frames x "
         f"{S} tokens")
    layer_k = search_stage(cfg, out_dir, model, teacher, tcfg, source, T, S, resume=resume)
    sparse = TileSparseAttention(layer_k, T, S, block_size=cfg.block_size, impl=cfg.impl)
    _say(f"[tile_sparse] k per layer {list(layer_k)} (None = dense): attention sparsity {sparse.sparsity:.1%}")

    mesh = shd.make_mesh(MeshConfig(data=1), jax.devices()[:1])
    teacher = jax.device_put(teacher, replicated(mesh))  # one placement for every array: each function compiles once
    student, err_before, err_after, logger = distill_stage(cfg, out_dir, model, teacher, sparse, tcfg, source, mesh,
                                                           resume=resume)

    # ---- sample quality
    ev, kd = cfg.eval, cfg.kd
    steps = ev.sample_steps or tcfg.diffusion.sample_steps
    eval_seed = ev.seed_for(cfg.seed)
    captions, text, z_T, quality = quality_inputs(ev, tcfg, source, eval_seed)
    scores = {}
    arms = [("teacher", teacher, None), ("student", student, sparse)]
    if ev.sample_no_kd and kd.steps:
        arms.insert(1, ("sparse_no_kd", teacher, sparse))
    generators = {}
    for name, p, hook in arms:
        if hook not in generators:
            generators[hook] = make_generator(model, tcfg, steps, hook, ev.batch_size)
        t_g = time.time()
        clips = generators[hook](p, text, z_T)
        scores[name] = {**quality.score(clips, captions), "sample_s": time.time() - t_g}
        _say(f"[tile_sparse] {name}: FD {scores[name]['fd']:.2f}, caption accuracy {scores[name]['caption_acc']:.3f}"
             f" ({steps} DDIM steps, {scores[name]['sample_s']:.1f} s)")
    fd_t = scores["teacher"]["fd"]
    report = {
        "teacher": cfg.teacher, "teacher_step": int(tstep), "layer_k": list(layer_k),
        "attention_sparsity": sparse.sparsity, "block_sparsity": sparse.block_sparsity,
        "block_size": sparse.block_size, "threshold": cfg.search.threshold,
        "output_rel_err_before_kd": err_before, "output_rel_err_after_kd": err_after, "kd_guided": kd.guided,
        "kd_source": kd.source,
        "sample_steps": steps, "guidance_scale": tcfg.diffusion.guidance_scale, "samples": ev.samples,
        "eval_seed": eval_seed, "scores": scores,
        "fd_change_vs_teacher": (scores["student"]["fd"] - fd_t) / fd_t if fd_t > 0 else float("nan"),
        "extractor": quality.report, "wall_time_s": time.time() - t0,
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    logger.log("final", kd.steps, {k: v for k, v in report.items() if isinstance(v, float)}, tb=False)
    logger.close()
    return report
