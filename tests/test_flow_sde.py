"""SDE / ODE sampling steps with log-probabilities (Flow-GRPO) and the shifted sigma schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from idcrafter.flow import ode_step, sde_step_with_logprob, sigma_schedule


def _inputs(batch: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(batch, 4, 3, 5, generator=g).to(dtype)
    x = torch.randn(batch, 4, 3, 5, generator=g).to(dtype)
    return v, x


def _gaussian_logprob64(prev: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Independent reference: per-element N(mean, scale^2) log-density in float64, averaged per sample."""
    normal = torch.distributions.Normal(mean.double(), scale.double().expand_as(mean))
    return normal.log_prob(prev.double()).flatten(1).mean(1)


def test_sigma_schedule_endpoints_and_shift():
    sig = sigma_schedule(4, shift=3.0)
    assert sig.dtype == torch.float32 and sig.shape == (5,)
    assert sig[0].item() == 1.0 and sig[-1].item() == 0.0
    assert torch.all(sig[1:] < sig[:-1])
    # hand value: sigma = 0.5 -> 3 * 0.5 / (1 + 2 * 0.5) = 0.75
    assert sig[2].item() == pytest.approx(0.75)
    torch.testing.assert_close(sigma_schedule(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    with pytest.raises(ValueError):
        sigma_schedule(0)
    with pytest.raises(ValueError):
        sigma_schedule(4, shift=0.0)


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
@pytest.mark.parametrize("steps", [1, 4, 16, 50])
def test_sigma_schedule_matches_diffusers(shift, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    # the call the SD3 / FLUX pipelines (and Flow-GRPO) make; diffusers appends the final 0
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))
    ours = sigma_schedule(steps, shift=shift)
    assert scheduler.sigmas[-1].item() == 0.0 and ours[-1].item() == 0.0
    # diffusers shifts in float32, we round the float64 result once: at most one ulp apart
    torch.testing.assert_close(ours, scheduler.sigmas.float(), rtol=0, atol=1.2e-7)


def test_ode_step_and_dtype():
    v, x = _inputs()
    out = ode_step(v, 0.8, 0.6, x)
    torch.testing.assert_close(out, x - 0.2 * v)
    out16 = ode_step(v.bfloat16(), 0.8, 0.6, x.bfloat16())
    assert out16.dtype == torch.bfloat16


def test_sde_mean_and_std_match_flow_grpo_expanded_form():
    v, x = _inputs()
    sigma, sigma_next, a = 0.7, 0.55, 0.8
    _, _, mean, std = sde_step_with_logprob(
        v, sigma, sigma_next, x, a, generator=torch.Generator().manual_seed(1)
    )
    dt = sigma_next - sigma
    std_ref = a * math.sqrt(sigma / (1 - sigma))
    mean_ref = (
        x.double() * (1 + std_ref**2 * dt / (2 * sigma))
        + v.double() * (1 + std_ref**2 * (1 - sigma) / (2 * sigma)) * dt
    )
    assert std.flatten()[0].item() == pytest.approx(std_ref, rel=1e-6)
    torch.testing.assert_close(mean.double(), mean_ref, rtol=1e-5, atol=1e-6)


def test_sde_drawn_sample_and_logprob_equal_gaussian_density():
    v, x = _inputs()
    sigma, sigma_next, a = 0.7, 0.55, 0.7
    prev, logp, mean, std = sde_step_with_logprob(
        v, sigma, sigma_next, x, a, generator=torch.Generator().manual_seed(5)
    )
    scale = std * math.sqrt(sigma - sigma_next)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(prev, mean + scale * eps)
    assert logp.shape == (3,) and logp.dtype == torch.float32
    torch.testing.assert_close(logp.double(), _gaussian_logprob64(prev, mean, scale), rtol=1e-5, atol=1e-5)


def test_sde_scores_given_prev_sample():
    v, x = _inputs()
    given = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    prev, logp, mean, std = sde_step_with_logprob(v, 0.4, 0.3, x, 1.0, prev_sample=given)
    assert prev is given
    scale = std * math.sqrt(0.1)
    torch.testing.assert_close(logp.double(), _gaussian_logprob64(given, mean, scale), rtol=1e-5, atol=1e-5)
    # a sample far from the mean is less likely than the mean itself
    _, logp_at_mean, _, _ = sde_step_with_logprob(v, 0.4, 0.3, x, 1.0, prev_sample=mean)
    assert torch.all(logp_at_mean > logp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ratio_before_first_update_is_exactly_one(dtype):
    v, x = _inputs(dtype=dtype)
    prev, logp_old, _, _ = sde_step_with_logprob(
        v, 0.9, 0.8, x, 0.7, generator=torch.Generator().manual_seed(2)
    )
    assert prev.dtype == dtype
    _, logp_new, _, _ = sde_step_with_logprob(v, 0.9, 0.8, x, 0.7, prev_sample=prev)
    assert torch.equal(logp_new, logp_old)
    assert torch.all(torch.exp(logp_new - logp_old) == 1.0)


def test_noise_level_zero_is_the_ode_step():
    v, x = _inputs()
    prev, logp, mean, std = sde_step_with_logprob(v, 0.6, 0.45, x, 0.0)
    torch.testing.assert_close(mean, ode_step(v, 0.6, 0.45, x), rtol=0, atol=0)
    torch.testing.assert_close(prev, mean, rtol=0, atol=0)
    assert torch.equal(logp, torch.zeros(3)) and torch.all(std == 0)
    given = torch.randn_like(x)
    prev, logp, _, _ = sde_step_with_logprob(v, 1.0, 0.9, x, 0.0, prev_sample=given)
    assert prev is given and torch.isfinite(logp).all() and torch.equal(logp, torch.zeros(3))


def test_sigma_one_uses_next_sigma_and_is_finite():
    v, x = _inputs()
    a = 0.7
    prev, logp, mean, std = sde_step_with_logprob(
        v, 1.0, 0.9, x, a, generator=torch.Generator().manual_seed(0)
    )
    assert std.flatten()[0].item() == pytest.approx(a * math.sqrt(1.0 / (1 - 0.9)), rel=1e-6)
    for t in (prev, logp, mean, std):
        assert torch.isfinite(t).all()
    # also through the first two entries of a real schedule, as tensors
    sig = sigma_schedule(16, shift=3.0)
    _, logp, _, _ = sde_step_with_logprob(v, sig[0].expand(3), sig[1].expand(3), x, 1.0, prev_sample=x)
    assert torch.isfinite(logp).all()


def test_per_sample_sigmas_match_single_sample_calls():
    v, x = _inputs()
    sigma = torch.tensor([1.0, 0.7, 0.3])
    sigma_next = torch.tensor([0.9, 0.5, 0.0])
    given = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    _, logp, mean, std = sde_step_with_logprob(v, sigma, sigma_next, x, 0.9, prev_sample=given)
    assert std.shape == (3, 1, 1, 1)
    for i in range(3):
        _, lp_i, mean_i, std_i = sde_step_with_logprob(
            v[i : i + 1],
            sigma[i].item(),
            sigma_next[i].item(),
            x[i : i + 1],
            0.9,
            prev_sample=given[i : i + 1],
        )
        torch.testing.assert_close(logp[i : i + 1], lp_i)
        torch.testing.assert_close(mean[i : i + 1], mean_i)
        torch.testing.assert_close(std[i], std_i[0])
    torch.testing.assert_close(ode_step(v, sigma, sigma_next, x)[1], ode_step(v[1:2], 0.7, 0.5, x[1:2])[0])


def test_one_generator_per_sample():
    v, x = _inputs()
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    prev, _, mean, std = sde_step_with_logprob(v, 0.5, 0.4, x, 1.0, generator=gens)
    eps1 = torch.randn(x[1:2].shape, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(prev[1:2], mean[1:2] + std * math.sqrt(0.1) * eps1)


def test_logprob_gradient_flows_through_the_model_output():
    v, x = _inputs()
    v.requires_grad_(True)
    prev = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    _, logp, _, _ = sde_step_with_logprob(v, 0.5, 0.4, x, 1.0, prev_sample=prev)
    logp.sum().backward()
    assert v.grad is not None and torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0


def test_sde_step_errors():
    v, x = _inputs()
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        sde_step_with_logprob(v, 0.4, 0.5, x, 1.0)
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        sde_step_with_logprob(v, torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.4, 0.6, 0.4]), x, 1.0)
    with pytest.raises(ValueError, match="noise_level"):
        sde_step_with_logprob(v, 0.5, 0.4, x, -0.1)
    with pytest.raises(ValueError, match="one value per sample"):
        sde_step_with_logprob(v, torch.tensor([0.5, 0.5]), 0.4, x, 1.0)
    with pytest.raises(ValueError, match="generators"):
        sde_step_with_logprob(v, 0.5, 0.4, x, 1.0, generator=[torch.Generator()])
