"""Consistency-model building blocks: the LCM scheduler (diffusers ``LCMScheduler`` semantics), multistep
consistency sampling (Heek et al. 2024) and the TLCM milestone subsets.

Timesteps are the integer training timesteps of a ``NoiseSchedule`` (``0 .. N-1``); ``-1`` is the clean end, whose
``ᾱ`` is the schedule's ``final_alpha_cumprod`` (1.0 when ``set_alpha_to_one``).

* **LCM** (``lcm_timesteps``, ``lcm_boundary_scalings``, ``lcm_step``, ``lcm_sample``): the student's output is
  ``f(z_t, t) = c_skip(t) z_t + c_out(t) x̂(z_t, t)`` with ``c_skip = σd² / ((10t)² + σd²)``, ``c_out = 10t /
  sqrt((10t)² + σd²)``, ``σd = 0.5``; multistep sampling re-noises ``f`` to the next timestep with **fresh** noise.
* **Multistep consistency** (``mcm_boundaries``, ``mcm_sample``): ``S`` segments whose lower boundaries are the
  sampling points; each step predicts ``x̂`` at a boundary and moves to the next boundary by the deterministic DDIM
  projection, no fresh noise. With ``f`` = the teacher's ``x̂`` and the boundaries of an ``S``-step DDIM grid it is
  exactly ``S``-step DDIM (tested).
* **TLCM** (``TLCM_MILESTONES``, ``tlcm_subset``, ``tlcm_sample``): the official sampler's 9 milestones
  ``int(linspace(999, 0, 9))`` and the index subset an ``n``-step run visits; each step re-noises ``x̂`` with fresh
  noise like LCM, but without boundary scalings.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.diffusion.schedule import NoiseSchedule, _bcast, check_prediction, ddim_project, ddim_timesteps

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


# ---- LCM -------------------------------------------------------------------------------------------------------


def lcm_timesteps(num_steps: int, original_steps: int = 50, num_train_timesteps: int = 1000,
                  strength: float = 1.0) -> np.ndarray:
    """diffusers' ``LCMScheduler.set_timesteps(num_steps, original_inference_steps=original_steps)``: the
    distillation grid ``[1 .. original_steps * strength] * (N // original_steps) - 1`` reversed, then ``num_steps``
    of its entries at indices ``floor(linspace(0, len, num_steps, endpoint=False))``. int64, descending."""
    if not isinstance(original_steps, (int, np.integer)) or not 1 <= original_steps <= num_train_timesteps:
        raise ValueError(f"original_steps: expected an int in [1, {num_train_timesteps}], got {original_steps!r}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength: expected a float in (0, 1], got {strength!r}")
    k = num_train_timesteps // original_steps
    origin = np.arange(1, int(original_steps * strength) + 1, dtype=np.int64) * k - 1
    if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= len(origin):
        raise ValueError(f"num_steps: expected an int in [1, {len(origin)}] (the distillation grid has "
                         f"{len(origin)} timesteps), got {num_steps!r}")
    origin = origin[::-1]
    idx = np.floor(np.linspace(0, len(origin), num=num_steps, endpoint=False)).astype(np.int64)
    return np.ascontiguousarray(origin[idx])


def lcm_boundary_scalings(t, sigma_data: float = SIGMA_DATA,
                          timestep_scaling: float = TIMESTEP_SCALING) -> tuple[jax.Array, jax.Array]:
    """``(c_skip, c_out)`` at integer timesteps ``t`` (any shape): ``(1, 0)`` at ``t = 0``, ``c_out -> 1`` fast."""
    st = jnp.asarray(t, jnp.float64 if jax.config.jax_enable_x64 else jnp.float32) * timestep_scaling
    c_skip = sigma_data ** 2 / (st ** 2 + sigma_data ** 2)
    c_out = st / jnp.sqrt(st ** 2 + sigma_data ** 2)
    return c_skip, c_out


def consistency_output(sched: NoiseSchedule, model_out: jax.Array, z: jax.Array, t, *, prediction: str,
                       boundary_scalings: bool = True, clip_sample: Optional[float] = None) -> jax.Array:
    """The consistency function ``f(z_t, t) = c_skip z_t + c_out x̂`` (``boundary_scalings=False``: ``x̂``)."""
    x_hat, _ = sched.to_x_eps(prediction, model_out, z, t)
    if clip_sample is not None:
        x_hat = jnp.clip(x_hat, -clip_sample, clip_sample)
    if not boundary_scalings:
        return x_hat
    c_skip, c_out = (_bcast(c, z) for c in lcm_boundary_scalings(t))
    return (c_out * x_hat + c_skip * z).astype(z.dtype)


def lcm_step(sched: NoiseSchedule, model_out: jax.Array, t, t_prev, z: jax.Array, *, prediction: str = "epsilon",
             noise: Optional[jax.Array] = None, last: bool = False,
             clip_sample: Optional[float] = None) -> tuple[jax.Array, jax.Array]:
    """One ``LCMScheduler.step``: ``(prev_sample, denoised)``. ``denoised = c_out x̂ + c_skip z``; unless ``last``,
    ``prev_sample = sqrt(ᾱ_prev) denoised + sqrt(1 - ᾱ_prev) noise`` (``noise``: the fresh Gaussian draw)."""
    denoised = consistency_output(sched, model_out, z, t, prediction=prediction, clip_sample=clip_sample)
    if last:
        return denoised, denoised
    if noise is None:
        raise ValueError("lcm_step: a step that is not the last needs the fresh noise `noise` (same shape as z)")
    return sched.add_noise(denoised, noise, jnp.broadcast_to(jnp.asarray(t_prev), z.shape[:1])), denoised


def _renoise_sample(denoise: Denoiser, z_T: jax.Array, sched: NoiseSchedule, timesteps: np.ndarray, rng,
                    prediction: str, boundary_scalings: bool, clip_sample: Optional[float]) -> jax.Array:
    """Shared loop of LCM and TLCM sampling: predict ``f`` at each timestep, re-noise it to the next one with fresh
    noise, return the last ``f``."""
    check_prediction(prediction)
    n = len(timesteps)
    if rng is None:
        if n > 1:
            raise ValueError("multistep sampling re-noises between steps: pass an rng")
        rng = jax.random.key(0)  # one step: the re-noised state is never used
    B = z_T.shape[0]
    nxt = np.concatenate([timesteps[1:], timesteps[-1:]])
    keys = jax.random.split(rng, n)

    def body(z, xs):
        t, s, key = xs
        tb = jnp.full((B,), t, jnp.int32)
        f = consistency_output(sched, denoise(z, tb), z, tb, prediction=prediction,
                               boundary_scalings=boundary_scalings, clip_sample=clip_sample)
        noise = jax.random.normal(key, z.shape, jnp.float32)
        z_next = sched.add_noise(f, noise.astype(z.dtype), jnp.full((B,), s, jnp.int32))
        return z_next, f

    _, fs = jax.lax.scan(body, z_T, (jnp.asarray(timesteps, jnp.int32), jnp.asarray(nxt, jnp.int32), keys))
    return fs[-1]


def lcm_sample(denoise: Denoiser, z_T: jax.Array, sched: NoiseSchedule, num_steps: int, *, rng=None,
               prediction: str = "epsilon", original_steps: int = 50, timesteps: Optional[np.ndarray] = None,
               clip_sample: Optional[float] = None) -> jax.Array:
    """LCM multistep sampling (``LCMScheduler`` timesteps and steps): ``num_steps`` evaluations, fresh noise between
    them from ``rng`` (not needed for one step). ``timesteps`` overrides the schedule."""
    ts = lcm_timesteps(num_steps, original_steps, sched.num_train_timesteps) if timesteps is None else \
        _check_timesteps(timesteps, sched)
    return _renoise_sample(denoise, z_T, sched, ts, rng, prediction, True, clip_sample)


# ---- multistep consistency models ------------------------------------------------------------------------------


def mcm_boundaries(num_segments: int, num_train_timesteps: int = 1000, spacing: str = "trailing") -> np.ndarray:
    """The ``S + 1`` segment boundaries, descending, ending at the clean end ``-1``: the timesteps of an ``S``-step
    DDIM grid (``spacing`` as in ``ddim_timesteps``) followed by ``-1``, where its last step lands."""
    ts = ddim_timesteps(num_segments, num_train_timesteps, spacing, steps_offset=1 if spacing == "leading" else 0)
    return np.concatenate([ts, [-1]]).astype(np.int64)  # DDIM's last step lands below 0: the clean end


def segment_start(boundaries: np.ndarray, t) -> jax.Array:
    """The lower boundary ``τ`` of the segment holding timestep ``t``: the largest boundary ``< t`` (segments are
    ``(τ_j, τ_{j+1}]``)."""
    b = jnp.asarray(np.sort(np.asarray(boundaries)), jnp.int32)  # ascending
    t = jnp.asarray(t, jnp.int32)
    idx = jnp.searchsorted(b, t, side="left") - 1
    return b[jnp.clip(idx, 0, b.shape[0] - 1)]


def mcm_sample(denoise: Denoiser, z_T: jax.Array, sched: NoiseSchedule, boundaries: np.ndarray, *,
               prediction: str = "epsilon", clip_sample: Optional[float] = None) -> jax.Array:
    """Multistep consistency sampling over ``boundaries`` (descending, ``S + 1`` entries, from ``mcm_boundaries``):
    for each boundary ``τ_j`` but the last, ``x̂ = f(z, τ_j)`` and ``z <- DDIM(z, x̂; τ_j -> τ_{j-1})``; returns the
    last ``x̂``. Deterministic: no fresh noise."""
    check_prediction(prediction)
    bnd = _check_timesteps(boundaries, sched, allow_clean_end=True)
    if len(bnd) < 2:
        raise ValueError(f"boundaries: expected at least 2 entries (S + 1 for S segments), got {len(bnd)}")
    B = z_T.shape[0]

    def body(z, xs):
        t, s = xs
        tb, sb = jnp.full((B,), t, jnp.int32), jnp.full((B,), s, jnp.int32)
        x_hat = consistency_output(sched, denoise(z, tb), z, tb, prediction=prediction, boundary_scalings=False,
                                   clip_sample=clip_sample)
        return ddim_project(sched, z, x_hat, tb, sb), x_hat

    _, xs = jax.lax.scan(body, z_T, (jnp.asarray(bnd[:-1], jnp.int32), jnp.asarray(bnd[1:], jnp.int32)))
    return xs[-1]


# ---- TLCM ------------------------------------------------------------------------------------------------------

TLCM_MILESTONES = np.linspace(999, 0, 9).astype(np.int64)  # [999, 874, 749, 624, 499, 374, 249, 124, 0]
# Index subsets of the milestones an n-step run visits (the official sampler's table, n = 1..8). The last index
# (milestone 0) is the end point; the model is evaluated at the others.
_TLCM_SUBSETS = {
    1: (0, 8), 2: (0, 4, 8), 3: (0, 4, 7, 8), 4: (0, 2, 4, 7, 8), 5: (0, 2, 4, 6, 7, 8),
    6: (0, 2, 4, 5, 6, 7, 8), 7: (0, 2, 3, 4, 5, 6, 7, 8), 8: tuple(range(9)),
}


def tlcm_subset(num_steps: int) -> tuple[int, ...]:
    """Milestone indices of an ``num_steps``-step TLCM run (``num_steps + 1`` entries)."""
    if num_steps not in _TLCM_SUBSETS:
        raise ValueError(f"num_steps: TLCM samples with 1..8 steps (8 segments), got {num_steps!r}")
    return _TLCM_SUBSETS[num_steps]


def tlcm_timesteps(num_steps: int) -> np.ndarray:
    """The timesteps a ``num_steps``-step TLCM run evaluates the model at (the subset without its end point)."""
    return TLCM_MILESTONES[list(tlcm_subset(num_steps)[:-1])]


def tlcm_sample(denoise: Denoiser, z_T: jax.Array, sched: NoiseSchedule, num_steps: int, *, rng=None,
                prediction: str = "epsilon", clip_sample: Optional[float] = None) -> jax.Array:
    """The official TLCM sampler: ``x̂`` at each visited milestone (no boundary scalings), re-noised with fresh
    noise to the next; returns the last ``x̂``."""
    if sched.num_train_timesteps != 1000:
        raise ValueError(f"TLCM milestones are defined on a 1000-step schedule, got {sched.num_train_timesteps}")
    return _renoise_sample(denoise, z_T, sched, tlcm_timesteps(num_steps), rng, prediction, False, clip_sample)


def _check_timesteps(ts, sched: NoiseSchedule, allow_clean_end: bool = False) -> np.ndarray:
    ts = np.asarray(ts, np.int64).reshape(-1)
    lo = -1 if allow_clean_end else 0
    if len(ts) == 0 or ts.min() < lo or ts.max() >= sched.num_train_timesteps or np.any(np.diff(ts) >= 0):
        raise ValueError(f"timesteps: expected strictly descending ints in [{lo}, {sched.num_train_timesteps - 1}], "
                         f"got {ts.tolist()}")
    return ts
