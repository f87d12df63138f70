"""The guidance interval of the three-pass guidance (docs/design.md 4).

The three passes (v_uncond, v_ref, v_ref_txt) cost about 1.5x two-pass classifier-free guidance.
Following Kynkaenniemi et al. 2024 ("Applying guidance in a limited interval", Sec. 3), the
guidance passes run only at the steps whose sigma lies in [low, high]; elsewhere only the
conditional pass v_ref_txt runs and the guidance term

    g = v - v_ref_txt = (s_img - 1) (v_ref - v_uncond) + (s_txt - 1) (v_ref_txt - v_ref)

of the most recent step that ran the passes is added to it (zero before any such step, which is
the paper's "no guidance outside the interval"). What is reused is g in velocity space: the space
in which the pipeline combines the passes and the Euler step integrates them. For a clean-sample
model g = (x0_ref_txt - x0_guided) / sigma_then, so at a later step it moves the clean estimate
x - sigma_now v by sigma_now / sigma_then of the difference computed: the reused guidance fades
out as the noise does, instead of adding a stale image-space difference whole at the last step,
as reusing the clean-sample difference would (docs/design.md 4).

Torch-free, so the command-line validation can import it (`idcrafter.video.infer.parse_guidance_interval`
turns its ValueError into a one-line InputError).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class GuidanceInterval:
    """The sigmas [low, high] (flow-matching sigma in [0, 1], 1 = pure noise) at which the
    unconditional and image-only passes run; both ends included."""

    low: float
    high: float

    def __post_init__(self):
        for name in ("low", "high"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"guidance interval {name} must be a finite number, got {value!r}")
        if not 0.0 <= self.low <= self.high <= 1.0:
            raise ValueError(f"guidance interval [{self.low:g}, {self.high:g}] must satisfy 0 <= low <= high <= 1")

    def covers(self, sigma: float) -> bool:
        """Whether the step at `sigma` runs all guidance passes."""
        return self.low <= sigma <= self.high

    def __str__(self) -> str:
        return f"{self.low:g},{self.high:g}"


def as_interval(value) -> GuidanceInterval | None:
    """None, a GuidanceInterval, a (low, high) pair or a "LOW,HIGH" string as a GuidanceInterval (or
    None: guidance at every step). ValueError naming the problem otherwise."""
    if value is None or isinstance(value, GuidanceInterval):
        return value
    if isinstance(value, str):
        parts = value.split(",")
        if len(parts) != 2:
            raise ValueError(f"guidance interval {value!r} must be LOW,HIGH (two sigmas, e.g. 0.2,0.8)")
        try:
            value = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"guidance interval {value!r} must be LOW,HIGH (two numbers, e.g. 0.2,0.8)") from None
    if not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"guidance interval {value!r} must be a pair [low, high]")
    return GuidanceInterval(*value)


def guided_steps(sigmas: Sequence[float], interval: GuidanceInterval | None) -> list[bool]:
    """For each step's sigma, whether it runs all guidance passes (every step without an interval)."""
    return [interval is None or interval.covers(float(s)) for s in sigmas]
