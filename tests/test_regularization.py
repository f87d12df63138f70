"""IDAR loss, leakage, mask-to-token assignment and the global attention-mass map."""

from __future__ import annotations

import math

import pytest
import torch

from idcrafter.core.attention import ref_attention_share
from idcrafter.core.regularization import (
    attention_mass_map,
    idar_loss,
    leakage,
    masks_to_token_assignment,
    region_loss,
)


def share_from(own: float, n: int = 2, length: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens 0,1 belong to subject 0, tokens 2,3 to subject 1, each giving `own` to its subject."""
    assignment = torch.tensor([[0, 0, 1, 1]])
    share = torch.full((1, n, length), (1 - own) / (n - 1))
    share[0, 0, :2] = own
    share[0, 1, 2:] = own
    return share, assignment


def test_region_loss_prefers_concentrated_attention():
    concentrated, assignment = share_from(0.95)
    leaked, _ = share_from(0.3)
    l_good, l_bad = region_loss(concentrated, assignment), region_loss(leaked, assignment)
    assert l_good < l_bad
    assert l_good.item() == pytest.approx(-math.log(0.95), abs=1e-6)
    assert l_bad.item() == pytest.approx(-math.log(0.3), abs=1e-6)


def test_leakage_extremes_and_background():
    perfect, assignment = share_from(1.0)
    swapped, _ = share_from(0.0)
    assert leakage(perfect, assignment).item() == 0.0
    assert leakage(swapped, assignment).item() == 1.0
    # Background tokens do not count, whatever their shares.
    background = torch.tensor([[0, -1, -1, 1]])
    mixed = perfect.clone()
    mixed[0, :, 1:3] = 0.5
    assert leakage(mixed, background).item() == 0.0
    # Loss is finite even for a zero share (eps floor).
    assert torch.isfinite(region_loss(swapped, assignment))


def test_loss_and_leakage_average_over_layers():
    a, assignment = share_from(0.9)
    b, _ = share_from(0.5)
    loss, leak = idar_loss([a, b], assignment)
    assert loss.item() == pytest.approx((-math.log(0.9) - math.log(0.5)) / 2, abs=1e-6)
    assert leak.item() == pytest.approx((0.1 + 0.5) / 2, abs=1e-6)


def test_no_token_inside_masks_gives_zero_with_graph():
    share = torch.rand(1, 2, 4, requires_grad=True)
    loss = region_loss(share, torch.full((1, 4), -1))
    loss.backward()
    assert loss.item() == 0.0 and share.grad is not None


def test_region_loss_trains_attention_into_masks():
    """Gradient descent on queries through ref_attention_share lowers the loss and the leakage."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 16, 8, generator=g).requires_grad_()
    k = torch.randn(1, 2, 24, 8, generator=g)
    assignment = torch.tensor([[0] * 6 + [1] * 6 + [-1] * 4])
    ranges = [(4, 12), (12, 24)]
    opt = torch.optim.Adam([q], lr=0.1)
    history = []
    for _ in range(30):
        share = ref_attention_share(q, k, ranges, chunk_size=5)
        loss, leak = idar_loss(share, assignment)
        history.append((loss.item(), leak.item()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert history[-1][0] < 0.5 * history[0][0]
    assert history[-1][1] < 0.5 * history[0][1]


def test_mask_assignment_half_patch_rule():
    masks = torch.zeros(1, 2, 4, 4)
    masks[0, 0, :2, :2] = 1  # subject 0 fills the top-left 2x2 patch
    masks[0, 1, 2:, 2] = 1  # subject 1 covers half of the bottom-right patch: counts
    masks[0, 1, 0, 2] = 1  # a quarter of the top-right patch: does not count
    assignment = masks_to_token_assignment(masks, (2, 2))
    assert assignment.tolist() == [[0, -1, -1, 1]]


def test_mask_assignment_overlap_goes_to_nearer_centre():
    masks = torch.zeros(1, 2, 1, 6)
    masks[0, 0, 0, 0:4] = 1  # centre at token 1.5
    masks[0, 1, 0, 2:6] = 1  # centre at token 3.5
    # Tokens 2 and 3 are claimed by both: token 2 is nearer subject 0, token 3 nearer subject 1.
    assignment = masks_to_token_assignment(masks, (1, 6))
    assert assignment.tolist() == [[0, 0, 0, 1, 1, 1]]


def test_mask_assignment_video_follows_wan_temporal_grouping():
    masks = torch.zeros(1, 1, 9, 2, 2)  # 9 frames -> 3 latent frames: {0}, {1..4}, {5..8}
    masks[0, 0, 0] = 1
    masks[0, 0, 1:3] = 1  # half of the second group
    masks[0, 0, 5] = 1  # a quarter of the third group
    assignment = masks_to_token_assignment(masks, (3, 1, 1))
    assert assignment.tolist() == [[0, 0, -1]]
    # Already at latent frame rate: no temporal pooling (frames 0, 1, 2 are all inside).
    assert masks_to_token_assignment(masks[:, :, :3], (3, 1, 1)).tolist() == [[0, 0, 0]]


def test_mask_assignment_rejects_wrong_sizes():
    with pytest.raises(ValueError, match="not a multiple"):
        masks_to_token_assignment(torch.zeros(1, 2, 5, 4), (2, 2))
    with pytest.raises(ValueError, match="frames"):
        masks_to_token_assignment(torch.zeros(1, 2, 7, 4, 4), (3, 2, 2))
    with pytest.raises(ValueError, match=r"\[B, N, H, W\]"):
        masks_to_token_assignment(torch.zeros(2, 4, 4), (2, 2))
    with pytest.raises(ValueError, match="does not match"):
        region_loss(torch.rand(1, 2, 4), torch.zeros(1, 5, dtype=torch.long))


def test_attention_mass_map_matches_full_softmax():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 3, 10, 8, generator=g), torch.randn(2, 3, 17, 8, generator=g)
    ranges = [(3, 7), (12, 17)]
    tau = torch.rand(2, 10, generator=g) + 0.5
    probs = torch.softmax((q.double() / tau.double()[:, None, :, None]) @ k.double().transpose(-1, -2) / math.sqrt(8), -1)
    expected = torch.stack([probs[..., s:e].sum(-1).mean(1) for s, e in ranges], dim=1)
    mass = attention_mass_map(q, k, ranges, temperature=tau, chunk_size=3)
    torch.testing.assert_close(mass.double(), expected, atol=1e-6, rtol=0)
    # For one head, the mass renormalised over subjects is the share.
    one = attention_mass_map(q[:, :1], k[:, :1], ranges, temperature=tau)
    share = ref_attention_share(q[:, :1], k[:, :1], ranges, temperature=tau)
    torch.testing.assert_close(one / one.sum(1, keepdim=True), share, atol=1e-5, rtol=0)
    assert not mass.requires_grad
