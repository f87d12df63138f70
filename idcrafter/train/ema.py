"""Exponential moving average of trainable weights that works under every ZeRO stage.

Under ZeRO-3 each rank holds a shard of every parameter (`param.ds_tensor`); the EMA keeps a copy
of the local shard only, so its memory is partitioned like the parameters. Export swaps the EMA
into the parameters, gathers and saves, then swaps back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def _local(p: nn.Parameter) -> torch.Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class ShardedEMA:
    def __init__(self, params: list[nn.Parameter], decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.params = params
        self.decay = decay
        self.shadow = [_local(p).detach().float().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for p, s in zip(self.params, self.shadow):
            s.lerp_(_local(p).float(), 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"EMA state has {len(state['shadow'])} tensors, the model {len(self.shadow)}")
        for s, t in zip(self.shadow, state["shadow"]):
            s.copy_(t)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Parameters hold the EMA weights inside the block."""
        backup = [_local(p).detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                _local(p).copy_(s.to(_local(p).dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    _local(p).copy_(b)
