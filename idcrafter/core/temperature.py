"""Dynamic Attention Modulation (One-for-All, docs/design.md 3.4).

    tau = softplus(MLP(W_q f)) + t_min,   attention = softmax(Q K^T / (sqrt(d) * tau))

tau is per query token (and per head with `per_head=True`). It is applied by dividing the queries,
q_i <- q_i / tau_i, before the attention kernel: exact, and the kernel stays the fast one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DynamicTemperature", "apply_temperature", "inverse_softplus"]


def inverse_softplus(y: float) -> float:
    """x with softplus(x) = y, for y > 0 (stable for small y)."""
    if y <= 0:
        raise ValueError(f"inverse_softplus: y must be positive, got {y}")
    return y + math.log(-math.expm1(-y))


class DynamicTemperature(nn.Module):
    """Temperature generator: projected queries [B, L, H*D] -> tau [B, L, H] (or [B, L, 1]).

    The last layer starts at zero weights, so at initialisation tau is exactly 1 for every token
    and the attention is the base model's. We write tau = 1 + (softplus(z + b0) - softplus(b0))
    with softplus(b0) = 1 - t_min: it equals softplus(z + b0) + t_min, but is exactly 1.0 in
    floating point at z = 0 rather than 1 up to rounding.
    """

    def __init__(
        self,
        query_dim: int,
        num_heads: int,
        per_head: bool = False,
        hidden_dim: int | None = None,
        t_min: float = 0.01,
    ):
        super().__init__()
        if not 0 < t_min < 1:
            raise ValueError(f"DynamicTemperature: t_min must be in (0, 1), got {t_min}")
        if query_dim % num_heads:
            raise ValueError(f"DynamicTemperature: query_dim {query_dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.per_head = per_head
        self.t_min = t_min
        hidden_dim = hidden_dim or max(32, query_dim // 4)
        self.mlp = nn.Sequential(
            nn.Linear(query_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, num_heads if per_head else 1)
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.register_buffer("bias0", torch.tensor(inverse_softplus(1.0 - t_min)), persistent=False)

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        """query: [B, L, H*D] (the output of W_q) -> tau: [B, L, H] or [B, L, 1], tau > t_min."""
        z = self.mlp(query)
        b0 = self.bias0.to(z.dtype)
        return 1.0 + (F.softplus(z + b0) - F.softplus(b0))


def apply_temperature(query: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Divide queries by their temperature.

    Args:
        query: [B, L, H, D] (diffusers' layout) or [B, H, L, D] (head-first; pass `tau` as
            [B, H|1, L, 1] then).
        tau: [B, L, H|1] from `DynamicTemperature` for the [B, L, H, D] layout.
    """
    if tau.dim() == 3:
        tau = tau[..., None]  # [B, L, H|1, 1]
    return query / tau.to(query.dtype)
