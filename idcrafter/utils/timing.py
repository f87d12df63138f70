"""Where a generation spends its time: seconds per denoising step and each component's share.

`ComponentTimer` wraps named methods of objects for the duration of a `with` block (on the
instances, restored after), so a pipeline needs no timing code of its own. A call made inside
another timed call counts for the outer one only (the transformer encoding the subjects inside
its forward is transformer time). On CUDA every boundary synchronises, or the asynchronous
kernels would be billed to whoever waits for them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any


def _cuda_sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class ComponentTimer:
    """`targets`: (component name, object, method name); `on_step_end` is a diffusers
    `callback_on_step_end` that stamps the end of every denoising step."""

    def __init__(self, targets: Iterable[tuple[str, Any, str]], sync: Callable[[], None] = _cuda_sync):
        self.targets = [t for t in targets if t[1] is not None]
        self.sync = sync
        self.seconds: dict[str, float] = {name: 0.0 for name, _, _ in self.targets}
        self.stamps: list[float] = []
        self._active = False
        self._saved: list[tuple[Any, str, bool, Any]] = []

    def _wrap(self, name: str, method: Callable) -> Callable:
        def timed(*args, **kwargs):
            if self._active:  # inside another timed call: that one is billed
                return method(*args, **kwargs)
            self.sync()
            self._active, started = True, time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.sync()
                self.seconds[name] += time.perf_counter() - started
                self._active = False

        return timed

    def __enter__(self) -> ComponentTimer:
        for name, obj, attr in self.targets:
            self._saved.append((obj, attr, attr in vars(obj), vars(obj).get(attr)))
            setattr(obj, attr, self._wrap(name, getattr(obj, attr)))
        self.sync()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.sync()
        self.total = time.perf_counter() - self.started
        for obj, attr, had, value in reversed(self._saved):
            if had:
                setattr(obj, attr, value)
            else:
                delattr(obj, attr)
        self._saved.clear()

    def on_step_end(self, pipe, step: int, timestep, tensors: dict) -> dict:
        self.sync()
        self.stamps.append(time.perf_counter())
        return tensors

    def summary(self, step_component: str = "transformer") -> dict[str, float]:
        """s_per_step (between step ends; with one step, that step's `step_component` time),
        total_s, and `share_<component>` of the total for each component and for the rest."""
        steps = len(self.stamps)
        if steps >= 2:
            per_step = (self.stamps[-1] - self.stamps[0]) / (steps - 1)
        else:
            per_step = self.seconds.get(step_component, 0.0)
        out = {"steps": steps, "s_per_step": per_step, "total_s": self.total}
        for name, seconds in self.seconds.items():
            out[f"share_{name}"] = seconds / self.total
        out["share_other"] = max(0.0, 1.0 - sum(self.seconds.values()) / self.total)
        return out


def format_summary(summary: dict[str, float]) -> str:
    """One line: 's/step 0.123 over 4 steps; transformer 81%, vae 12%, ...'."""
    shares = ", ".join(f"{k[len('share_'):].replace('_', ' ')} {v:.0%}" for k, v in summary.items()
                       if k.startswith("share_"))
    return f"s/step {summary['s_per_step']:.3f} over {summary['steps']} steps ({summary['total_s']:.1f} s); {shares}"
