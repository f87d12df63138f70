"""OpenS2V-Eval v1.1's Motion Smoothness: frames whose quality score jumps are counted as artifacts.

The benchmark's `eval/get_motion_smoothness.py` (OpenS2V-Nexus, Apache-2.0), re-implemented:

  1. every frame t of the video gets a window of `window` frames (default 3) centred on it
     (`sliding_windows`: clamped at the ends and padded by repeating the edge frame; a frame
     t < (window - 1) // 2 gets its window's first frame repeated `window` times);
  2. a quality model scores each window: the benchmark asks Q-Align (one-align, mPLUG-Owl2)
     "How would you rate the quality of this video?" with the window's frames padded to squares
     with the image mean, and reads the next-token logits of the five level words after "The
     quality of the video is": softmax over (excellent, good, fair, poor, bad), weighted by
     (1, 0.75, 0.5, 0.25, 0) -> a score in [0, 1] per frame;
  3. frames t and t + 1 are artifacts when |score[t + 1] - score[t]| > 0.025 (`artifact_frames`);
  4. smoothness = 1 - (number of artifact frames) / (number of frames).

The leaderboard (merge_result.py v1.1) clips it to [0, 1] and weighs it 0.06 (0.09 Human-Domain).

Q-Align's mPLUG-Owl2 has no transformers class and its code cannot be installed here, so step 2 runs
on a local Qwen2.5-VL (`QualityScorer`) with the same question, answer prefix, level words and
weights: the statistic and the threshold are the benchmark's, the quality model is substituted, so
the values are comparable in kind, not equal to Q-Align's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["ANSWER_PREFIX", "ARTIFACT_THRESHOLD", "LEVELS", "LEVEL_WEIGHTS", "QUALITY_QUESTION", "QualityScorer",
           "artifact_frames", "build_smoothness", "expand_to_square", "level_tokens", "motion_smoothness",
           "sliding_windows"]

QUALITY_QUESTION = "How would you rate the quality of this video?"
ANSWER_PREFIX = "The quality of the video is"
LEVELS = ("excellent", "good", "fair", "poor", "bad")
LEVEL_WEIGHTS = (1.0, 0.75, 0.5, 0.25, 0.0)
ARTIFACT_THRESHOLD = 0.025
WINDOW = 3  # get_motion_smoothness.py --window_size default


def sliding_windows(total: int, window: int = WINDOW) -> list[list[int]]:
    """Frame indices of each frame's window, as the benchmark builds them (one list of `window` per frame).

    The window spans [t - (window-1)//2, t + window-1-(window-1)//2], clamped to the video; a short
    window is padded by repeating its last index at the start of the video, else its first index. For
    t < (window-1)//2 the benchmark then replaces the window by its first frame repeated (a quirk kept:
    with window 3 the first frame's window is [0, 0, 0], not [0, 0, 1]).
    """
    if total < 1 or window < 1:
        raise ValueError(f"sliding_windows: total and window must be >= 1, got {total}, {window}")
    left = (window - 1) // 2
    right = window - 1 - left
    out = []
    for t in range(total):
        start, end = max(0, t - left), min(total, t + right + 1)
        idx = list(range(start, end))
        while len(idx) < window:
            if start == 0:
                idx.append(idx[-1])
            else:
                idx.insert(0, idx[0])
        out.append([idx[0]] * window if t < left else idx)
    return out


def artifact_frames(scores: Sequence[float], threshold: float = ARTIFACT_THRESHOLD) -> np.ndarray:
    """Indices t and t + 1 of every jump |s[t+1] - s[t]| > threshold, sorted and unique (int [K])."""
    jumps = np.where(np.abs(np.diff(np.asarray(scores, dtype=np.float64))) > threshold)[0]
    return np.unique(np.concatenate([jumps, jumps + 1])).astype(int)


def motion_smoothness(scores: Sequence[float], threshold: float = ARTIFACT_THRESHOLD) -> float:
    """1 - (artifact frames) / (frames) from per-frame quality scores."""
    if len(scores) == 0:
        raise ValueError("motion_smoothness: no scores")
    return 1.0 - len(artifact_frames(scores, threshold)) / len(scores)


def expand_to_square(image, fill: tuple[int, int, int]):
    """PIL image -> a square of side max(w, h), the image centred on `fill` (Q-Align's expand2square)."""
    from PIL import Image

    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), fill)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def level_tokens(tokenizer, levels: Sequence[str] = LEVELS) -> list[int]:
    """The token id that starts each level word after "... is": its first token with a leading space.

    Q-Align takes the second id of a LLaMA encoding (the first is BOS, and SentencePiece marks the
    word start); a byte-level BPE marks the space in the token itself, so " excellent" is encoded.
    """
    return [tokenizer(" " + word, add_special_tokens=False)["input_ids"][0] for word in levels]


class QualityScorer:
    """Per-window quality in [0, 1] from a local Qwen2.5-VL (substituting Q-Align; see the module doc).

    Args:
        path: a Qwen2.5-VL folder (`Qwen2_5_VLForConditionalGeneration` + its processor).
        window: frames per window (the benchmark's default 3).
        max_side: each frame is shrunk to at most this side (after squaring) before the processor.
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu", window: int = WINDOW, max_side: int = 448):
        import torch
        from transformers import Qwen2_5_VLForConditionalGeneration

        from idcrafter.rewards.natural import load_image_text_processor

        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            str(path), dtype=torch.float32, local_files_only=True).to(device).eval().requires_grad_(False)
        self.processor = load_image_text_processor(path)
        self.levels = level_tokens(self.processor.tokenizer)
        self.weights = torch.tensor(LEVEL_WEIGHTS, dtype=torch.float32)
        mean = getattr(self.processor.image_processor, "image_mean", (0.48145466, 0.4578275, 0.40821073))
        self.fill = tuple(int(x * 255) for x in mean)
        self.device, self.window, self.max_side = device, int(window), int(max_side)

    def prompt(self, count: int) -> str:
        """The chat text of one window: `count` images and the question, then the answer's prefix."""
        messages = [{"role": "user", "content": [*({"type": "image"} for _ in range(count)),
                                                 {"type": "text", "text": QUALITY_QUESTION}]}]
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text + ANSWER_PREFIX

    def images(self, frames: np.ndarray) -> list:
        """uint8 [W, H, W, 3] window frames -> squared PIL images no larger than max_side."""
        from PIL import Image

        from idcrafter.rewards.natural import fit_frame

        out = []
        for f in frames:
            square = np.asarray(expand_to_square(Image.fromarray(np.asarray(f, np.uint8)), self.fill))
            out.append(fit_frame(square, self.max_side))
        return out

    def window_score(self, frames: np.ndarray) -> float:
        """uint8 [window, H, W, 3] -> softmax over the level words' next-token logits . LEVEL_WEIGHTS."""
        import torch

        inputs = self.processor(text=[self.prompt(len(frames))], images=self.images(frames),
                                return_tensors="pt").to(self.device)
        with torch.no_grad():
            logits = self.model(**inputs).logits[0, -1, self.levels].float().cpu()
        return float(torch.softmax(logits, -1) @ self.weights)

    def __call__(self, frames: np.ndarray) -> float | None:
        """uint8 [F, H, W, 3] (every decoded frame) -> the video's Motion Smoothness; None for a still image."""
        frames = np.asarray(frames)
        if len(frames) < 2:
            return None
        scores = [self.window_score(frames[idx]) for idx in sliding_windows(len(frames), self.window)]
        return motion_smoothness(scores)


def build_smoothness(options: Mapping[str, object], device: str = "cpu"):
    """The Motion Smoothness column model (`idcrafter.eval.protocols`): options path=DIR, window=3."""
    scorer = QualityScorer(options["path"], device=device, window=int(options.get("window", WINDOW)))
    return lambda item, frames: {"motion_smoothness": scorer(frames)}
