"""One interface for every reward, a registry, and the weighted composite (docs/design.md 7).

A reward is called as `reward(samples, prompts, refs, meta) -> RewardOutput`:
- samples: B generated videos, each uint8 [F, H, W, 3] (a still image is F = 1);
- prompts: B strings;
- refs: B lists of reference images, each uint8 [h, w, 3];
- meta: None or B dicts (categories, masks, attention maps, ...).
It returns one score per sample (float32 [B], never NaN) plus named per-sample components and a
count of warnings (no detection, no face, an unparsable answer): a missing detection is a defined
score, not a crash.

Models load lazily on first call from a local path or id, on the device given, so building a
composite is cheap and a run without a GPU can still list what it would use.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "CompositeReward",
    "IMAGE_OBJECT_WEIGHTS",
    "IMAGE_WEIGHTS",
    "RewardModel",
    "RewardOutput",
    "VIDEO_WEIGHTS",
    "build_reward",
    "check_batch",
    "list_rewards",
    "parse_weights",
    "register_reward",
]


@dataclass
class RewardOutput:
    """scores: float32 [B]; components: name -> float32 [B]; warnings: reason -> count."""

    scores: torch.Tensor
    components: dict[str, torch.Tensor] = field(default_factory=dict)
    warnings: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.scores = torch.nan_to_num(torch.as_tensor(self.scores, dtype=torch.float32), nan=0.0)
        self.components = {k: torch.nan_to_num(torch.as_tensor(v, dtype=torch.float32), nan=0.0)
                           for k, v in self.components.items()}


class RewardModel:
    """Base class: subclasses set `name` and implement `score` (one float per sample), or override
    `__call__` where a reward returns more than one score (the composite, per-subject rewards)."""

    name: str = "reward"

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    def __call__(self, samples: Sequence[np.ndarray], prompts: Sequence[str], refs: Sequence[Sequence[np.ndarray]],
                 meta: Sequence[dict] | None = None) -> RewardOutput:
        check_batch(samples, prompts, refs, meta)
        warnings: Counter = Counter()
        scores = self.score(list(samples), list(prompts), [list(r) for r in refs],
                            list(meta) if meta is not None else [{} for _ in samples], warnings)
        scores = torch.as_tensor(np.asarray(scores, dtype=np.float32))
        return RewardOutput(scores, {self.name: scores}, warnings)

    def score(self, samples: list[np.ndarray], prompts: list[str], refs: list[list[np.ndarray]], meta: list[dict],
              warnings: Counter) -> Sequence[float]:
        raise NotImplementedError(f"{type(self).__name__} implements neither score() nor __call__()")


def check_batch(samples: Sequence, prompts: Sequence, refs: Sequence, meta: Sequence | None) -> None:
    """Same count of samples, prompts, reference lists (and meta); samples uint8 [F, H, W, 3]."""
    n = len(samples)
    if len(prompts) != n or len(refs) != n or (meta is not None and len(meta) != n):
        counts = f"{n} samples, {len(prompts)} prompts, {len(refs)} reference lists"
        raise ValueError(f"reward batch: counts differ ({counts}{'' if meta is None else f', {len(meta)} meta'})")
    for i, s in enumerate(samples):
        a = np.asarray(s)
        if a.ndim != 4 or a.shape[-1] != 3 or a.dtype != np.uint8:
            raise ValueError(f"reward batch: sample {i} must be uint8 [F, H, W, 3], got {a.dtype} {tuple(a.shape)}")


# ------------------------------------------------------------------------------------ registry
_REGISTRY: dict[str, Callable[..., RewardModel]] = {}


def register_reward(name: str) -> Callable[[Callable[..., RewardModel]], Callable[..., RewardModel]]:
    """Decorator: register a reward factory (class or function taking keyword options)."""

    def wrap(factory):
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return wrap


def _load_builtin() -> None:
    # Importing the modules registers their rewards; each imports its heavy backend lazily.
    from idcrafter.rewards import scorers  # noqa: F401


def list_rewards() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def build_reward(name: str, **options) -> RewardModel:
    """A registered reward by name; options go to its factory (path=..., device=..., ...)."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**options)


# ------------------------------------------------------------------------------------ composite
# ID-Crafter (sec. 3 eq. 5-8, App. A.2 eq. S.13), flattened:
#   R = 0.6 (0.5 R_face + 0.5 R_subject) + 0.4 (0.6 R_aes + 0.4 R_nat),
# R_subject = NexusScore, R_aes = the LAION aesthetic MLP (`aesthetic`), R_nat = NaturalScore.
VIDEO_WEIGHTS: dict[str, float] = {"face": 0.3, "nexus": 0.3, "aesthetic": 0.24, "natural": 0.16}
# MultiCrafter supp. Sec. B, multi-human: R = w_id R_id + w_text R_clip + w_aes R_aes = 0.5 / 1.4 / 0.7,
# R_id the Hungarian multi-ID face reward, R_clip CLIP-T, R_aes HPS v2 (`hps`).
IMAGE_WEIGHTS: dict[str, float] = {"face": 0.5, "clip_text": 1.4, "hps": 0.7}
# MultiCrafter supp. Sec. B, multi-object: w_id = 1.0 with the object identity reward, w_text, w_aes unchanged.
IMAGE_OBJECT_WEIGHTS: dict[str, float] = {"object": 1.0, "clip_text": 1.4, "hps": 0.7}


def parse_weights(spec: str | Mapping[str, float]) -> dict[str, float]:
    """"face=0.3,nexus=0.3" or a mapping -> {name: weight}; weights finite, >= 0, summing to > 0."""
    if isinstance(spec, str):
        weights = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"reward weights {spec!r}: {part!r} is not name=weight")
            try:
                weights[name.strip()] = float(value)
            except ValueError:
                raise ValueError(f"reward weights {spec!r}: {value!r} is not a number") from None
    else:
        weights = {str(k): float(v) for k, v in spec.items()}
    if not weights:
        raise ValueError("reward weights: none given")
    bad = [k for k, v in weights.items() if not np.isfinite(v) or v < 0]
    if bad:
        raise ValueError(f"reward weights: {', '.join(bad)} must be finite and >= 0")
    if sum(weights.values()) <= 0:
        raise ValueError(f"reward weights {weights} do not sum to a positive number")
    return weights


class CompositeReward(RewardModel):
    """R = sum_k w_k R_k (weights as given, not renormalised); every component is logged."""

    name = "composite"

    def __init__(self, weights: str | Mapping[str, float], models: Mapping[str, RewardModel] | None = None,
                 options: Mapping[str, dict] | None = None, device: str | torch.device = "cpu"):
        super().__init__(device)
        self.weights = parse_weights(weights)
        models = dict(models or {})
        options = options or {}
        for name in self.weights:
            if name not in models:
                models[name] = build_reward(name, device=device, **options.get(name, {}))
        self.models = {name: models[name] for name in self.weights}

    def __call__(self, samples, prompts, refs, meta=None) -> RewardOutput:
        check_batch(samples, prompts, refs, meta)
        total = torch.zeros(len(samples))
        components: dict[str, torch.Tensor] = {}
        warnings: Counter = Counter()
        for name, model in self.models.items():
            out = model(samples, prompts, refs, meta)
            total += self.weights[name] * out.scores
            for key, value in out.components.items():
                components[key if key != model.name else name] = value
            warnings.update({f"{name}: {k}": v for k, v in out.warnings.items()})
        return RewardOutput(total, components, warnings)
