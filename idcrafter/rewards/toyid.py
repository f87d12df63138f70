"""ToyID: the toy world's identity reward, the face reward's stand-in on the toy sprites.

A trained `ToyIDEmbedder` embeds each sprite found in a frame and each reference; matching is the
shared Hungarian core (`idcrafter.rewards.identity`), per frame, averaged over the sampled frames.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch

import idcrafter
from idcrafter.rewards.base import register_reward
from idcrafter.rewards.common import (
    SubjectReward,
    check_alpha,
    check_frame_options,
    require_path,
    sample_frames,
)
from idcrafter.rewards.identity import frame_identity_scores

__all__ = ["DEFAULT_TOYID_PATH", "ToyIDReward"]

# = idcrafter.video.defaults.TOYWORLD_MODEL.parent / "toyid" (rewards must not import the video branch).
DEFAULT_TOYID_PATH = Path(idcrafter.__file__).resolve().parent / "assets" / "toyworld" / "toyid"


@register_reward("toyid")
class ToyIDReward(SubjectReward):
    """Options: path (a folder saved by `ToyIDEmbedder.save`; default: the committed toy-world one),
    alpha (weight of the worst subject per frame, 0: the mean over subjects; as `face`), mode (the
    older name: "mean" | "min" | "mean_min"), stride, max_frames (None: every frame), device.
    Components: toyid, toyid_mean, toyid_min (per-frame mean / min over subjects, averaged)."""

    name = "toyid"

    def __init__(self, path: str | Path | None = None, alpha: float | None = None, mode: str | None = None,
                 stride: int = 1, max_frames: int | None = None, device: str | torch.device = "cpu"):
        super().__init__(device)
        if path is None and not (DEFAULT_TOYID_PATH / "toyid.json").is_file():
            raise ValueError(f"reward 'toyid': no path given and the default {DEFAULT_TOYID_PATH} is missing; "
                             "pass path=... (a folder saved by ToyIDEmbedder.save)")
        self.path = require_path(self.name, path or DEFAULT_TOYID_PATH, "a folder saved by ToyIDEmbedder.save")
        if not (self.path / "toyid.json").is_file():
            raise ValueError(f"reward 'toyid': path={str(self.path)!r} has no toyid.json (save it with ToyIDEmbedder.save)")
        self.alpha = check_alpha(self.name, alpha, mode, default=0.0)
        self.stride, self.max_frames = check_frame_options(self.name, stride, max_frames)
        self.scorer = None

    def load(self):
        if self.scorer is None:
            from idcrafter.toyworld.embedder import ToyIDEmbedder
            from idcrafter.toyworld.metrics import ToyIDScorer

            self.scorer = ToyIDScorer(ToyIDEmbedder.load(self.path), self.device)
        return self.scorer

    def sample_frame_scores(self, video: np.ndarray, refs: list[np.ndarray], warnings: Counter) -> np.ndarray:
        """Per-frame, per-reference scores [F, R] of one video (their frame mean is
        `ToyIDScorer.subject_scores`), plus warning counts."""
        scorer = self.load()
        frames = sample_frames(video, self.stride, self.max_frames)
        if not refs:
            warnings["no reference images"] += 1
            return np.zeros((len(frames), 0))
        dets = [scorer.frame_embeddings(f) for f in frames]
        empty = sum(len(d) == 0 for d in dets)
        if empty:
            warnings["no sprite in a frame"] += empty
        return frame_identity_scores(scorer.reference_embeddings(refs), dets).numpy()

    def frame_scores(self, samples, prompts, refs, meta, warnings):
        return [self.sample_frame_scores(video, r, warnings) for video, r in zip(samples, refs)]
