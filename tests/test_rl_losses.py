"""Group advantages, reward weighting, GRPO / GSPO clipped losses, KL penalty, sliding window."""

from __future__ import annotations

import math

import pytest
import torch

from idcrafter.rl import (
    SlidingWindow,
    group_advantages,
    grpo_loss,
    gspo_loss,
    kl_to_reference,
    sequence_ratio,
    weighted_rewards,
)

# ---------------------------------------------------------------- advantages


def test_group_advantages_hand_numbers_population_std():
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    std = math.sqrt(1.25)  # population std of 1..4
    torch.testing.assert_close(adv, torch.tensor([-1.5, -0.5, 0.5, 1.5]) / std)
    assert adv.dtype == torch.float32


def test_group_advantages_per_group_and_zero_variance():
    rewards = torch.tensor([[0.1, 0.1, 0.1], [1.0, 2.0, 3.0], [7.0, 7.0, 7.0]], dtype=torch.float32)
    adv = group_advantages(rewards)
    assert not torch.isnan(adv).any()
    assert torch.equal(adv[0], torch.zeros(3)) and torch.equal(adv[2], torch.zeros(3))
    torch.testing.assert_close(adv[1], torch.tensor([-1.0, 0.0, 1.0]) / math.sqrt(2 / 3))
    assert torch.equal(group_advantages(torch.tensor([[3.0], [5.0]])), torch.zeros(2, 1))


def test_group_advantages_clip():
    rewards = torch.zeros(100)
    rewards[0] = 1.0  # outlier: (1 - 0.01) / sqrt(0.0099) = 9.95
    adv = group_advantages(rewards)
    assert adv[0].item() == 5.0
    assert adv[1].item() == pytest.approx(-0.01 / math.sqrt(0.0099), rel=1e-5)
    assert group_advantages(rewards, clip=None)[0].item() == pytest.approx(0.99 / math.sqrt(0.0099), rel=1e-5)
    assert group_advantages(rewards, clip=2.0)[0].item() == 2.0
    with pytest.raises(ValueError):
        group_advantages(rewards, clip=0.0)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(2, 2, 2))


# ---------------------------------------------------------------- reward weighting


def test_weighted_rewards_hand_numbers_and_unweighted_components_ignored():
    comps = {
        "fid": torch.tensor([1.0, 0.0]),
        "qua": torch.tensor([0.5, 1.0]),
        "extra": torch.tensor([9.0, 9.0]),
    }
    r = weighted_rewards(comps, {"fid": 0.6, "qua": 0.4})
    torch.testing.assert_close(r, torch.tensor([0.8, 0.4]))
    # image-branch weights are used as given, not renormalised
    r = weighted_rewards(comps, {"fid": 0.5, "qua": 1.4})
    torch.testing.assert_close(r, torch.tensor([0.5 + 0.7, 1.4]))


def test_weighted_rewards_normalise_per_group():
    comps = {"a": torch.tensor([0.0, 2.0, 5.0, 5.0]), "b": torch.tensor([10.0, 30.0, 1.0, 3.0])}
    r = weighted_rewards(comps, {"a": 1.0, "b": 2.0}, normalise_per_group=2)
    # group 1: a -> (-1, 1), b -> (-1, 1); group 2: a constant -> (0, 0), b -> (-1, 1)
    torch.testing.assert_close(r, torch.tensor([-3.0, 3.0, -2.0, 2.0]))


def test_weighted_rewards_errors():
    comps = {"a": torch.ones(4), "b": torch.ones(4)}
    with pytest.raises(ValueError, match="unknown"):
        weighted_rewards(comps, {"a": 1.0, "c": 1.0})
    with pytest.raises(ValueError, match="positive"):
        weighted_rewards(comps, {"a": 1.0, "b": -1.0})
    with pytest.raises(ValueError, match="positive"):
        weighted_rewards(comps, {"a": -0.5})
    with pytest.raises(ValueError, match="positive"):
        weighted_rewards(comps, {})
    with pytest.raises(ValueError, match="divide"):
        weighted_rewards(comps, {"a": 1.0}, normalise_per_group=3)
    with pytest.raises(ValueError, match="same N"):
        weighted_rewards({"a": torch.ones(4), "b": torch.ones(3)}, {"a": 1.0, "b": 1.0})


# ---------------------------------------------------------------- GRPO / GSPO


def test_grpo_loss_hand_numbers():
    logp_new = torch.tensor([[0.0, math.log(1.5)], [math.log(0.5), 0.0]])
    logp_old = torch.zeros(2, 2)
    adv = torch.tensor([1.0, -1.0])
    loss, stats = grpo_loss(logp_new, logp_old, adv, clip_eps=0.2)
    # b0 (A=1): rho (1, 1.5) -> (-1, -1.2); b1 (A=-1): rho (0.5, 1) -> (0.8, 1)
    assert loss.item() == pytest.approx((-1 - 1.2 + 0.8 + 1) / 4, abs=1e-6)
    assert stats["clip_fraction"].item() == pytest.approx(0.5)
    assert stats["ratio"].item() == pytest.approx(1.0, abs=1e-6)
    kl = 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 4
    assert stats["approx_kl"].item() == pytest.approx(kl, rel=1e-5)


def test_sequence_ratio_is_geometric_mean_of_step_ratios():
    g = torch.Generator().manual_seed(0)
    logp_new, logp_old = 0.3 * torch.randn(4, 3, generator=g), 0.3 * torch.randn(4, 3, generator=g)
    step = torch.exp(logp_new - logp_old).double()
    geo = step.prod(1) ** (1 / 3)
    torch.testing.assert_close(sequence_ratio(logp_new, logp_old).double(), geo, rtol=1e-6, atol=0)
    _, stats = gspo_loss(logp_new, logp_old, torch.zeros(4), clip_eps=0.2)
    assert stats["ratio"].item() == pytest.approx(geo.mean().item(), rel=1e-6)


def test_gspo_loss_hand_numbers():
    # sequence log-ratios: mean(0, log 2.25) = log 1.5; mean(log 0.25, 0) = log 0.5
    logp_new = torch.tensor([[0.0, math.log(2.25)], [math.log(0.25), 0.0]])
    loss, stats = gspo_loss(logp_new, torch.zeros(2, 2), torch.tensor([2.0, -1.0]), clip_eps=0.2)
    # b0 (A=2): max(-3, -2.4) = -2.4; b1 (A=-1): max(0.5, 0.8) = 0.8
    assert loss.item() == pytest.approx((-2.4 + 0.8) / 2, abs=1e-6)
    assert stats["clip_fraction"].item() == 1.0
    assert stats["ratio"].item() == pytest.approx(1.0, abs=1e-6)


def _grad(loss_fn, ratio: float, adv: float) -> float:
    logp_new = torch.full((1, 1), math.log(ratio), requires_grad=True)
    loss, _ = loss_fn(logp_new, torch.zeros(1, 1), torch.tensor([adv]), clip_eps=0.2)
    loss.backward()
    return logp_new.grad.item()


@pytest.mark.parametrize("loss_fn", [grpo_loss, gspo_loss])
def test_clipping_stops_the_gradient_at_both_ends(loss_fn):
    # A > 0: pushing the ratio up stops beyond 1 + eps
    assert _grad(loss_fn, 1.5, 1.0) == 0.0
    assert _grad(loss_fn, 1.1, 1.0) == pytest.approx(-1.1, rel=1e-6)
    # A < 0: pushing the ratio down stops below 1 - eps
    assert _grad(loss_fn, 0.5, -1.0) == 0.0
    assert _grad(loss_fn, 0.9, -1.0) == pytest.approx(0.9, rel=1e-6)
    # the pessimistic side keeps its gradient (A > 0 with a small ratio, A < 0 with a large one)
    assert _grad(loss_fn, 0.5, 1.0) == pytest.approx(-0.5, rel=1e-6)
    assert _grad(loss_fn, 1.5, -1.0) == pytest.approx(1.5, rel=1e-6)


def test_equal_logps_give_unit_ratio_and_minus_mean_advantage():
    logp = torch.randn(3, 2)
    adv = torch.tensor([1.0, -2.0, 0.5])
    for fn in (grpo_loss, gspo_loss):
        loss, stats = fn(logp, logp.clone(), adv)
        assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)
        assert stats["ratio"].item() == 1.0 and stats["clip_fraction"].item() == 0.0
        assert stats["approx_kl"].item() == 0.0


def test_policy_loss_shape_errors():
    with pytest.raises(ValueError):
        grpo_loss(torch.zeros(2, 3), torch.zeros(2, 2), torch.zeros(2))
    with pytest.raises(ValueError):
        gspo_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3))
    with pytest.raises(ValueError):
        grpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), clip_eps=0.0)


# ---------------------------------------------------------------- KL


def test_kl_to_reference_hand_numbers():
    mean_ref = torch.zeros(2, 2, 3)
    mean_theta = torch.stack([torch.ones(2, 3), 2 * torch.ones(2, 3)])
    mean_theta[0, 0, 0] = 3.0  # sample 0: squared diffs (9, 1, 1, 1, 1, 1) -> mean 14 / 6
    kl = kl_to_reference(mean_theta, mean_ref, 0.5)
    torch.testing.assert_close(kl, torch.tensor([14 / 6 / 0.5, 4 / 0.5]))
    kl = kl_to_reference(mean_theta, mean_ref, torch.tensor([1.0, 2.0]).reshape(2, 1, 1))
    torch.testing.assert_close(kl, torch.tensor([14 / 6 / 2, 4 / 8]))
    assert torch.equal(kl_to_reference(mean_ref, mean_ref, 0.3), torch.zeros(2))
    with pytest.raises(ValueError):
        kl_to_reference(mean_theta, mean_ref, torch.ones(3))


# ---------------------------------------------------------------- sliding window


def test_multicrafter_window_moves_and_saturates():
    w = SlidingWindow.multicrafter()
    assert (w.num_steps, w.width, w.every, w.stride, w.start) == (16, 2, 50, 1, 0)
    assert w.window(0) == range(0, 2) and w.window(49) == range(0, 2)
    assert w.window(50) == range(1, 3) and w.window(99) == range(1, 3)
    assert w.window(700) == range(14, 16)
    assert w.window(10_000) == range(14, 16)
    assert [s for s in range(16) if w.is_sde(s, 120)] == [2, 3]


def test_custom_window_with_start_and_stride():
    w = SlidingWindow(num_steps=10, width=3, every=2, stride=3, start=1)
    assert [w.position(i) for i in range(8)] == [1, 1, 4, 4, 7, 7, 7, 7]
    assert w.window(5) == range(7, 10)
    assert w.is_sde(9, 5) and not w.is_sde(0, 5)


def test_window_errors():
    with pytest.raises(ValueError, match="exceeds"):
        SlidingWindow(num_steps=4, width=5, every=1, stride=1)
    for bad in (dict(num_steps=0), dict(width=0), dict(every=0), dict(stride=-1)):
        with pytest.raises(ValueError, match="positive"):
            SlidingWindow(**{**dict(num_steps=4, width=2, every=1, stride=1), **bad})
    with pytest.raises(ValueError, match="start"):
        SlidingWindow(num_steps=4, width=2, every=1, stride=1, start=3)
    w = SlidingWindow.multicrafter()
    with pytest.raises(ValueError):
        w.window(-1)
    with pytest.raises(ValueError):
        w.is_sde(16, 0)
