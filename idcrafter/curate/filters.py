"""Clip filters (docs/design.md 8.1, stages `blur`, `motion`, `aesthetic`).

Each scores a few frames sampled evenly over the candidate's clip and drops it below (or above) a
threshold. The papers name the problems (MultiCrafter App. D: video frames "with motion blur or
lower aesthetic appeal") but no thresholds; the defaults here are this project's and each is
stated with its unit so a preset or a settings file can set it for its data.
"""

from __future__ import annotations

import numpy as np

from idcrafter.curate.core import Candidate, Dropped, Outcome, Stage

__all__ = ["AestheticFilter", "BlurFilter", "MotionFilter", "flow_magnitude", "laplacian_variance", "sample_evenly"]


def sample_evenly(count: int, k: int) -> np.ndarray:
    """Up to `k` indices spread evenly over range(count), first and last included."""
    return np.unique(np.linspace(0, count - 1, num=max(1, min(k, count))).round().astype(int))


def _grey(frame: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)


def laplacian_variance(frame: np.ndarray) -> float:
    """(H, W, 3) uint8 -> variance of the Laplacian of its grey image (Pech-Pacheco et al. 2000):
    low for blurred frames, whose edges are spread out."""
    import cv2

    return float(cv2.Laplacian(_grey(frame), cv2.CV_64F).var())


def flow_magnitude(first: np.ndarray, second: np.ndarray, side: int | None = None) -> float:
    """Two (H, W, 3) uint8 frames -> the mean Farneback optical-flow magnitude between them, as a
    fraction of the frame's short side (so the thresholds do not depend on resolution). `side`:
    the flow is computed on frames scaled down to this short side (a fraction barely changes,
    the time falls with the pixel count)."""
    import cv2

    if side is not None and min(first.shape[:2]) > side:
        from idcrafter.curate.probe import resize_short_side

        first, second = resize_short_side(first, side), resize_short_side(second, side)
    flow = cv2.calcOpticalFlowFarneback(_grey(first), _grey(second), None, pyr_scale=0.5, levels=3, winsize=15,
                                        iterations=3, poly_n=5, poly_sigma=1.2, flags=0)
    return float(np.linalg.norm(flow, axis=-1).mean() / min(first.shape[:2]))


class BlurFilter(Stage):
    """Drops "blurry" clips: the median variance of the Laplacian over `num_frames` sampled frames
    is below `min_variance` (grey levels squared; 100 is the usual rule of thumb for sharp photos)."""

    name = "blur"

    def __init__(self, min_variance: float = 100.0, num_frames: int = 4) -> None:
        super().__init__()
        self.min_variance, self.num_frames = min_variance, num_frames

    def score(self, candidate: Candidate) -> float:
        frames = candidate.frames
        return float(np.median([laplacian_variance(frames[i]) for i in sample_evenly(len(frames), self.num_frames)]))

    def process(self, batch: list[Candidate]) -> list[Outcome]:
        out: list[Outcome] = []
        for candidate in batch:
            candidate.info["sharpness"] = score = self.score(candidate)
            out.append(candidate if score >= self.min_variance else Dropped(candidate, "blurry"))
        return out


class MotionFilter(Stage):
    """Drops "static" clips (mean flow below `min_motion`) and "chaotic motion" (above `max_motion`).

    Motion is the mean optical-flow magnitude between consecutive clip frames, as a fraction of
    the short side per clip frame, averaged over `num_pairs` pairs spread over the clip: 0.002 is
    about one pixel a frame at 480p (nothing moves), 0.08 about 40 pixels (whip pans, shaking).
    A one-frame candidate (image mode) has no motion to measure and passes. `side`: the flow's
    working short side (frames larger are scaled down first).
    """

    name = "motion"

    def __init__(self, min_motion: float = 0.002, max_motion: float = 0.08, num_pairs: int = 4, side: int = 256) -> None:
        super().__init__()
        if not 0 <= min_motion < max_motion:
            raise ValueError(f"need 0 <= min_motion < max_motion, got {min_motion}, {max_motion}")
        self.min_motion, self.max_motion, self.num_pairs, self.side = min_motion, max_motion, num_pairs, side

    def score(self, candidate: Candidate) -> float | None:
        frames = candidate.frames
        if len(frames) < 2:
            return None
        starts = sample_evenly(len(frames) - 1, self.num_pairs)
        return float(np.mean([flow_magnitude(frames[i], frames[i + 1], self.side) for i in starts]))

    def process(self, batch: list[Candidate]) -> list[Outcome]:
        out: list[Outcome] = []
        for candidate in batch:
            motion = self.score(candidate)
            candidate.info["motion"] = motion
            if motion is not None and motion < self.min_motion:
                out.append(Dropped(candidate, "static"))
            elif motion is not None and motion > self.max_motion:
                out.append(Dropped(candidate, "chaotic motion"))
            else:
                out.append(candidate)
        return out


class AestheticFilter(Stage):
    """Drops "low aesthetic score" clips: a linear head on CLIP image embeddings (the LAION
    aesthetic predictor's form: score = w . e / |e| + b), averaged over `num_frames` frames.

    model: a local transformers CLIP folder (CLIPModel + its image processor); head: a
    .safetensors file with `weight` (1, d) and `bias` (1,) (default: `aesthetic_head.safetensors`
    inside the model folder). Optional: no preset runs it unless a settings file adds it.
    """

    name = "aesthetic"
    batch_size = 8

    def __init__(self, model: str | None = None, head: str | None = None, min_score: float = 4.5,
                 num_frames: int = 3) -> None:
        super().__init__()
        if not model:
            raise ValueError("the aesthetic stage needs model: a local CLIP folder (with a linear head file)")
        self.model_path, self.head_path, self.min_score, self.num_frames = model, head, min_score, num_frames

    def setup(self) -> None:
        import os

        import torch
        from safetensors.torch import load_file
        from transformers import CLIPModel

        from idcrafter.rewards.common import load_image_processor  # the PIL processor: no torchvision

        self.clip = CLIPModel.from_pretrained(self.model_path).to(self.device).eval()
        self.processor = load_image_processor(self.model_path)
        head = load_file(self.head_path or os.path.join(self.model_path, "aesthetic_head.safetensors"))
        self.weight = head["weight"].to(self.device, torch.float32).reshape(1, -1)
        self.bias = head["bias"].to(self.device, torch.float32).reshape(1)

    def score_frames(self, frames: list[np.ndarray]) -> np.ndarray:
        """A list of (H, W, 3) uint8 frames -> (n,) aesthetic scores."""
        import torch

        pixels = self.processor(images=list(frames), return_tensors="pt")["pixel_values"].to(self.device)
        with torch.no_grad():
            embeds = self.clip.get_image_features(pixel_values=pixels)
            if not isinstance(embeds, torch.Tensor):  # newer transformers return a model output
                embeds = embeds.pooler_output
            embeds = embeds.float() / embeds.float().norm(dim=-1, keepdim=True)
            return (embeds @ self.weight.T + self.bias).squeeze(-1).cpu().numpy()

    def process(self, batch: list[Candidate]) -> list[Outcome]:
        picks = [sample_evenly(len(c.frames), self.num_frames) for c in batch]
        scores = self.score_frames([c.frames[i] for c, idx in zip(batch, picks) for i in idx])
        out: list[Outcome] = []
        offset = 0
        for candidate, idx in zip(batch, picks):
            candidate.info["aesthetic"] = score = float(scores[offset:offset + len(idx)].mean())
            offset += len(idx)
            out.append(candidate if score >= self.min_score else Dropped(candidate, "low aesthetic score"))
        return out
