"""Helpers shared by the scorers: option checks, frame sampling, per-subject rewards, loaders.

Every scorer takes its model from a local folder or file (`path`), checked when the reward is
built (so a run fails before anything heavy loads) and loaded at the first call.
"""

from __future__ import annotations

import abc
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from idcrafter.rewards.base import RewardModel, RewardOutput, check_batch
from idcrafter.rewards.identity import COMBINE_MODES, combine_identity_scores

__all__ = [
    "SubjectReward",
    "check_frame_options",
    "check_mode",
    "load_image_processor",
    "model_dtype",
    "require_path",
    "sample_frames",
    "unit_rows",
]


def require_path(reward: str, path: str | os.PathLike | None, what: str, option: str = "path") -> Path:
    """The local model folder / file of a reward, or a one-line ValueError naming reward and option."""
    if path is None or str(path) == "":
        raise ValueError(f"reward {reward!r}: no {option} given; pass {option}=... ({what})")
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"reward {reward!r}: {option}={str(path)!r} does not exist ({what})")
    return path


def check_frame_options(reward: str, stride: int, max_frames: int | None) -> tuple[int, int | None]:
    if int(stride) < 1:
        raise ValueError(f"reward {reward!r}: stride must be >= 1, got {stride}")
    if max_frames is not None and int(max_frames) < 1:
        raise ValueError(f"reward {reward!r}: max_frames must be >= 1 or None, got {max_frames}")
    return int(stride), None if max_frames is None else int(max_frames)


def check_mode(reward: str, mode: str) -> str:
    if mode not in COMBINE_MODES:
        raise ValueError(f"reward {reward!r}: mode must be one of {', '.join(COMBINE_MODES)}, got {mode!r}")
    return mode


def sample_frames(video: np.ndarray, stride: int = 1, max_frames: int | None = None) -> np.ndarray:
    """uint8 [F, H, W, 3] -> the sampled frames [F', H, W, 3]: every `stride`-th frame, then at most
    `max_frames` of those, evenly spaced and always including the first and the last."""
    frames = np.asarray(video)[::stride]
    if max_frames is not None and len(frames) > max_frames:
        frames = frames[np.linspace(0, len(frames) - 1, max_frames).round().astype(int)]
    return frames


def model_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """None -> float32; "bfloat16" / "bf16" / torch.bfloat16 -> torch.bfloat16, ..."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    value = getattr(torch, names.get(str(dtype), str(dtype)), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
    return value


def unit_rows(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """[N, D] -> rows scaled to unit L2 norm, in float32 (a zero row stays zero, never NaN)."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def load_image_processor(path: str | os.PathLike):
    """The image processor of a local model folder, on the PIL backend (no torchvision needed)."""
    import transformers
    from transformers import AutoImageProcessor

    # transformers 5 names the backend; 4.x calls the PIL processors the "slow" ones.
    backend = {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {"use_fast": False}
    return AutoImageProcessor.from_pretrained(str(path), local_files_only=True, **backend)


class SubjectReward(RewardModel, abc.ABC):
    """A reward made of per-subject scores: combined by `mode`, logged as `{name}_mean` / `{name}_min`.

    Subclasses implement `subject_scores` (one float array [R_i] per sample, R_i = its references).
    """

    mode: str = "mean_min"

    @abc.abstractmethod
    def subject_scores(self, samples: list[np.ndarray], prompts: list[str], refs: list[list[np.ndarray]],
                       meta: list[dict], warnings: Counter) -> list[np.ndarray]:
        """One float array [R_i] per sample: each reference's score."""

    def __call__(self, samples, prompts, refs, meta=None) -> RewardOutput:
        check_batch(samples, prompts, refs, meta)
        warnings: Counter = Counter()
        per_subject = self.subject_scores(list(samples), list(prompts), [list(r) for r in refs],
                                          list(meta) if meta is not None else [{} for _ in samples], warnings)
        components = {
            self.name: [combine_identity_scores(s, self.mode) for s in per_subject],
            f"{self.name}_mean": [combine_identity_scores(s, "mean") for s in per_subject],
            f"{self.name}_min": [combine_identity_scores(s, "min") for s in per_subject],
        }
        components = {k: torch.tensor(v, dtype=torch.float32).reshape(len(per_subject)) for k, v in components.items()}
        return RewardOutput(components[self.name], components, warnings)

    def score(self, samples, prompts, refs, meta, warnings) -> Sequence[float]:
        return [combine_identity_scores(s, self.mode) for s in self.subject_scores(samples, prompts, refs, meta, warnings)]
