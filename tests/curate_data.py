"""Synthetic raw videos and a stand-in annotation stage for the curation tests.

`shot_frames` draws a textured square moving over a flat background, with a hard cut (new
background, new square) every `shot` frames; `Annotate` stands in for the detect / segment /
verify / references / caption stages: it finds the square by its distance to the background
colour, masks it in every frame, cuts its reference from a context frame and writes a prompt.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from idcrafter.curate.core import Candidate, Dropped, Stage, SubjectTrack
from idcrafter.utils.media import encode_video

BACKGROUNDS = [(200, 180, 160), (60, 90, 140), (150, 200, 120), (230, 230, 235)]


def shot_frames(num_frames: int = 48, shot: int = 24, size: int = 64, seed: int = 0, step: int = 1) -> np.ndarray:
    """(num_frames, size, size, 3) uint8: per shot a background and a 16 px checker-textured square
    moving right by `step` px a frame (so blur and motion have something to measure)."""
    rng = np.random.default_rng(seed)
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    for t in range(num_frames):
        s = t // shot
        if t % shot == 0:
            texture = (rng.integers(0, 2, (16, 16, 1)) * 160 + 40 + 20 * s).astype(np.uint8)
        frames[t] = BACKGROUNDS[s % len(BACKGROUNDS)]
        x = 4 + step * (t % shot)
        y = 12 + 8 * (s % 3)
        frames[t, y:y + 16, x:x + 16] = texture
    return frames


def write_raw(path: Path, frames: np.ndarray, fps: float = 8.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    encode_video(frames, path, fps)
    return path


def subject_mask(frame: np.ndarray, threshold: float = 40.0) -> np.ndarray:
    """(H, W) bool: pixels far from the frame's corner colour (the background)."""
    background = frame[0, 0].astype(np.float32)
    return np.abs(frame.astype(np.float32) - background).sum(-1) > threshold


def box_of(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return np.full(4, np.nan)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


class Annotate(Stage):
    """One subject per candidate, found by colour; reference = the subject on white from the first
    context frame; drops "no subject" and "no context frame". `delay` seconds per candidate (to
    stretch a run for the kill test)."""

    name = "annotate"

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay

    def process(self, batch: list[Candidate]):
        out = []
        for c in batch:
            time.sleep(self.delay)
            masks = np.stack([subject_mask(f) for f in c.frames])
            if not masks.any():
                out.append(Dropped(c, "no subject"))
                continue
            if not c.context:
                out.append(Dropped(c, "no context frame"))
                continue
            index = min(c.context)
            ref_frame = c.context[index]
            ref_mask = subject_mask(ref_frame)
            x0, y0, x1, y1 = box_of(ref_mask).astype(int)
            reference = np.where(ref_mask[..., None], ref_frame, 255)[y0:y1, x0:x1].astype(np.uint8)
            track = SubjectTrack(category="toy", boxes=np.stack([box_of(m) for m in masks]),
                                 scores=masks.any((1, 2)).astype(np.float32), masks=masks, reference=reference,
                                 reference_frame=index, descriptor="a checkered square")
            c.subjects = [track]
            c.prompt = "a checkered square moves to the right"
            out.append(c)
        return out
