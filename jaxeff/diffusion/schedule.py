"""VP noise schedules, parameterisations and the DDIM step, with diffusers' ``DDIMScheduler`` semantics.

A schedule is the table ``alphas_cumprod`` (``ᾱ``, float64, one entry per integer training timestep); the forward
process is ``z_t = α_t x + σ_t ε`` with ``α_t = sqrt(ᾱ_t)``, ``σ_t = sqrt(1 - ᾱ_t)``. A model predicts ``ε``
(``"epsilon"``), ``x`` (``"sample"``) or ``v = α_t ε - σ_t x`` (``"v_prediction"``): the names diffusers uses.

    sched = NoiseSchedule.create("cosine")
    z_t = sched.add_noise(x, eps, t)                    # t int32 [B]
    ts = ddim_timesteps(4, spacing="leading")           # [751, 501, 251, 1] (steps_offset=1)
    z_s = ddim_step(sched, model_out, t, s, z_t, prediction="v_prediction", eta=0.0)

Everything here is jit- and vmap-compatible; timesteps are traced int32 arrays (per sample ``[B]`` or scalars).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np

Prediction = Literal["epsilon", "sample", "v_prediction"]
PREDICTIONS = ("epsilon", "sample", "v_prediction")
SCHEDULES = ("scaled_linear", "linear", "cosine")
SPACINGS = ("leading", "trailing", "linspace")


def scaled_linear_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                                 beta_end: float = 0.012) -> np.ndarray:
    """The Stable Diffusion schedule: ``betas = linspace(sqrt(β0), sqrt(β1), N)^2``; ``ᾱ = cumprod(1 - β)``."""
    betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def linear_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.0001,
                          beta_end: float = 0.02) -> np.ndarray:
    """The DDPM schedule: ``betas = linspace(β0, β1, N)``."""
    return np.cumprod(1.0 - np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64))


def cosine_alphas_cumprod(num_train_timesteps: int = 1000, max_beta: float = 0.999) -> np.ndarray:
    """The cosine schedule (diffusers ``squaredcos_cap_v2``): betas discretise ``ᾱ(t) = cos²((t + 0.008)/1.008 ·
    π/2)`` and are capped at ``max_beta``, so the last timestep is almost pure noise."""
    def abar(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = np.array([min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)], np.float64)
    return np.cumprod(1.0 - betas)


@dataclasses.dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """``alphas_cumprod`` float64 ``[N]``; ``final_alpha_cumprod`` is ``ᾱ`` "before" timestep 0 (1.0 when
    ``set_alpha_to_one``, else ``ᾱ[0]``: diffusers' DDIM convention, SD configs use False)."""

    alphas_cumprod: np.ndarray
    final_alpha_cumprod: float
    name: str = "custom"

    @classmethod
    def create(cls, name: str = "scaled_linear", num_train_timesteps: int = 1000,
               set_alpha_to_one: bool = False) -> "NoiseSchedule":
        if name == "scaled_linear":
            ac = scaled_linear_alphas_cumprod(num_train_timesteps)
        elif name == "linear":
            ac = linear_alphas_cumprod(num_train_timesteps)
        elif name == "cosine":
            ac = cosine_alphas_cumprod(num_train_timesteps)
        else:
            raise ValueError(f"schedule: expected one of {SCHEDULES}, got {name!r}")
        return cls(ac, 1.0 if set_alpha_to_one else float(ac[0]), name)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def _table(self) -> jax.Array:
        # Entry 0 is the "final" ᾱ used for timestep -1 (the step past the last one); t indexes entry t + 1.
        dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
        return jnp.asarray(np.concatenate([[self.final_alpha_cumprod], self.alphas_cumprod]), dtype)

    def alpha_bar(self, t) -> jax.Array:
        """``ᾱ_t`` for integer timesteps ``t`` (any shape); ``t < 0`` gives ``final_alpha_cumprod``."""
        t = jnp.asarray(t, jnp.int32)
        return self._table()[jnp.clip(t + 1, 0, self.num_train_timesteps)]

    def alpha_sigma(self, t) -> tuple[jax.Array, jax.Array]:
        ab = self.alpha_bar(t)
        return jnp.sqrt(ab), jnp.sqrt(1.0 - ab)

    def add_noise(self, x: jax.Array, noise: jax.Array, t) -> jax.Array:
        """``z_t = α_t x + σ_t ε`` with per-sample ``t`` ``[B]`` broadcast over the other axes of ``x``."""
        a, s = (_bcast(v, x) for v in self.alpha_sigma(t))
        return (a * x + s * noise).astype(x.dtype)

    def velocity(self, x: jax.Array, noise: jax.Array, t) -> jax.Array:
        """The v-prediction target ``α_t ε - σ_t x``."""
        a, s = (_bcast(v, x) for v in self.alpha_sigma(t))
        return (a * noise - s * x).astype(x.dtype)

    def target(self, prediction: str, x: jax.Array, noise: jax.Array, t) -> jax.Array:
        """What a model of this ``prediction`` type should output for ``z_t = add_noise(x, noise, t)``."""
        check_prediction(prediction)
        if prediction == "epsilon":
            return noise
        if prediction == "sample":
            return x
        return self.velocity(x, noise, t)

    def to_x_eps(self, prediction: str, model_out: jax.Array, z: jax.Array, t) -> tuple[jax.Array, jax.Array]:
        """``(x̂, ε̂)`` from a model output of the given parameterisation at ``z_t``."""
        check_prediction(prediction)
        a, s = (_bcast(v, z) for v in self.alpha_sigma(t))
        if prediction == "epsilon":
            return (z - s * model_out) / a, model_out
        if prediction == "sample":
            return model_out, (z - a * model_out) / s
        return a * z - s * model_out, a * model_out + s * z


def _bcast(v: jax.Array, like: jax.Array) -> jax.Array:
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim)).astype(like.dtype)


def check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction: expected one of {PREDICTIONS}, got {prediction!r}")


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000, spacing: str = "leading",
                   steps_offset: int = 1) -> np.ndarray:
    """diffusers' ``DDIMScheduler.set_timesteps``: int64 ``[num_steps]``, descending. ``"leading"``:
    ``arange(N) * (1000 // N)`` reversed plus ``steps_offset`` (SD: 1); ``"trailing"``: ``round(arange(1000, 0,
    -1000/N)) - 1`` (starts at 999); ``"linspace"``: ``round(linspace(0, 999, N))`` reversed."""
    if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps: expected an int in [1, {num_train_timesteps}], got {num_steps!r}")
    if spacing == "leading":
        ratio = num_train_timesteps // num_steps
        ts = (np.arange(num_steps) * ratio).round()[::-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
        ratio = num_train_timesteps / num_steps
        ts = np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1].astype(np.int64)
    else:
        raise ValueError(f"spacing: expected one of {SPACINGS}, got {spacing!r}")
    return np.ascontiguousarray(ts)


def ddim_prev_timesteps(timesteps: np.ndarray, num_train_timesteps: int = 1000) -> np.ndarray:
    """The timestep each DDIM step lands on, as diffusers computes it: ``t - 1000 // N`` (negative past 0, which
    selects ``final_alpha_cumprod``)."""
    return np.asarray(timesteps, np.int64) - num_train_timesteps // len(timesteps)


def ddim_step(sched: NoiseSchedule, model_out: jax.Array, t, s, z: jax.Array, *, prediction: str = "epsilon",
              eta: float = 0.0, noise: Optional[jax.Array] = None, clip_sample: Optional[float] = None) -> jax.Array:
    """One DDIM step ``z_t -> z_s`` (diffusers ``DDIMScheduler.step`` with ``variance_noise=noise``):

    ``x̂, ε̂`` from the model output; ``σ_η = η sqrt((1-ᾱ_s)/(1-ᾱ_t)) sqrt(1 - ᾱ_t/ᾱ_s)``;
    ``z_s = sqrt(ᾱ_s) x̂ + sqrt(1-ᾱ_s-σ_η²) ε̂ + σ_η n``. ``clip_sample`` clamps x̂ to ``[-c, c]`` (ε̂ is then
    re-derived from the clamped x̂ only when diffusers would: it is not, by default)."""
    x_hat, eps_hat = sched.to_x_eps(prediction, model_out, z, t)
    if clip_sample is not None:
        x_hat = jnp.clip(x_hat, -clip_sample, clip_sample)
    ab_t = _bcast(sched.alpha_bar(t), z)
    ab_s = _bcast(sched.alpha_bar(s), z)
    var = (1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)
    std = eta * jnp.sqrt(var)
    z_s = jnp.sqrt(ab_s) * x_hat + jnp.sqrt(jnp.maximum(1 - ab_s - std ** 2, 0.0)) * eps_hat
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step: eta > 0 needs the variance noise `noise` (same shape as z)")
        z_s = z_s + std * noise
    return z_s.astype(z.dtype)


def ddim_project(sched: NoiseSchedule, z: jax.Array, x_hat: jax.Array, t, s) -> jax.Array:
    """``DDIM(z, x̂; t -> s) = α_s x̂ + σ_s (z - α_t x̂) / σ_t``, the deterministic step as a function of x̂."""
    a_t, s_t = (_bcast(v, z) for v in sched.alpha_sigma(t))
    a_s, s_s = (_bcast(v, z) for v in sched.alpha_sigma(s))
    return (a_s * x_hat + s_s * (z - a_t * x_hat) / s_t).astype(z.dtype)
