"""Rectified flow (docs/design.md 6): z_t = (1 - t) z_0 + t eps, target v = eps - z_0.

t runs from 0 (data) to 1 (noise); Wan's sampler works with sigma = t and timestep = 1000 t.
"""

from __future__ import annotations

import torch


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan/SD3 resolution shift: t' = s t / (1 + (s - 1) t); s > 1 spends more time at high noise."""
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(
    batch: int,
    generator: torch.Generator | None = None,
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Logit-normal t = sigmoid(N(mean, std)), then shifted: [batch] float32 in (0, 1)."""
    u = torch.randn(batch, generator=generator) * std + mean
    return shift_time(torch.sigmoid(u), shift).to(device)


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def add_noise(z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """z_t = (1 - t) z_0 + t eps, with t [B] broadcast over the other dims of z_0 [B, ...]."""
    t = _expand(t, z0)
    return (1 - t) * z0 + t * noise


def flow_target(z0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity the model regresses: v = eps - z_0."""
    return noise - z0


def flow_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """mean ||v_theta - v||^2 in float32, optionally weighted per sample ([B])."""
    err = (pred.float() - target.float()).square().flatten(1).mean(1)
    if weight is not None:
        err = err * weight.float()
    return err.mean()


def velocity_from_sample(z_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor | float, t_min: float = 0.05) -> torch.Tensor:
    """v = (z_t - x0) / t for a model that predicts the clean sample (x-prediction).

    With z_t = (1 - t) x0 + t eps, v = eps - x0 = (z_t - x0) / t. Predicting x0 and converting
    keeps outputs on the data manifold when tokens are large pixel patches, where predicting the
    noise (or v) directly leaves residual noise in small models. t is floored at `t_min` so the
    division stays tame near the data end. t: a float or [B], broadcast over z_t [B, ...].
    """
    if not isinstance(t, torch.Tensor):
        t = torch.tensor([float(t)], device=z_t.device)
    t = t.float().clamp_min(t_min).reshape(-1, *([1] * (z_t.dim() - 1)))
    return (z_t.float() - x0.float()) / t
