"""Samplers over a denoiser: DDIM (η = 0 deterministic, η > 0 stochastic) as one ``lax.scan``.

A denoiser is ``fn(z [B, ...], t int32 [B]) -> model output`` of the schedule's parameterisation; guidance, text
conditioning and sparse attention are closed over by the caller, so every sampler works with every model.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.diffusion.schedule import NoiseSchedule, check_prediction, ddim_prev_timesteps, ddim_step, ddim_timesteps

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]


def ddim_sample(denoise: Denoiser, z_T: jax.Array, sched: NoiseSchedule, num_steps: int, *,
                prediction: str = "epsilon", eta: float = 0.0, rng: Optional[jax.Array] = None,
                spacing: str = "trailing", steps_offset: int = 1, clip_sample: Optional[float] = None,
                return_x0: bool = True) -> jax.Array:
    """Runs ``num_steps`` DDIM steps from ``z_T`` (standard normal noise) and returns the final sample.

    ``spacing="trailing"`` starts at the last training timestep (the choice for schedules whose final ᾱ is near 0,
    such as ``cosine``); ``"leading"`` is Stable Diffusion's. With ``return_x0`` the last step outputs the model's
    x̂ at the last timestep (identical to the DDIM update when ``final_alpha_cumprod == 1``)."""
    z_final, x_hats, _ = _ddim_scan(denoise, z_T, sched, num_steps, prediction=prediction, eta=eta, rng=rng,
                                    spacing=spacing, steps_offset=steps_offset, clip_sample=clip_sample,
                                    keep_states=False)
    if return_x0:
        x0 = x_hats[-1]
        return jnp.clip(x0, -clip_sample, clip_sample) if clip_sample is not None else x0
    return z_final


def ddim_trajectory(denoise: Denoiser, z_T: jax.Array, sched: NoiseSchedule, num_steps: int, *,
                    prediction: str = "epsilon", spacing: str = "trailing",
                    steps_offset: int = 1) -> tuple[jax.Array, np.ndarray]:
    """The states a ``num_steps``-step DDIM (η = 0) sampler visits: ``(z, t)`` with ``z [num_steps, B, ...]`` the
    input of each step (``z[0] == z_T``) and ``t [num_steps]`` its timestep, the same run as ``ddim_sample``."""
    _, _, states = _ddim_scan(denoise, z_T, sched, num_steps, prediction=prediction, eta=0.0, rng=None,
                              spacing=spacing, steps_offset=steps_offset, clip_sample=None, keep_states=True)
    return states, ddim_timesteps(num_steps, sched.num_train_timesteps, spacing, steps_offset)


def _ddim_scan(denoise, z_T, sched, num_steps, *, prediction, eta, rng, spacing, steps_offset, clip_sample,
               keep_states):
    """``(z_final, x̂ per step, the input state of each step or None)`` of a DDIM run."""
    check_prediction(prediction)
    if eta > 0 and rng is None:
        raise ValueError("ddim_sample: eta > 0 needs an rng for the variance noise")
    ts = ddim_timesteps(num_steps, sched.num_train_timesteps, spacing, steps_offset)
    prev = ddim_prev_timesteps(ts, sched.num_train_timesteps)
    B = z_T.shape[0]
    keys = jax.random.split(rng, num_steps) if rng is not None else jnp.zeros((num_steps,), jnp.uint32)

    def body(z, xs):
        t, s, key = xs
        tb = jnp.full((B,), t, jnp.int32)
        out = denoise(z, tb)
        noise = jax.random.normal(key, z.shape, z.dtype) if eta > 0 else None
        z_next = ddim_step(sched, out, tb, jnp.full((B,), s, jnp.int32), z, prediction=prediction, eta=eta,
                           noise=noise, clip_sample=clip_sample)
        x_hat, _ = sched.to_x_eps(prediction, out, z, tb)
        return z_next, (x_hat, z if keep_states else None)

    xs = (jnp.asarray(ts, jnp.int32), jnp.asarray(prev, jnp.int32), keys)
    z_final, (x_hats, states) = jax.lax.scan(body, z_T, xs)
    return z_final, x_hats, states


def sampling_steps_summary(num_steps: int, num_train_timesteps: int = 1000, spacing: str = "trailing") -> str:
    ts = ddim_timesteps(num_steps, num_train_timesteps, spacing)
    return " -> ".join(str(int(t)) for t in np.concatenate([ts, ddim_prev_timesteps(ts, num_train_timesteps)[-1:]]))
