"""Sampling steps on the flow's sigma schedule: the deterministic Euler (ODE) step and the
Flow-GRPO SDE step with its Gaussian log-probability (docs/design.md 7).

Sigmas decrease from 1 (noise) to 0 (data); a step goes from `sigma` to `sigma_next < sigma`,
so dt = sigma_next - sigma < 0. `sigma` / `sigma_next` may be python floats or [B] tensors (one
value per sample, broadcast over the other dims). Everything is computed in float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from idcrafter.flow.matching import shift_time

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)

Sigma = float | torch.Tensor


def sigma_schedule(
    num_steps: int, shift: float = 1.0, device: torch.device | str | None = None
) -> torch.Tensor:
    """Shifted sampling sigmas: [num_steps + 1] float32, sigmas[0] = 1, sigmas[-1] = 0, decreasing.

    sigma' = s sigma / (1 + (s - 1) sigma) applied to linspace(1, 0, num_steps + 1), as Wan's
    sampler and the SD3 / FLUX / Flow-GRPO pipelines do; equal to diffusers'
    `FlowMatchEulerDiscreteScheduler(shift=s).set_timesteps(sigmas=np.linspace(1, 1 / n, n))`
    (which appends the final 0). Plain `set_timesteps(n)` is a different schedule: it spaces
    the already-shifted training sigmas linearly down to their minimum and shifts them again.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    # float64 so the float32 result is the correctly rounded value of the formula
    sigmas = shift_time(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift)
    return sigmas.to(device=device, dtype=torch.float32)


def _per_sample(value: Sigma, like: torch.Tensor, name: str) -> torch.Tensor:
    """A python float or [B] / [B, 1, ...] tensor -> float32 [B or 1, 1, ..., 1] on like's device."""
    t = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if t.numel() not in (1, like.shape[0]):
        raise ValueError(
            f"{name} must be a scalar or have one value per sample ({like.shape[0]}), got {tuple(t.shape)}"
        )
    return t.reshape(-1, *([1] * (like.dim() - 1)))


def _check_sigmas(sigma: torch.Tensor, sigma_next: torch.Tensor) -> None:
    # One small host sync per step; a wrong order would otherwise surface as NaN log-probs.
    if not bool(((sigma_next >= 0) & (sigma_next < sigma) & (sigma <= 1)).all()):
        raise ValueError(
            f"need 0 <= sigma_next < sigma <= 1, got sigma={sigma.flatten().tolist()}, "
            f"sigma_next={sigma_next.flatten().tolist()}"
        )


def ode_step(
    model_output: torch.Tensor, sigma: Sigma, sigma_next: Sigma, sample: torch.Tensor
) -> torch.Tensor:
    """Euler step of the probability-flow ODE: x' = x + (sigma_next - sigma) v.

    model_output (v), sample (x): [B, ...]; computed in float32, returned in sample's dtype.
    """
    dt = _per_sample(sigma_next, sample, "sigma_next") - _per_sample(sigma, sample, "sigma")
    return (sample.float() + dt * model_output.float()).to(sample.dtype)


def _draw_noise(
    like: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None
) -> torch.Tensor:
    """Standard normal float32 noise shaped like `like`, drawn on each generator's own device."""
    if generator is None or isinstance(generator, torch.Generator):
        device = generator.device if generator is not None else like.device
        return torch.randn(like.shape, generator=generator, device=device, dtype=torch.float32).to(
            like.device
        )
    if len(generator) != like.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {like.shape[0]}")
    return torch.cat([_draw_noise(like[i : i + 1], g) for i, g in enumerate(generator)])


def sde_step_with_logprob(
    model_output: torch.Tensor,
    sigma: Sigma,
    sigma_next: Sigma,
    sample: torch.Tensor,
    noise_level: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Flow-GRPO SDE step and the log-density of its result (docs/design.md 7).

        dt   = sigma_next - sigma  (< 0)
        std  = a sqrt(sigma / (1 - sigma))
        mean = x + dt (v + std^2 / (2 sigma) (x + (1 - sigma) v))
        x'   = mean + std sqrt(-dt) eps
        log p(x') = mean over non-batch dims of
                    [-(x' - mean)^2 / (2 std^2 (-dt)) - log(std sqrt(-dt)) - log sqrt(2 pi)]

    At sigma = 1 the ratio sigma / (1 - sigma) is infinite; as in Flow-GRPO, where sigma >= 1 the
    denominator uses the next sigma below 1, which is `sigma_next` for this step:
    std = a sqrt(sigma / (1 - sigma_next)).

    Args:
        model_output: predicted velocity v, [B, ...].
        sigma, sigma_next: python floats or [B] tensors, 0 <= sigma_next < sigma <= 1.
        sample: current latent x, [B, ...].
        noise_level: a >= 0. With a = 0 the step is the deterministic ODE step: `mean` is
            x + dt v, `prev_sample` is that mean (or the given one), and `log_prob` is defined
            as zeros (the density is a point mass), so nothing is NaN.
        prev_sample: if given, [B, ...], this sample is scored instead of drawing a new one
            (re-scoring stored samples under the current policy).
        generator: one generator, or one per sample, for the noise eps.

    Returns:
        prev_sample: x' [B, ...] in sample's dtype (the given one when passed).
        log_prob: [B] float32; differentiable through `mean` (x' is detached, as in Flow-GRPO).
        mean: [B, ...] float32.
        std: [B or 1, 1, ..., 1] float32, the per-sample `std` above (without sqrt(-dt)).

    A drawn x' is rounded to sample's dtype before it is scored, so scoring the returned sample
    again gives bitwise the same log_prob: the ratio before the first update is exactly 1.
    """
    if noise_level < 0:
        raise ValueError(f"noise_level must be non-negative, got {noise_level}")
    if prev_sample is not None and prev_sample.shape != sample.shape:
        raise ValueError(
            f"prev_sample shape {tuple(prev_sample.shape)} != sample shape {tuple(sample.shape)}"
        )
    x, v = sample.float(), model_output.float()
    s = _per_sample(sigma, x, "sigma")
    s_next = _per_sample(sigma_next, x, "sigma_next")
    _check_sigmas(s, s_next)
    dt = s_next - s

    std = noise_level * torch.sqrt(s / (1 - torch.where(s >= 1, s_next, s)))
    mean = x + dt * (v + std.square() / (2 * s) * (x + (1 - s) * v))

    if noise_level == 0:
        out = mean.to(sample.dtype) if prev_sample is None else prev_sample
        return out, torch.zeros(x.shape[0], dtype=torch.float32, device=x.device), mean, std

    scale = std * torch.sqrt(-dt)
    if prev_sample is None:
        prev_sample = (mean + scale * _draw_noise(x, generator)).to(sample.dtype)
    target = prev_sample.detach().float()
    log_prob = -(target - mean).square() / (2 * scale.square()) - torch.log(scale) - _LOG_SQRT_2PI
    return prev_sample, log_prob.reshape(x.shape[0], -1).mean(1), mean, std
