"""Sliding SDE window over the sampling steps (MultiCrafter, docs/design.md 7).

Steps inside the window W(l) = [l, l + w) are sampled with the SDE and trained; all others use
the ODE. The window starts at `start` and moves l <- min(l + s, T - w) every tau iterations.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SlidingWindow:
    """num_steps T sampling steps, a window of `width` w steps that moves by `stride` s every
    `every` tau training iterations, from step `start`."""

    num_steps: int
    width: int
    every: int
    stride: int
    start: int = 0

    def __post_init__(self) -> None:
        for name in ("num_steps", "width", "every", "stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.width > self.num_steps:
            raise ValueError(f"window width {self.width} exceeds num_steps {self.num_steps}")
        if not 0 <= self.start <= self.num_steps - self.width:
            raise ValueError(f"start must be in [0, {self.num_steps - self.width}], got {self.start}")

    @classmethod
    def multicrafter(cls) -> SlidingWindow:
        """MultiCrafter's schedule: T = 16, w = 2, tau = 50, s = 1."""
        return cls(num_steps=16, width=2, every=50, stride=1)

    def position(self, iteration: int) -> int:
        """l = min(start + s * (iteration // tau), T - w)."""
        if iteration < 0:
            raise ValueError(f"iteration must be non-negative, got {iteration}")
        return min(self.start + self.stride * (iteration // self.every), self.num_steps - self.width)

    def window(self, iteration: int) -> range:
        """The SDE steps [l, l + w) at this training iteration."""
        left = self.position(iteration)
        return range(left, left + self.width)

    def is_sde(self, step: int, iteration: int) -> bool:
        """Whether sampling step `step` (0 <= step < T) uses the SDE at this iteration."""
        if not 0 <= step < self.num_steps:
            raise ValueError(f"step must be in [0, {self.num_steps}), got {step}")
        return step in self.window(iteration)
