"""NaturalScore (docs/design.md 7): a VLM rates the physical plausibility of a video, 1-5,
normalised to [0, 1].

    answer = Qwen2.5-VL(sampled frames as images + NATURAL_QUESTION), greedy, a few tokens
    rating = the first standalone digit 1-5 in the answer ("4", "Rating: 4/5", "I'd say 4.")
    score  = (rating - 1) / 4;   no rating in the answer -> NEUTRAL_SCORE (0.5, a rating of 3) and a
             counted warning, so an unparsable answer neither rewards nor punishes a sample.

The frames go in as separate images, in order: the Qwen video path needs torchvision's video
processor, which this package does not require.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from idcrafter.rewards.base import RewardModel, register_reward
from idcrafter.rewards.common import check_frame_options, model_dtype, require_path, sample_frames

__all__ = ["NATURAL_QUESTION", "NEUTRAL_SCORE", "NaturalReward", "fit_frame", "load_image_text_processor", "natural_messages", "parse_rating",
           "rating_to_score"]

NATURAL_QUESTION = (
    "These {count} images are frames of one video, in order. Rate how physically plausible the video is: "
    "do people and objects keep their shape and size, move continuously, touch and support each other as "
    "real ones would, with no melting, merging, vanishing, duplicated limbs or impossible motion? "
    "Answer with a single digit: 1 = physically impossible, 2 = mostly implausible, 3 = some visible "
    "errors, 4 = minor errors, 5 = fully plausible."
)
NEUTRAL_SCORE = 0.5

# A digit 1-5 that is not part of a longer number ("10", "25" and "3.5"'s "5" do not count; "3" of "3.5" does).
_RATING = re.compile(r"(?<![\d.])([1-5])(?!\d)")


def parse_rating(answer: str) -> int | None:
    """The first standalone digit 1-5 in a VLM answer, None when there is none."""
    match = _RATING.search(answer or "")
    return int(match.group(1)) if match else None


def rating_to_score(rating: int | None) -> float:
    """1..5 -> (rating - 1) / 4 in [0, 1]; None -> NEUTRAL_SCORE."""
    return NEUTRAL_SCORE if rating is None else (rating - 1) / 4.0


def fit_frame(frame: np.ndarray, max_side: int = 448, multiple: int = 28) -> Image.Image:
    """RGB uint8 [H, W, 3] -> PIL image with the longer side <= max_side and both sides multiples of 28
    (Qwen's patch 14 x merge 2), so the processor's own resize changes nothing."""
    image = Image.fromarray(np.asarray(frame, np.uint8))
    scale = min(1.0, max_side / max(image.size))
    limit = max(multiple, max_side // multiple * multiple)
    size = tuple(int(max(multiple, min(limit, round(s * scale / multiple) * multiple))) for s in image.size)
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)


def natural_messages(count: int, question: str = NATURAL_QUESTION) -> list[dict]:
    """The chat: one user turn with `count` images, then the rubric question."""
    content = [{"type": "image"} for _ in range(count)]
    content.append({"type": "text", "text": question.format(count=count)})
    return [{"role": "user", "content": content}]


def load_image_text_processor(path: str | os.PathLike):
    """A stock Qwen2.5-VL folder's processor without its video processor, which needs torchvision in
    transformers 5 (the same idea as idcrafter.video.vlm's, which rewards may not import)."""
    from transformers import Qwen2_5_VLProcessor

    class ImageTextProcessor(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
                             **kwargs)

    return ImageTextProcessor.from_pretrained(str(path), local_files_only=True)


@register_reward("natural")
class NaturalReward(RewardModel):
    """NaturalScore with Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration` from a local folder).

    Options: path, device, dtype, stride, max_frames (frames shown to the VLM, 4), max_side (448),
    max_new_tokens (8), question (must contain "{count}"). The last answers are kept in
    `last_answers` for logging.
    """

    name = "natural"

    def __init__(self, path: str | os.PathLike | None = None, device: str | torch.device = "cpu", dtype=None,
                 stride: int = 1, max_frames: int | None = 4, max_side: int = 448, max_new_tokens: int = 8,
                 question: str = NATURAL_QUESTION):
        super().__init__(device)
        self.path: Path = require_path(self.name, path, "a local Qwen2.5-VL folder saved with save_pretrained")
        self.dtype = model_dtype(dtype)
        self.stride, self.max_frames = check_frame_options(self.name, stride, max_frames)
        if "{count}" not in question:
            raise ValueError("reward 'natural': question must contain '{count}' (the number of frames)")
        self.max_side, self.max_new_tokens, self.question = int(max_side), int(max_new_tokens), question
        self.model = self.processor = None
        self.last_answers: list[str] = []

    def load(self) -> NaturalReward:
        if self.model is None:
            from transformers import Qwen2_5_VLForConditionalGeneration

            self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                str(self.path), dtype=self.dtype, local_files_only=True)
            self.model = self.model.to(self.device).eval().requires_grad_(False)
            self.processor = load_image_text_processor(self.path)
        return self

    @torch.no_grad()
    def ask(self, video: np.ndarray) -> str:
        """The VLM's answer (new tokens only, special tokens dropped) for one video uint8 [F, H, W, 3]."""
        self.load()
        frames = [fit_frame(f, self.max_side) for f in sample_frames(video, self.stride, self.max_frames)]
        text = self.processor.apply_chat_template(natural_messages(len(frames), self.question), tokenize=False,
                                                  add_generation_prompt=True)
        inputs = self.processor(text=[text], images=frames, return_tensors="pt").to(self.device)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]

    def score(self, samples, prompts, refs, meta, warnings):
        self.last_answers = [self.ask(video) for video in samples]
        ratings = [parse_rating(a) for a in self.last_answers]
        missing = sum(r is None for r in ratings)
        if missing:
            warnings["no rating 1-5 in the VLM answer"] += missing
        return [rating_to_score(r) for r in ratings]
