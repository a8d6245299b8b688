"""Consistency-distillation losses as pure functions of denoisers: multistep consistency distillation (MCD; LCM is
its one-segment case with boundary scalings), its data-free MLCM variant (teacher-trajectory states) and SCott
(an η-DDIM teacher with sub-steps, plus an adversarial term computed by the caller).

A denoiser is ``fn(z [B, ...], t int32 [B]) -> model output`` of the schedule's parameterisation; guidance and
conditioning are closed over (``jaxeff.diffusion.sampling``). One distillation step at grid timestep ``t``:

1. ``τ`` = the lower boundary of ``t``'s segment, ``s = max(t - skip, τ)`` (the teacher never crosses a boundary);
2. teacher: ``z_s`` = ``sub_steps`` η-DDIM steps ``t -> s`` from ``z_t`` (η = 0: the probability-flow ODE);
3. target: ``x⁻ = sg f_θ⁻(z_s, s)`` and ``z_ref = DDIM(z_s, x⁻; s -> τ)`` (``= z_s`` when ``s == τ``: the boundary
   condition);
4. prediction: ``z_pred = DDIM(z_t, f_θ(z_t, t); t -> τ)``; loss ``d(z_pred, z_ref)`` (``space="z"``) or the
   equivalent x-space form ``c(t, τ)² d(f_θ, x_ref)`` with ``c = α_τ - α_t σ_τ / σ_t`` (``space="x"``, equal for the
   L2 distance, tested).

``f`` is the model's x̂, or with ``boundary_scalings`` LCM's ``c_skip z + c_out x̂``. ``θ⁻`` is an EMA of the
student or the student itself under stop-gradient (the caller passes ``target_fn``).
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.diffusion.consistency import consistency_output, segment_start
from jaxeff.diffusion.schedule import NoiseSchedule, _bcast, ddim_project, ddim_step

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]
DISTANCES = ("l2", "pseudo_huber")
SPACES = ("z", "x")


def distillation_grid(skip: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """The teacher grid ``[skip - 1, 2 skip - 1, ..., N - 1]`` (LCM's: ``skip = 20`` gives 19, 39, ..., 999)."""
    if not isinstance(skip, (int, np.integer)) or not 1 <= skip <= num_train_timesteps // 2:
        raise ValueError(f"skip: expected an int in [1, {num_train_timesteps // 2}], got {skip!r}")
    return np.arange(1, num_train_timesteps // skip + 1, dtype=np.int64) * skip - 1


def teacher_solve(teacher: Denoiser, sched: NoiseSchedule, z_t: jax.Array, t: jax.Array, s: jax.Array, *,
                  prediction: str, eta: float = 0.0, sub_steps: int = 1, rng=None) -> jax.Array:
    """``sub_steps`` η-DDIM steps of the teacher from ``t`` to ``s`` (per-sample int timesteps ``[B]``; the
    intermediate points are ``round(t + (s - t) i / h)``). η > 0 adds fresh noise from ``rng`` at every sub-step
    (SCott's SDE teacher; η = 0 is the ODE)."""
    if sub_steps < 1:
        raise ValueError(f"sub_steps: expected an int >= 1, got {sub_steps!r}")
    if eta < 0:
        raise ValueError(f"eta: expected a float >= 0, got {eta!r}")
    if eta > 0 and rng is None:
        raise ValueError("teacher_solve: eta > 0 needs an rng for the fresh noise")
    keys = jax.random.split(rng, sub_steps) if rng is not None else [None] * sub_steps
    z = z_t
    t = jnp.asarray(t, jnp.int32)
    s = jnp.asarray(s, jnp.int32)
    for i in range(sub_steps):
        a = jnp.round(t + (s - t) * (i / sub_steps)).astype(jnp.int32)
        b = jnp.round(t + (s - t) * ((i + 1) / sub_steps)).astype(jnp.int32)
        noise = jax.random.normal(keys[i], z.shape, jnp.float32).astype(z.dtype) if eta > 0 else None
        z_next = ddim_step(sched, teacher(z, a), a, b, z, prediction=prediction, eta=eta, noise=noise)
        z = jnp.where(_bcast(a == b, z) > 0, z, z_next)  # a zero-length sub-step leaves z unchanged
    return z


def _distance(a: jax.Array, b: jax.Array, kind: str, huber_c: float) -> jax.Array:
    """Per-sample distance ``[B]``: mean squared error, or pseudo-Huber ``sqrt(|a-b|² + c²) - c`` on the
    per-element mean (LCM's scripts)."""
    d = (a - b).astype(jnp.promote_types(a.dtype, jnp.float32))  # bf16 activations: the loss in float32
    sq = jnp.mean(jnp.square(d), axis=tuple(range(1, a.ndim)))
    if kind == "l2":
        return sq
    return jnp.sqrt(sq + huber_c ** 2) - huber_c


def consistency_distillation_loss(student: Denoiser, target: Denoiser, teacher: Denoiser, sched: NoiseSchedule,
                                  z_t: jax.Array, t: jax.Array, *, boundaries: np.ndarray, skip: int,
                                  prediction: str, boundary_scalings: bool = False, eta: float = 0.0,
                                  sub_steps: int = 1, rng=None, space: str = "z", distance: str = "l2",
                                  huber_c: float = 1e-3, weights: Optional[jax.Array] = None):
    """``(loss, aux)``: the mean over the batch of the per-sample consistency loss at grid timesteps ``t [B]`` (see
    the module docstring). ``aux`` holds the per-sample loss, ``tau``, ``s``, ``f_student`` (the student's
    consistency output, for an adversarial term) and ``z_ref``."""
    if space not in SPACES:
        raise ValueError(f"space: expected one of {SPACES}, got {space!r}")
    if distance not in DISTANCES:
        raise ValueError(f"distance: expected one of {DISTANCES}, got {distance!r}")
    t = jnp.asarray(t, jnp.int32)
    tau = segment_start(boundaries, t)
    s = jnp.maximum(t - skip, tau)
    z_s = jax.lax.stop_gradient(teacher_solve(teacher, sched, z_t, t, s, prediction=prediction, eta=eta,
                                              sub_steps=sub_steps, rng=rng))
    s_model = jnp.maximum(s, 0)  # s == τ == -1 (clean end) is never evaluated: the target is z_s itself
    x_minus = consistency_output(sched, target(z_s, s_model), z_s, s_model, prediction=prediction,
                                 boundary_scalings=boundary_scalings)
    x_minus = jax.lax.stop_gradient(x_minus)
    z_ref = jnp.where(_bcast(s == tau, z_s) > 0, z_s, ddim_project(sched, z_s, x_minus, s, tau))
    f = consistency_output(sched, student(z_t, t), z_t, t, prediction=prediction,
                           boundary_scalings=boundary_scalings)
    if space == "z":
        per = _distance(ddim_project(sched, z_t, f, t, tau), z_ref, distance, huber_c)
    else:
        c = projection_gain(sched, t, tau)
        x_ref = (z_ref - _bcast(_sigma_ratio(sched, tau, t), z_t) * z_t) / _bcast(c, z_t)
        per = _distance(f, x_ref, distance, huber_c) * (c.astype(per_dtype(f)) ** 2)
    if weights is not None:
        per = per * weights
    return jnp.mean(per), {"per_sample": per, "tau": tau, "s": s, "f_student": f, "z_ref": z_ref}


def per_dtype(x: jax.Array):
    return jnp.promote_types(x.dtype, jnp.float32)


def _sigma_ratio(sched: NoiseSchedule, tau, t) -> jax.Array:
    return sched.alpha_sigma(tau)[1] / sched.alpha_sigma(t)[1]


def projection_gain(sched: NoiseSchedule, t, tau) -> jax.Array:
    """``c(t, τ) = α_τ - α_t σ_τ / σ_t``: how much ``DDIM(z_t, x; t -> τ)`` moves per unit of ``x``."""
    a_t, _ = sched.alpha_sigma(t)
    a_tau, _ = sched.alpha_sigma(tau)
    return a_tau - a_t * _sigma_ratio(sched, tau, t)


# ---- data-free teacher-trajectory states (MLCM / TLCM "MDS") ---------------------------------------------------


def segment_timesteps(boundaries: np.ndarray, segment: jax.Array, u: jax.Array, grid: np.ndarray) -> jax.Array:
    """A grid timestep inside segment ``segment`` (0 = the top one, ``(τ_{S-1}, τ_S]``) chosen by ``u ∈ [0, 1)``:
    uniform over the grid points of that segment."""
    b = jnp.asarray(np.asarray(boundaries), jnp.int32)  # descending, S + 1 entries
    g = jnp.asarray(np.sort(np.asarray(grid)), jnp.int32)
    hi, lo = b[segment], b[segment + 1]
    first = jnp.searchsorted(g, lo, side="right")  # first grid point > lo
    last = jnp.searchsorted(g, hi, side="right")   # one past the last grid point <= hi
    n = jnp.maximum(last - first, 1)
    idx = first + jnp.minimum(jnp.floor(u * n).astype(jnp.int32), n - 1)
    return g[jnp.clip(idx, 0, g.shape[0] - 1)]


def trajectory_states(teacher: Denoiser, sched: NoiseSchedule, z_T: jax.Array, t_m: jax.Array,
                      num_steps: jax.Array, max_steps: int, *, prediction: str) -> jax.Array:
    """MLCM's data-free states: from noise ``z_T`` at the last training timestep, ``num_steps [B]`` equal DDIM
    steps of the teacher down to ``t_m [B]`` (fewer steps for states near the noise end: sample ``i`` of segment
    ``s`` of ``M`` takes ``M - s`` steps). Runs ``max_steps`` masked iterations so shapes stay static."""
    T = sched.num_train_timesteps - 1
    t_m = jnp.asarray(t_m, jnp.int32)
    n = jnp.maximum(jnp.asarray(num_steps, jnp.int32), 1)
    delta = (T - t_m).astype(jnp.float32) / n.astype(jnp.float32)

    def body(j, z):
        a = jnp.round(T - j * delta).astype(jnp.int32)
        b = jnp.where(j + 1 >= n, t_m, jnp.round(T - (j + 1) * delta).astype(jnp.int32))
        active = (j < n) & (a > b)
        z_next = ddim_step(sched, teacher(z, a), a, b, z, prediction=prediction)
        return jnp.where(_bcast(active, z) > 0, z_next, z)

    return jax.lax.fori_loop(0, max_steps, body, z_T)


# ---- adversarial term (SCott) ----------------------------------------------------------------------------------


def hinge_discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """``E[relu(1 - D(real))] + E[relu(1 + D(fake))]``."""
    return jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits))


def hinge_generator_loss(fake_logits: jax.Array) -> jax.Array:
    """``-E[D(fake)]``."""
    return -jnp.mean(fake_logits)
