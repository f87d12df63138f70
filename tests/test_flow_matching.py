"""Rectified-flow training maths: shift, timestep sampling, noising, targets, x-prediction."""

from __future__ import annotations

import torch

from idcrafter.flow import (
    add_noise,
    flow_loss,
    flow_target,
    sample_timesteps,
    shift_time,
    velocity_from_sample,
)


def test_shift_and_timesteps():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(shift_time(t, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    torch.testing.assert_close(shift_time(t, 1.0), t)
    g = torch.Generator().manual_seed(0)
    s = sample_timesteps(4096, g, shift=3.0)
    assert s.min() > 0 and s.max() < 1 and 0.6 < s.median() < 0.9  # shift 3 moves the median from 0.5 to 0.75
    again = sample_timesteps(4096, torch.Generator().manual_seed(0), shift=3.0)
    assert torch.equal(s, again)


def test_noising_target_and_x_prediction():
    g = torch.Generator().manual_seed(1)
    z0, eps = torch.randn(3, 4, 2, 5, 5, generator=g), torch.randn(3, 4, 2, 5, 5, generator=g)
    t = torch.tensor([0.1, 0.5, 0.9])
    z_t = add_noise(z0, eps, t)
    torch.testing.assert_close(z_t[1], 0.5 * z0[1] + 0.5 * eps[1])
    v = flow_target(z0, eps)
    # Following v from z_t for time t lands on z0; an exact x0 prediction gives the exact v.
    torch.testing.assert_close(z_t - t.view(-1, 1, 1, 1, 1) * v, z0, atol=1e-6, rtol=0)
    torch.testing.assert_close(velocity_from_sample(z_t, z0, t), v, atol=1e-5, rtol=0)
    assert flow_loss(v, v).item() == 0.0
    torch.testing.assert_close(flow_loss(v + 1, v), torch.tensor(1.0))
    # t is floored: no blow-up at the data end
    assert torch.isfinite(velocity_from_sample(z0, z0 + 1, torch.zeros(3))).all()
