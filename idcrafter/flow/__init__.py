"""Rectified-flow maths shared by training, sampling and RL: timesteps, noising, targets."""

from idcrafter.flow.matching import add_noise, flow_loss, flow_target, sample_timesteps, shift_time

__all__ = ["add_noise", "flow_loss", "flow_target", "sample_timesteps", "shift_time"]
