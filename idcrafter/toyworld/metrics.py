"""ToyID: identity similarity of generated toy videos to their references.

Per frame, sprites are found as connected regions that differ from the background (the frame's
border colour), embedded with the ToyID embedder, and matched to the references with the same
Hungarian code as the multi-ID face reward (`idcrafter.rewards.identity`); unmatched references
score 0. Per subject the frame scores are averaged; the video reports their mean and min.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from idcrafter.rewards.identity import combine_identity_scores, video_identity_scores
from idcrafter.toyworld.embedder import ToyIDEmbedder, crop_to_box


def background_colour(frame: np.ndarray) -> np.ndarray:
    """Median colour of the one-pixel border: uint8 [H, W, 3] -> [3]."""
    border = np.concatenate([frame[0], frame[-1], frame[:, 0], frame[:, -1]])
    return np.median(border, axis=0)


def detect_sprites(frame: np.ndarray, threshold: float = 40.0, min_area: int = 24, max_sprites: int = 6) -> list[np.ndarray]:
    """Foreground regions of a frame, largest first: uint8 [H, W, 3] -> list of bool [H, W]."""
    from scipy import ndimage

    distance = np.linalg.norm(frame.astype(np.float32) - background_colour(frame), axis=-1)
    foreground = ndimage.binary_opening(distance > threshold, iterations=1)
    labels, count = ndimage.label(foreground)
    if count == 0:
        return []
    areas = ndimage.sum(foreground, labels, index=np.arange(1, count + 1))
    order = np.argsort(-areas)
    return [labels == (i + 1) for i in order[:max_sprites] if areas[i] >= min_area]


class ToyIDScorer:
    """Scores videos against reference images with a trained `ToyIDEmbedder`."""

    def __init__(self, embedder: ToyIDEmbedder, device: str | torch.device = "cpu"):
        self.embedder = embedder.to(device).eval()
        self.device = torch.device(device)

    @torch.no_grad()
    def embed(self, crops: Sequence[np.ndarray]) -> torch.Tensor:
        if len(crops) == 0:
            return torch.zeros(0, self.embedder.dim)
        batch = torch.from_numpy(np.stack(crops)).to(self.device)
        return self.embedder(batch).cpu()

    def reference_embeddings(self, refs: Sequence[np.ndarray]) -> torch.Tensor:
        """Reference images uint8 [H, W, 3] (sprite on white) -> [R, D]."""
        crops = []
        for ref in refs:
            masks = detect_sprites(ref)
            crops.append(crop_to_box(ref, masks[0] if masks else None))
        return self.embed(crops)

    def frame_embeddings(self, frame: np.ndarray) -> torch.Tensor:
        return self.embed([crop_to_box(frame, m) for m in detect_sprites(frame)])

    def subject_scores(self, frames: np.ndarray, refs: Sequence[np.ndarray], stride: int = 1) -> np.ndarray:
        """ToyID per subject [R]: per-frame Hungarian matching, averaged over frames."""
        ref_emb = self.reference_embeddings(refs)
        dets = [self.frame_embeddings(f) for f in frames[::stride]]
        return video_identity_scores(ref_emb, dets).numpy()

    def score(self, frames: np.ndarray, refs: Sequence[np.ndarray], stride: int = 1) -> dict[str, float]:
        scores = self.subject_scores(frames, refs, stride)
        return {"toyid_mean": combine_identity_scores(scores, "mean"), "toyid_min": combine_identity_scores(scores, "min")}
