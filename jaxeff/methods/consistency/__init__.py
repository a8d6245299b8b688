"""Consistency distillation (multistep consistency distillation, LCM, MLCM, SCott) as losses over denoisers."""

from jaxeff.methods.consistency.losses import (
    consistency_distillation_loss,
    distillation_grid,
    hinge_discriminator_loss,
    hinge_generator_loss,
    projection_gain,
    segment_timesteps,
    teacher_solve,
    trajectory_states,
)

__all__ = [
    "consistency_distillation_loss",
    "distillation_grid",
    "hinge_discriminator_loss",
    "hinge_generator_loss",
    "projection_gain",
    "segment_timesteps",
    "teacher_solve",
    "trajectory_states",
]
