"""Group sampling for Flow-GRPO / GSPO and re-scoring under the current policy (docs/design.md 7).

Branch-agnostic: a policy is a function `velocity(x [B, ...], sigma [B]) -> v [B, ...]` with its
conditioning already bound (text, subject stream, guidance), so the video and image branches
share this file.

A group is G samples of one (prompt, subjects) from the same initial noise. Steps before the
window are deterministic (ODE) and identical for the whole group, so they run once on a batch
of one; steps inside the window W = [l, l + w) draw SDE noise per sample and record (x_t, x_t',
log p); steps after the window run the ODE on the whole group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from idcrafter.flow.sde import ode_step, sde_step_with_logprob

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = ["Rollout", "sample_group", "window_log_probs"]


@dataclass
class Rollout:
    """What training needs from one group.

    states: x at the start of each window step, [G, w, ...]; next_states: the drawn x', [G, w, ...];
    log_probs: log p(x' | x) at sampling time, [G, w] float32; final: the clean latents [G, ...];
    window: the trained step indices; sigmas: the schedule [T + 1].
    """

    states: torch.Tensor
    next_states: torch.Tensor
    log_probs: torch.Tensor
    final: torch.Tensor
    window: list[int]
    sigmas: torch.Tensor

    @property
    def group_size(self) -> int:
        return self.final.shape[0]


def _check_window(window: Sequence[int], sigmas: torch.Tensor) -> list[int]:
    window = list(window)
    steps = sigmas.numel() - 1
    if not window or window != list(range(window[0], window[0] + len(window))) or window[0] < 0 or window[-1] >= steps:
        raise ValueError(f"window must be consecutive steps inside [0, {steps}), got {window}")
    return window


@torch.no_grad()
def sample_group(
    velocity: Velocity,
    noise: torch.Tensor,
    group_size: int,
    sigmas: torch.Tensor,
    window: Sequence[int],
    noise_level: float = 1.0,
    generator: torch.Generator | None = None,
) -> Rollout:
    """G samples from one initial noise [1, ...]: ODE before the window, SDE inside, ODE after.

    velocity sees batches of 1 (before the window) or G (from the window on); sigma is given as
    a [B] float32 tensor. Returns a `Rollout`.
    """
    if noise.shape[0] != 1:
        raise ValueError(f"noise must be one sample [1, ...], got {tuple(noise.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2 (advantages compare samples), got {group_size}")
    window = _check_window(window, sigmas)
    x = noise
    for i in range(window[0]):  # shared by the whole group
        x = ode_step(velocity(x, sigmas[i].expand(1)), sigmas[i], sigmas[i + 1], x)
    x = x.expand(group_size, *x.shape[1:]).clone()
    states, next_states, log_probs = [], [], []
    for i in window:
        sigma = sigmas[i].expand(group_size)
        v = velocity(x, sigma)
        x_next, logp, _, _ = sde_step_with_logprob(v, sigmas[i], sigmas[i + 1], x, noise_level, generator=generator)
        states.append(x)
        next_states.append(x_next)
        log_probs.append(logp)
        x = x_next
    for i in range(window[-1] + 1, sigmas.numel() - 1):
        x = ode_step(velocity(x, sigmas[i].expand(group_size)), sigmas[i], sigmas[i + 1], x)
    return Rollout(torch.stack(states, 1), torch.stack(next_states, 1), torch.stack(log_probs, 1), x, window, sigmas)


def window_log_probs(
    velocity: Velocity, rollout: Rollout, noise_level: float = 1.0, rows: torch.Tensor | None = None,
    reference: Velocity | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(x' | x) of the recorded window steps under `velocity` (with grad): [G', w] float32.

    rows: optional index of the group members to score. With `reference` (the policy with the
    adapter disabled), also returns the per-sample KL penalty summed over the window steps,
    ||mean - mean_ref||^2 / (2 std^2) averaged over elements: [G'] float32.
    """
    from idcrafter.rl.losses import kl_to_reference

    states, next_states = rollout.states, rollout.next_states
    if rows is not None:
        states, next_states = states[rows], next_states[rows]
    sigmas = rollout.sigmas
    logps, kls = [], []
    for j, i in enumerate(rollout.window):
        x = states[:, j]
        sigma = sigmas[i].expand(x.shape[0])
        _, logp, mean, std = sde_step_with_logprob(velocity(x, sigma), sigmas[i], sigmas[i + 1], x, noise_level,
                                                   prev_sample=next_states[:, j])
        logps.append(logp)
        if reference is not None:
            with torch.no_grad():
                _, _, mean_ref, _ = sde_step_with_logprob(reference(x, sigma), sigmas[i], sigmas[i + 1], x, noise_level,
                                                          prev_sample=next_states[:, j])
            kls.append(kl_to_reference(mean, mean_ref, std))
    kl = torch.stack(kls, 1).sum(1) if kls else None
    return torch.stack(logps, 1), kl
