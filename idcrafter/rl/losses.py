"""Online-RL maths (docs/design.md 7): group advantages, reward weighting, GRPO / GSPO clipped
objectives and the KL penalty to the reference policy. Pure functions, float32 results.

Shapes: B samples in the batch, T trained (window) steps per sample, G samples per group.
"""

from __future__ import annotations

import torch

Stats = dict[str, torch.Tensor]


def _group_normalise(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """(r - mean) / (std + eps) along the last dim, population std, computed in float64.

    Groups whose rewards are all equal give exactly 0: with std = 0 the rounding error of the
    mean divided by eps would otherwise be an arbitrary number.
    """
    r = rewards.double()
    adv = (r - r.mean(-1, keepdim=True)) / (r.std(-1, unbiased=False, keepdim=True) + eps)
    constant = (r == r[..., :1]).all(-1, keepdim=True)
    return torch.where(constant, torch.zeros_like(adv), adv)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-8, clip: float | None = 5.0) -> torch.Tensor:
    """A_i = (r_i - mean(r)) / (std(r) + eps) within each group, clipped to [-clip, clip].

    rewards: [G] (one group) or [num_groups, G]. std is the population std (divide by G, as
    numpy's default and Flow-GRPO). A group whose rewards are all equal, including G = 1, gets
    exactly zero advantages. `clip=None` disables clipping. Returns float32, same shape.
    """
    if rewards.dim() not in (1, 2) or rewards.shape[-1] == 0:
        raise ValueError(f"rewards must be [G] or [num_groups, G] with G >= 1, got {tuple(rewards.shape)}")
    if eps < 0:
        raise ValueError(f"eps must be non-negative, got {eps}")
    adv = _group_normalise(rewards, eps)
    if clip is not None:
        if clip <= 0:
            raise ValueError(f"clip must be positive, got {clip}")
        adv = adv.clamp(-clip, clip)
    return adv.float()


def weighted_rewards(
    components: dict[str, torch.Tensor],
    weights: dict[str, float],
    normalise_per_group: int | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """R = sum_k w_k r_k over the named reward components: [N] float32.

    components: name -> [N] rewards; names without a weight are ignored (they may be logged only).
    weights: name -> w_k; every name must be a component and the weights must sum to a positive
    number. They are used as given, not renormalised (the image branch's (0.5, 1.4, 0.7)).
    normalise_per_group: G; if set, each component is first normalised within consecutive groups
    of G samples, (r - mean) / (std + eps) with the population std and zeros for constant groups,
    so that rewards on different scales enter the weighting comparably. N must divide by G.
    """
    unknown = sorted(set(weights) - set(components))
    if unknown:
        raise ValueError(f"weights name unknown rewards {unknown}; available: {sorted(components)}")
    if not weights or not sum(weights.values()) > 0:
        raise ValueError(f"reward weights must sum to a positive number, got {weights}")
    shapes = {name: tuple(components[name].shape) for name in weights}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 1:
        raise ValueError(f"reward components must all be [N] with the same N, got {shapes}")
    n = next(iter(shapes.values()))[0]
    if normalise_per_group is not None and (normalise_per_group < 1 or n % normalise_per_group):
        raise ValueError(f"normalise_per_group={normalise_per_group} must be positive and divide N={n}")

    total = None
    for name, w in weights.items():
        r = components[name].double()
        if normalise_per_group is not None:
            r = _group_normalise(r.reshape(-1, normalise_per_group), eps).reshape(n)
        total = w * r if total is None else total + w * r
    return total.float()


def _check_logps(
    logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, clip_eps: float
) -> None:
    if logp_new.dim() != 2 or logp_new.shape != logp_old.shape:
        raise ValueError(
            f"log-probs must both be [B, T], got {tuple(logp_new.shape)} and {tuple(logp_old.shape)}"
        )
    if advantages.shape != logp_new.shape[:1]:
        raise ValueError(f"advantages must be [B] = [{logp_new.shape[0]}], got {tuple(advantages.shape)}")
    if not 0 < clip_eps < 1:
        raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps}")


def _clipped_objective(ratio: torch.Tensor, advantages: torch.Tensor, clip_eps: float) -> torch.Tensor:
    """max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), elementwise; A broadcast over rho's trailing dims."""
    adv = advantages.detach().float().reshape(-1, *([1] * (ratio.dim() - 1)))
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps))


def _stats(ratio: torch.Tensor, log_ratio: torch.Tensor, clip_eps: float) -> Stats:
    ratio, log_ratio = ratio.detach(), log_ratio.detach()
    return {
        "clip_fraction": ((ratio - 1).abs() > clip_eps).float().mean(),
        "ratio": ratio.mean(),
        # Flow-GRPO's estimate: 0.5 E[(log rho)^2] over all trained steps
        "approx_kl": 0.5 * log_ratio.square().mean(),
    }


def grpo_loss(
    logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, clip_eps: float = 0.2
) -> tuple[torch.Tensor, Stats]:
    """Per-step clipped policy loss (Flow-GRPO).

    rho_{b,t} = exp(logp_new - logp_old); L = mean_{b,t} max(-A_b rho, -A_b clip(rho, 1 - eps, 1 + eps)).
    logp_new: [B, T] under the current policy (with grad); logp_old: [B, T] at sampling time
    (treated as constant); advantages: [B] (constant). Returns the scalar loss and detached
    stats: clip_fraction (share of steps with |rho - 1| > eps), ratio (mean rho), approx_kl
    (0.5 mean (log rho)^2).
    """
    _check_logps(logp_new, logp_old, advantages, clip_eps)
    log_ratio = logp_new.float() - logp_old.detach().float()
    ratio = torch.exp(log_ratio)
    return _clipped_objective(ratio, advantages, clip_eps).mean(), _stats(ratio, log_ratio, clip_eps)


def sequence_ratio(logp_new: torch.Tensor, logp_old: torch.Tensor) -> torch.Tensor:
    """GSPO's sequence ratio s_b = exp(mean_t (logp_new - logp_old)): the geometric mean of the
    per-step ratios over the T window steps. [B, T], [B, T] -> [B] float32."""
    return torch.exp((logp_new.float() - logp_old.detach().float()).mean(1))


def gspo_loss(
    logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, clip_eps: float = 0.2
) -> tuple[torch.Tensor, Stats]:
    """Sequence-level clipped policy loss (GSPO, MultiCrafter's IPPO).

    s_b = exp(mean_t (logp_new - logp_old)); L = mean_b max(-A_b s_b, -A_b clip(s_b, 1 - eps, 1 + eps)).
    Same inputs as `grpo_loss`. Stats: clip_fraction (share of sequences with |s - 1| > eps),
    ratio (mean s), approx_kl (0.5 mean (log rho)^2 over the per-step log-ratios).
    """
    _check_logps(logp_new, logp_old, advantages, clip_eps)
    log_ratio = logp_new.float() - logp_old.detach().float()
    seq = sequence_ratio(logp_new, logp_old)
    stats = _stats(seq, log_ratio, clip_eps)
    return _clipped_objective(seq, advantages, clip_eps).mean(), stats


def kl_to_reference(
    mean_theta: torch.Tensor, mean_ref: torch.Tensor, std: float | torch.Tensor
) -> torch.Tensor:
    """KL penalty to the reference policy: ||mean_theta - mean_ref||^2 / (2 std^2) -> [B] float32.

    mean_theta, mean_ref: [B, ...] SDE-step means under the policy and the reference (adapter
    disabled; treated as constant). The squared difference is averaged (not summed) over the
    non-batch dims, matching the per-element log-probs, then divided by 2 std^2 per sample.
    std: float, [B] or [B, 1, ..., 1] (as `sde_step_with_logprob` returns), must be positive.
    With that `std` this is Flow-GRPO's penalty; pass std * sqrt(-dt) for the exact KL between
    the two step Gaussians.
    """
    if mean_theta.shape != mean_ref.shape:
        raise ValueError(f"means differ in shape: {tuple(mean_theta.shape)} vs {tuple(mean_ref.shape)}")
    b = mean_theta.shape[0]
    sq = (mean_theta.float() - mean_ref.detach().float()).square().reshape(b, -1).mean(1)
    s = torch.as_tensor(std, dtype=torch.float32, device=mean_theta.device).reshape(-1)
    if s.numel() not in (1, b):
        raise ValueError(f"std must be a scalar or have one value per sample ({b}), got {tuple(s.shape)}")
    return sq / (2 * s.square())
