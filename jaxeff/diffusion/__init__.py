"""Diffusion schedules and samplers (diffusers semantics; parity-tested against diffusers)."""

from jaxeff.diffusion.sampling import ddim_sample
from jaxeff.diffusion.schedule import (
    NoiseSchedule,
    cosine_alphas_cumprod,
    ddim_prev_timesteps,
    ddim_project,
    ddim_step,
    ddim_timesteps,
    scaled_linear_alphas_cumprod,
)

__all__ = [
    "NoiseSchedule",
    "cosine_alphas_cumprod",
    "ddim_prev_timesteps",
    "ddim_project",
    "ddim_sample",
    "ddim_step",
    "ddim_timesteps",
    "scaled_linear_alphas_cumprod",
]
