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
from idcrafter.rewards.identity import COMBINE_MODES, MODE_ALPHA, frame_identity_reward

__all__ = [
    "SubjectReward",
    "check_alpha",
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


def check_alpha(reward: str, alpha: float | str | None, mode: str | None, default: float) -> float:
    """The weight alpha of the min term (R = (1 - alpha) mean_k + alpha min_k, ID-Crafter eq. 7 / Tab. S.7).

    `mode` is the older name for the same choice ("mean" = alpha 0, "mean_min" = 0.5, "min" = 1), still
    accepted; giving both with different meanings, or an alpha outside [0, 1], is a one-line ValueError.
    """
    if mode is not None:
        check_mode(reward, mode)
        if alpha is not None and float(alpha) != MODE_ALPHA[mode]:
            raise ValueError(f"reward {reward!r}: mode={mode!r} means alpha={MODE_ALPHA[mode]}, but alpha={alpha} "
                             "was given too; pass alpha only")
        return MODE_ALPHA[mode]
    if alpha is None:
        return float(default)
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"reward {reward!r}: alpha must be a number in [0, 1], got {alpha!r}") from None
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"reward {reward!r}: alpha must be in [0, 1] (0 = mean over subjects, 1 = min), got {alpha}")
    return value


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
    """A reward made of per-subject, per-frame scores s_fk (ID-Crafter eq. 7 and S.12):

        R = mean_f [(1 - alpha) mean_k s_fk + alpha min_k s_fk]

    logged with its two terms, `{name}_mean` = mean_f mean_k s_fk and `{name}_min` = mean_f min_k s_fk
    (so R = (1 - alpha) {name}_mean + alpha {name}_min). Subclasses implement `frame_scores`.
    """

    alpha: float = 0.5

    @abc.abstractmethod
    def frame_scores(self, samples: list[np.ndarray], prompts: list[str], refs: list[list[np.ndarray]],
                     meta: list[dict], warnings: Counter) -> list[np.ndarray]:
        """One float array [F_i, R_i] per sample: each sampled frame's score of each reference."""

    def subject_scores(self, samples: list[np.ndarray], prompts: list[str], refs: list[list[np.ndarray]],
                       meta: list[dict], warnings: Counter) -> list[np.ndarray]:
        """One float array [R_i] per sample: each reference's score averaged over the sampled frames."""
        return [s.mean(0) if len(s) else np.zeros(s.shape[1]) for s in
                self.frame_scores(samples, prompts, refs, meta, warnings)]

    def __call__(self, samples, prompts, refs, meta=None) -> RewardOutput:
        check_batch(samples, prompts, refs, meta)
        warnings: Counter = Counter()
        per_frame = self.frame_scores(list(samples), list(prompts), [list(r) for r in refs],
                                      list(meta) if meta is not None else [{} for _ in samples], warnings)
        terms = np.array([frame_identity_reward(np.asarray(s, np.float64), self.alpha)
                          for s in per_frame], np.float64).reshape(len(per_frame), 3)
        components = {self.name: terms[:, 0], f"{self.name}_mean": terms[:, 1], f"{self.name}_min": terms[:, 2]}
        components = {k: torch.tensor(v, dtype=torch.float32) for k, v in components.items()}
        return RewardOutput(components[self.name], components, warnings)

    def score(self, samples, prompts, refs, meta, warnings) -> Sequence[float]:
        return [frame_identity_reward(np.asarray(s, np.float64), self.alpha)[0]
                for s in self.frame_scores(samples, prompts, refs, meta, warnings)]
