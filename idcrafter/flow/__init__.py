"""Rectified-flow maths shared by training, sampling and RL: timesteps, noising, targets, ODE/SDE steps."""

from idcrafter.flow.matching import (
    add_noise,
    flow_loss,
    flow_target,
    sample_timesteps,
    shift_time,
    velocity_from_sample,
)
from idcrafter.flow.sde import ode_step, sde_step_with_logprob, sigma_schedule

__all__ = [
    "add_noise",
    "flow_loss",
    "flow_target",
    "ode_step",
    "sample_timesteps",
    "sde_step_with_logprob",
    "shift_time",
    "velocity_from_sample",
    "sigma_schedule",
]
