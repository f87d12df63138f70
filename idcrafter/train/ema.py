"""Copies of the trainable weights that work under every ZeRO stage: a frozen snapshot (online
RL's reference policy as it was at the start) and the exponential moving average.

Under ZeRO-3 each rank holds a shard of every parameter (`param.ds_tensor`); a snapshot keeps a
copy of the local shard only, so its memory is partitioned like the parameters. `applied()` swaps
the copy into the parameters for a block (export, validation samples, a reference forward) and
swaps back, gathering again the parameters ZeRO-3 keeps gathered.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def _local(p: nn.Parameter) -> torch.Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


def _regather_persistent(params: list[nn.Parameter]) -> None:
    """After their shards changed, gather again the ZeRO-3 parameters that stay gathered between
    forwards (DeepSpeed's persistent parameters, those below `stage3_param_persistence_threshold`):
    their full copies would otherwise keep the old values in every forward and in an export, whose
    gather skips parameters already available. Drop the stale copy, then gather, as DeepSpeed does
    after loading a checkpoint (stage3.py `_load_checkpoint`). A collective: every rank calls it on
    the same parameters. Nothing to do without ZeRO-3."""
    live = [p for p in params if getattr(p, "ds_persist", False) and p.ds_status.name == "AVAILABLE"]
    if live:
        live[0].partition(live)
        live[0].all_gather(live)


class ParameterSnapshot:
    """The values `params` have now (this rank's shards), kept in float32."""

    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.shadow = [_local(p).detach().float().clone() for p in params]

    def state_dict(self) -> dict:
        return {"shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"snapshot state has {len(state['shadow'])} tensors, the model {len(self.shadow)}")
        for s, t in zip(self.shadow, state["shadow"]):
            s.copy_(t)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Parameters hold the snapshot's values inside the block."""
        backup = [_local(p).detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                _local(p).copy_(s.to(_local(p).dtype))
        _regather_persistent(self.params)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    _local(p).copy_(b)
            _regather_persistent(self.params)


class ShardedEMA(ParameterSnapshot):
    """Exponential moving average of `params`: `update()` after each optimizer step."""

    def __init__(self, params: list[nn.Parameter], decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        super().__init__(params)
        self.decay = decay

    @torch.no_grad()
    def update(self) -> None:
        for p, s in zip(self.params, self.shadow):
            s.lerp_(_local(p).float(), 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, **super().state_dict()}
