"""Group sampling: shared noise and pre-window ODE, SDE only inside the window, exact re-scoring."""

from __future__ import annotations

import pytest
import torch

from idcrafter.flow import ode_step, sigma_schedule
from idcrafter.rl.sampling import sample_group, window_log_probs


class Linear(torch.nn.Module):
    """v = W x + b: a policy with parameters, so re-scoring has gradients."""

    def __init__(self, dim: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(0.1 * torch.randn(dim, dim, generator=g))
        self.b = torch.nn.Parameter(torch.randn(dim, generator=g))
        self.calls: list[int] = []

    def forward(self, x, sigma):
        self.calls.append(x.shape[0])
        return x @ self.w.T + self.b + 0.0 * sigma[:, None]


def test_group_shares_noise_and_pre_window_steps():
    policy = Linear(6)
    sigmas = sigma_schedule(8, shift=3.0)
    noise = torch.randn(1, 6, generator=torch.Generator().manual_seed(1))
    rollout = sample_group(policy, noise, 4, sigmas, range(3, 5), 1.0, torch.Generator().manual_seed(2))
    # Steps 0-2 ran once on a batch of one; from the window on the group is batched.
    assert policy.calls == [1, 1, 1, 4, 4, 4, 4, 4]
    x = noise
    for i in range(3):
        x = ode_step(policy(x, sigmas[i].expand(1)), sigmas[i], sigmas[i + 1], x)
    torch.testing.assert_close(rollout.states[:, 0], x.expand(4, -1))
    # The SDE made the members differ; after the window the ODE is deterministic per member.
    assert rollout.next_states[:, 0].std(0).min() > 1e-3
    y = rollout.next_states[:, -1]
    for i in range(5, 8):
        y = ode_step(policy(y, sigmas[i].expand(4)), sigmas[i], sigmas[i + 1], y)
    torch.testing.assert_close(rollout.final, y)
    assert rollout.log_probs.shape == (4, 2) and rollout.window == [3, 4]


def test_rescoring_reproduces_old_log_probs_and_has_gradients():
    policy = Linear(5)
    sigmas = sigma_schedule(6)
    rollout = sample_group(policy, torch.randn(1, 5), 3, sigmas, [0, 1], 0.7, torch.Generator().manual_seed(0))
    logp, kl = window_log_probs(policy, rollout, 0.7)
    assert kl is None
    assert torch.equal(logp.detach(), rollout.log_probs)  # ratio exactly 1 before an update
    logp.sum().backward()
    assert policy.w.grad.abs().sum() > 0
    # Against itself as reference the KL is 0; a shifted reference gives ||delta||^2 / (2 std^2).
    with torch.no_grad():
        _, kl = window_log_probs(policy, rollout, 0.7, reference=policy)
    assert torch.allclose(kl, torch.zeros(3))


def test_kl_to_a_shifted_reference_matches_the_formula():
    policy = Linear(4)
    sigmas = sigma_schedule(4)
    rollout = sample_group(policy, torch.randn(1, 4), 2, sigmas, [1], 1.0, torch.Generator().manual_seed(0))

    def shifted(x, sigma):
        return policy(x, sigma) + 0.5

    with torch.no_grad():
        _, kl = window_log_probs(policy, rollout, 1.0, reference=shifted)
    s, s_next = float(sigmas[1]), float(sigmas[2])
    std = (s / (1 - s)) ** 0.5
    # mean shifts by dt (1 + std^2 (1 - s) / (2 s)) * 0.5 for a velocity shift of 0.5
    delta = (s_next - s) * (1 + std**2 * (1 - s) / (2 * s)) * 0.5
    torch.testing.assert_close(kl, torch.full((2,), delta**2 / (2 * std**2)), rtol=1e-4, atol=1e-7)


def test_bad_arguments():
    policy = Linear(2)
    sigmas = sigma_schedule(4)
    with pytest.raises(ValueError, match="group_size"):
        sample_group(policy, torch.randn(1, 2), 1, sigmas, [0])
    with pytest.raises(ValueError, match="window"):
        sample_group(policy, torch.randn(1, 2), 2, sigmas, [3, 4])
    with pytest.raises(ValueError, match="window"):
        sample_group(policy, torch.randn(1, 2), 2, sigmas, [0, 2])
    with pytest.raises(ValueError, match="one sample"):
        sample_group(policy, torch.randn(2, 2), 2, sigmas, [0])
