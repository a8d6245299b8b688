"""Diffusion schedules and samplers: DDIM, LCM, multistep consistency, TLCM (diffusers semantics; DDIM and LCM
parity-tested against diffusers)."""

from jaxeff.diffusion.consistency import (
    TLCM_MILESTONES,
    consistency_output,
    lcm_boundary_scalings,
    lcm_sample,
    lcm_step,
    lcm_timesteps,
    mcm_boundaries,
    mcm_sample,
    segment_start,
    tlcm_sample,
    tlcm_subset,
    tlcm_timesteps,
)
from jaxeff.diffusion.sampling import ddim_sample, ddim_trajectory
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
    "TLCM_MILESTONES",
    "NoiseSchedule",
    "consistency_output",
    "lcm_boundary_scalings",
    "lcm_sample",
    "lcm_step",
    "lcm_timesteps",
    "mcm_boundaries",
    "mcm_sample",
    "segment_start",
    "tlcm_sample",
    "tlcm_subset",
    "tlcm_timesteps",
    "cosine_alphas_cumprod",
    "ddim_prev_timesteps",
    "ddim_project",
    "ddim_sample",
    "ddim_trajectory",
    "ddim_step",
    "ddim_timesteps",
    "scaled_linear_alphas_cumprod",
]
