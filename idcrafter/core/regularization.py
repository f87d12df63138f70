"""IDAR: mask-supervised attention regularisation and the leakage metric (docs/design.md 3.3).

    L_attn  = mean over layers, over target tokens i inside some M_k, of -log share(i, k(i))
    leakage = mean over the same tokens of (1 - share(i, k(i)))

`share` comes from `idcrafter.core.attention.ref_attention_share`. Subject masks are brought to
the target token grid by `masks_to_token_assignment`. `attention_mass_map` gives the exact
global attention mass for pictures (no grad).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from idcrafter.core.attention import _expand_temperature, ref_segments

__all__ = [
    "attention_mass_map",
    "idar_loss",
    "leakage",
    "masks_to_token_assignment",
    "region_loss",
]

BACKGROUND = -1


def _pool_time(masks: torch.Tensor, t: int) -> torch.Tensor:
    """[B, N, T, H, W] -> [B, N, t, H, W] following the Wan VAE's causal temporal grouping.

    Wan encodes the first frame alone and every later group of 4 frames into one latent frame,
    so T = 4 (t - 1) + 1 frames map to t latent frames.
    """
    frames = masks.shape[2]
    if frames == t:
        return masks
    if frames != 4 * (t - 1) + 1:
        raise ValueError(
            f"masks have {frames} frames; the token grid has {t} latent frames, which needs {t} or "
            f"{4 * (t - 1) + 1} mask frames"
        )
    first = masks[:, :, :1]
    rest = masks[:, :, 1:].unflatten(2, (t - 1, 4)).mean(dim=3)
    return torch.cat([first, rest], dim=2)


def masks_to_token_assignment(masks: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Assign each target token to one subject, or to the background.

    A token belongs to subject k when at least half of its patch lies inside M_k; a token claimed
    by several subjects goes to the subject whose mask centre (in token coordinates) is nearest.

    Args:
        masks: [B, N, H, W] for images, or [B, N, T, H, W] for video, values in [0, 1]. H and W
            must be multiples of the grid's h and w; T must equal t or 4 (t - 1) + 1.
        grid: (h, w) or (t, h, w) token grid of the target, row-major.

    Returns:
        [B, L] long, L = prod(grid): subject index per token, -1 for background.
    """
    grid = tuple(int(g) for g in grid)
    if masks.dim() != len(grid) + 2:
        raise ValueError(
            f"masks must be [B, N, H, W] for a 2-d grid or [B, N, T, H, W] for a 3-d grid; got shape "
            f"{tuple(masks.shape)} for grid {grid}"
        )
    if masks.shape[1] == 0:
        raise ValueError("masks have no subjects (N = 0)")
    masks = masks.float()
    if len(grid) == 3:
        masks = _pool_time(masks, grid[0])
    h, w = grid[-2:]
    height, width = masks.shape[-2:]
    if height % h or width % w:
        raise ValueError(f"mask size {height}x{width} is not a multiple of the token grid {h}x{w}")
    flat = masks.flatten(0, -3) if masks.dim() > 4 else masks
    cover = F.avg_pool2d(flat, kernel_size=(height // h, width // w))  # fraction of each patch inside
    cover = cover.reshape(*masks.shape[:-2], h, w).flatten(2)  # [B, N, L]
    inside = cover >= 0.5

    # Nearest-centre rule for overlaps: distance from each token to each subject's centre.
    coords = torch.stack(
        torch.meshgrid(*[torch.arange(g, dtype=torch.float32) for g in grid], indexing="ij"), dim=-1
    ).reshape(-1, len(grid))  # [L, dims]
    weight = cover / cover.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    centres = weight @ coords  # [B, N, dims]
    dist = torch.cdist(coords.expand(masks.shape[0], -1, -1), centres)  # [B, L, N]
    dist = dist.masked_fill(~inside.transpose(1, 2), math.inf)
    nearest = dist.argmin(dim=-1)
    return torch.where(inside.any(dim=1), nearest, torch.full_like(nearest, BACKGROUND))


def _as_layers(share: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [share] if isinstance(share, torch.Tensor) else list(share)


def _own_share(share: torch.Tensor, assignment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """share [B, N, L], assignment [B, L] -> (share of each token's own subject [B, L], inside [B, L])."""
    if share.dim() != 3:
        raise ValueError(f"share must be [B, N, L], got {tuple(share.shape)}")
    if assignment.shape != (share.shape[0], share.shape[2]):
        raise ValueError(
            f"assignment {tuple(assignment.shape)} does not match share [B, N, L] = {tuple(share.shape)}"
        )
    if int(assignment.max()) >= share.shape[1]:
        raise ValueError(f"assignment names subject {int(assignment.max())} but share has {share.shape[1]}")
    inside = assignment >= 0
    own = share.gather(1, assignment.clamp_min(0)[:, None, :]).squeeze(1)
    return own, inside


def region_loss(
    share: torch.Tensor | Sequence[torch.Tensor], assignment: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """IDAR loss: mean over layers and over tokens inside some mask of -log share(i, k(i)).

    Args:
        share: [B, N, L] or a list of them, one per selected layer.
        assignment: [B, L] long from `masks_to_token_assignment` (-1 = background).
        eps: floor inside the log, so a share of exactly 0 gives a finite loss.

    Returns:
        scalar. 0 (still attached to the graph) when no token lies inside a mask.
    """
    losses = []
    for layer_share in _as_layers(share):
        own, inside = _own_share(layer_share, assignment)
        nll = -torch.log(own.clamp_min(eps))
        losses.append((nll * inside).sum() / inside.sum().clamp_min(1))
    return torch.stack(losses).mean()


def leakage(share: torch.Tensor | Sequence[torch.Tensor], assignment: torch.Tensor) -> torch.Tensor:
    """Leakage: mean over layers and tokens inside some mask of 1 - share(i, k(i)); 0 = none."""
    values = []
    for layer_share in _as_layers(share):
        own, inside = _own_share(layer_share, assignment)
        values.append(((1.0 - own) * inside).sum() / inside.sum().clamp_min(1))
    return torch.stack(values).mean()


def idar_loss(
    share: torch.Tensor | Sequence[torch.Tensor], assignment: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_attn, leakage) in one call; leakage is detached (a metric, not a loss)."""
    return region_loss(share, assignment, eps), leakage(share, assignment).detach()


@torch.no_grad()
def attention_mass_map(
    q: torch.Tensor,
    k: torch.Tensor,
    ref_ranges: Sequence[tuple[int, int]],
    scale: float | None = None,
    temperature: torch.Tensor | None = None,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Exact global attention mass on each subject's references, for visualisation.

        mass_h(i, k) = sum_{j in R_k} softmax_j(s q_i.k_j over ALL keys),   mass = mean_h mass_h

    Unlike the share, the normaliser runs over every key (text, target, references), so it needs
    the log-sum-exp of full rows; it is computed chunk by chunk without grad.

    Args: as `ref_attention_share`; temperature [B, L_q], [B, L_q, H|1] or [B, H|1, L_q, 1].

    Returns:
        [B, N, L_q] float32 in [0, 1]; the sum over N is the fraction of attention on references.
    """
    b, h, lq, d = q.shape
    ranges = ref_segments(ref_ranges, k.shape[2])
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    tau = None if temperature is None else _expand_temperature(temperature, b, h, lq)
    kf = k.float()
    out = []
    for start in range(0, lq, chunk_size):
        qc = q[:, :, start : start + chunk_size].float()
        if tau is not None:
            qc = qc / tau[:, :, start : start + chunk_size].float()
        logits = torch.einsum("bhqd,bhkd->bhqk", qc, kf) * scale
        lse = logits.logsumexp(dim=-1, keepdim=True)
        masses = [(logits[..., s:e] - lse).exp().sum(-1).mean(dim=1) for s, e in ranges]  # each [B, c]
        out.append(torch.stack(masses, dim=1))
    return torch.cat(out, dim=2)
