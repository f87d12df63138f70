"""Prompts and item descriptors (docs/design.md 8.1, stage 8).

A captioner gives a candidate its full prompt and, per subject, an item descriptor: a short phrase
naming that subject which occurs verbatim in the prompt. The manifest stores the clean prompt and
each subject's descriptor (idcrafter.data.manifest checks the descriptor occurs in the prompt); the
same sample marked up as `<category>descriptor</category>` (`mark_descriptors`) is what One-for-All's
CCPA reads at inference (One-for-All Sec. 3.3; idcrafter.core.positions.parse_descriptor_markup).

- `QwenCaptioner`: Qwen2.5-VL from a local folder. Each subject's descriptor from its reference
  image (One-for-All App. B: references captioned into the "item prompt"), then the full prompt from
  sampled frames and the references, asked to contain the descriptors (MultiCrafter App. C: Qwen2.5-VL
  prompted with the reference images and the target); a descriptor the model left out is appended.
- `TemplateCaptioner`: no model; a prompt from categories, where each subject is and how it moves.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from idcrafter.curate.core import Candidate, Dropped, Outcome, Stage, SubjectTrack, make_backend

__all__ = ["CaptionStage", "QwenCaptioner", "TemplateCaptioner", "clean_text", "join_descriptors",
           "layout_words", "mark_descriptors", "subject_phrase"]

# How a category reads in a sentence (One-for-All's categories are garment slots).
CATEGORY_WORDS = {"upper": "upper garment", "lower": "lower garment", "upper_garment": "upper garment",
                  "lower_garment": "lower garment"}


def subject_phrase(category: str) -> str:
    """"dog" -> "a dog", "upper" -> "an upper garment"."""
    words = CATEGORY_WORDS.get(category, category.replace("_", " "))
    return f"{'an' if words[:1].lower() in 'aeiou' else 'a'} {words}"


def clean_text(text: str, max_words: int | None = None) -> str:
    """A model's answer as one plain line: first non-empty line, printable characters only, no
    quotes, no `<...>` tags (they would break descriptor markup), single spaces, at most `max_words`
    words, no trailing period."""
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    # Control characters and U+FFFD (bytes a tokenizer could not decode) are noise in a prompt.
    line = "".join(ch if ch.isprintable() and ch != "\ufffd" else " " for ch in line)
    line = re.sub(r"<[^>]*>|[<>\"`]", " ", line)
    words = line.split()
    if max_words is not None:
        words = words[:max_words]
    return " ".join(words).strip(" .,;:")


def join_descriptors(prompt: str, descriptors: Sequence[str | None]) -> str:
    """`prompt` with every descriptor not already in it appended (", with ..."), so each occurs verbatim."""
    missing = [d for d in descriptors if d and d not in prompt]
    if not missing:
        return prompt
    return f"{prompt.rstrip(' .')}, with {', '.join(missing)}" if prompt.strip() else ", ".join(missing)


def mark_descriptors(prompt: str, categories: Sequence[str], descriptors: Sequence[str | None]) -> str:
    """The prompt with each subject's descriptor wrapped as `<category>descriptor</category>` (its
    first occurrence), the markup `parse_descriptor_markup` turns back into (prompt, spans)."""
    spans = []
    for category, text in zip(categories, descriptors):
        if not text:
            continue
        start = prompt.find(text)
        if start < 0:
            raise ValueError(f"descriptor {text!r} does not occur in the prompt {prompt!r}")
        spans.append((start, start + len(text), category))
    spans.sort()
    for (_, end, _), (start, _, _) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"descriptors overlap in the prompt {prompt!r}; markup cannot nest")
    out, last = [], 0
    for start, end, category in spans:
        out += [prompt[last:start], f"<{category}>", prompt[start:end], f"</{category}>"]
        last = end
    return "".join(out) + prompt[last:]


# ---------------------------------------------------------------------------- layout words
def layout_words(track: SubjectTrack, height: int, width: int) -> tuple[str, str]:
    """(where, how it moves) of a subject from its boxes: "on the left" / "in the center" / "on the
    right" by its mean box centre in thirds of the frame; "moving right" etc. when its centre travels
    more than a tenth of the frame between its first and last frames, "coming closer" / "moving
    away" when its box area changes by more than half, else "staying still"."""
    boxes = track.boxes[track.present()]
    if len(boxes) == 0:
        return "", ""
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    x = cx.mean() / width
    where = "on the left" if x < 1 / 3 else "on the right" if x > 2 / 3 else "in the center"
    dx, dy = (cx[-1] - cx[0]) / width, (cy[-1] - cy[0]) / height
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    growth = areas[-1] / max(areas[0], 1e-6)
    if max(abs(dx), abs(dy)) > 0.1:
        how = ("moving right" if dx > 0 else "moving left") if abs(dx) >= abs(dy) else ("moving down" if dy > 0 else "moving up")
    elif growth > 1.5:
        how = "coming closer"
    elif growth < 1 / 1.5:
        how = "moving away"
    else:
        how = "staying still"
    return where, how


class TemplateCaptioner:
    """A prompt without a model: "a video of a person on the left, moving right, and a dog in the
    center, staying still"; a one-frame candidate (an image sample) is "a photo of ..." without
    motion. Each subject's descriptor is its phrase ("a person on the left"), which names it in the
    prompt; two subjects with one phrase are told apart by "another"."""

    def __init__(self, device: str = "cpu", opening: str | None = None) -> None:
        self.opening = opening

    def caption(self, candidate: Candidate) -> tuple[str, list[str | None]]:
        height, width = candidate.size
        still = candidate.frames is not None and len(candidate.frames) == 1
        opening = self.opening or ("a photo of" if still else "a video of")
        parts, descriptors = [], []
        for track in candidate.subjects:
            where, how = layout_words(track, height, width)
            how = "" if still else how
            phrase = " ".join(w for w in (subject_phrase(track.category), where) if w)
            while any(phrase in d for d in descriptors):
                phrase = "another " + phrase.split(" ", 1)[1]
            descriptors.append(phrase)
            parts.append(f"{phrase}, {how}" if how else phrase)
        body = " and ".join(parts) if len(parts) < 3 else ", ".join(parts[:-1]) + ", and " + parts[-1]
        return f"{opening} {body}".strip() if parts else "", descriptors


# ---------------------------------------------------------------------------- Qwen2.5-VL
DESCRIPTOR_INSTRUCTION = ("Describe the {category} in this image in a short phrase of at most {words} words, "
                          "for example 'a red knit sweater'. Answer with the phrase only.")
PROMPT_INSTRUCTION = ("The first {frames} images are frames of one video; the others show its subjects. "
                      "Describe the video in one detailed sentence: the subjects, what they do and the scene.")
IMAGE_INSTRUCTION = ("The first image is a photo; the others show its subjects. "
                     "Describe the photo in one detailed sentence: the subjects, what they do and the scene.")
INCLUDE_INSTRUCTION = " Use these phrases word for word: {phrases}."


def _sample_frames(frames: np.ndarray, count: int) -> np.ndarray:
    """`count` frames spread evenly over the clip (first and last included)."""
    idx = np.unique(np.linspace(0, len(frames) - 1, max(1, min(count, len(frames)))).round().astype(int))
    return frames[idx]


def _subject_image(candidate: Candidate, track: SubjectTrack) -> np.ndarray | None:
    """The subject's reference, or (before the reference stage ran) its box cut from its best frame."""
    if track.reference is not None:
        return track.reference
    present = np.flatnonzero(track.present())
    if candidate.frames is None or len(present) == 0:
        return None
    t = int(present[np.argmax(track.scores[present])])
    x0, y0, x1, y1 = np.round(track.boxes[t]).astype(int)
    crop = candidate.frames[t, max(0, y0):max(y0 + 1, y1), max(0, x0):max(x0 + 1, x1)]
    return crop if crop.size else None


class QwenCaptioner:
    """Full prompts and item descriptors from Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) in a
    local folder. Greedy decoding, so a caption depends on the pixels only; conversations of a batch
    are generated together with left padding.

    Args:
        model: folder saved with `save_pretrained` (model, tokenizer, image processor, chat template).
        frames: frames sampled evenly from the clip for the full prompt.
        max_image_side: images are resized to at most this side, in multiples of 28 (vision tokens).
        descriptors: ask for one descriptor per subject (One-for-All); off, descriptors are None.
        prompt_tokens / descriptor_words: length limits of the answers.
    """

    def __init__(self, model: str | None = None, device: str = "cpu", frames: int = 3, max_image_side: int = 448,
                 descriptors: bool = True, prompt_tokens: int = 96, descriptor_words: int = 8,
                 dtype: str | None = None) -> None:
        if not model:
            raise ValueError("the qwen2.5-vl captioner needs model: a local Qwen2.5-VL folder (backends.captioner.model)")
        self.path = Path(model)
        self.device = device
        self.frames = int(frames)
        self.max_image_side = int(max_image_side)
        self.descriptors = bool(descriptors)
        self.prompt_tokens = int(prompt_tokens)
        self.descriptor_words = int(descriptor_words)
        self.dtype = dtype
        self.model = self.processor = None

    def load(self) -> None:
        if self.model is not None:
            return
        from transformers import Qwen2_5_VLForConditionalGeneration

        from idcrafter.curate.core import load_local_model
        from idcrafter.rewards.natural import load_image_text_processor

        self.model = load_local_model(Qwen2_5_VLForConditionalGeneration, self.path, "Qwen2.5-VL", self.dtype, self.device)
        self.processor = load_image_text_processor(self.path)  # without the video processor (needs torchvision)
        self.processor.tokenizer.padding_side = "left"  # generation continues every row from its last token

    def generate(self, conversations: Sequence[tuple[Sequence[np.ndarray], str]], max_new_tokens: int) -> list[str]:
        """(images, text) user turns -> the model's greedy answers, generated as one batch."""
        import torch

        from idcrafter.rewards.natural import fit_frame

        self.load()
        if not conversations:
            return []
        texts, images = [], []
        for pictures, text in conversations:
            content = [{"type": "image"} for _ in pictures] + [{"type": "text", "text": text}]
            texts.append(self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                            add_generation_prompt=True))
            images += [fit_frame(p, self.max_image_side) for p in pictures]  # sides in multiples of 28
        inputs = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=self.processor.tokenizer.pad_token_id)
        return self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    def describe(self, subjects: Sequence[tuple[np.ndarray | None, str]]) -> list[str | None]:
        """(image, category) per subject -> its descriptor (None without an image or an answer)."""
        asks = [(image, category) for image, category in subjects if image is not None]
        text = [DESCRIPTOR_INSTRUCTION.format(category=CATEGORY_WORDS.get(c, c), words=self.descriptor_words)
                for _, c in asks]
        answers = iter(self.generate([([image], t) for (image, _), t in zip(asks, text)],
                                     max_new_tokens=4 * self.descriptor_words))
        return [clean_text(next(answers), self.descriptor_words) or None if image is not None else None
                for image, _ in subjects]

    def caption_batch(self, candidates: Sequence[Candidate]) -> list[tuple[str, list[str | None]]]:
        """Per candidate (prompt, descriptors); every descriptor occurs verbatim in its prompt. The
        descriptors of the whole batch are one generate call, the prompts another."""
        images = [[_subject_image(c, t) for t in c.subjects] for c in candidates]
        descriptors: list[list[str | None]] = [[None] * len(c.subjects) for c in candidates]
        if self.descriptors:
            flat = iter(self.describe([(im, t.category) for c, ims in zip(candidates, images)
                                       for t, im in zip(c.subjects, ims)]))
            descriptors = [[next(flat) for _ in c.subjects] for c in candidates]
        conversations = []
        for cand, ims, texts in zip(candidates, images, descriptors):
            frames = list(_sample_frames(cand.frames, self.frames)) if cand.frames is not None else []
            text = IMAGE_INSTRUCTION if len(frames) == 1 else PROMPT_INSTRUCTION.format(frames=len(frames))
            if any(texts):
                text += INCLUDE_INSTRUCTION.format(phrases="; ".join(f"'{d}'" for d in texts if d))
            conversations.append((frames + [im for im in ims if im is not None], text))
        prompts = self.generate(conversations, max_new_tokens=self.prompt_tokens)
        return [(join_descriptors(clean_text(p), texts), texts) for p, texts in zip(prompts, descriptors)]

    def caption(self, candidate: Candidate) -> tuple[str, list[str | None]]:
        return self.caption_batch([candidate])[0]


# ---------------------------------------------------------------------------- stage
class CaptionStage(Stage):
    """Sets each candidate's prompt and its subjects' descriptors; drops empty captions.

    Args:
        captioner: a BACKENDS["captioner"] name, or an object with `caption(candidate)` (and
            optionally `caption_batch(candidates)`, used for whole batches).
        captioner_options: keyword options of the backend; `device` is the stage's.
        descriptors: keep the captioner's item descriptors (One-for-All's "item prompt"); off, the
            subjects get none, and a captioner with a `descriptors` switch is told not to make them.

    The marked-up prompt (`mark_descriptors`) goes to `candidate.info["marked_prompt"]` when the
    subjects' categories are distinct (CCPA allows one descriptor per category).
    """

    name = "caption"

    def __init__(self, captioner: Any = "template", captioner_options: Mapping[str, Any] | None = None,
                 descriptors: bool = False, batch_size: int = 4) -> None:
        super().__init__()
        self.descriptors = bool(descriptors)
        self.captioner = captioner
        self.captioner_options = dict(captioner_options or {})
        self.batch_size = int(batch_size)

    def setup(self) -> None:
        if isinstance(self.captioner, str):
            self.captioner = make_backend("captioner", self.captioner, device=self.device, **self.captioner_options)
        if isinstance(getattr(self.captioner, "descriptors", None), bool):
            self.captioner.descriptors = self.descriptors  # no model call for descriptors nobody keeps

    def process(self, batch: list[Candidate]) -> list[Outcome]:
        if hasattr(self.captioner, "caption_batch"):
            captions = self.captioner.caption_batch(batch)
        else:
            captions = [self.captioner.caption(c) for c in batch]
        results: list[Outcome] = []
        for cand, (prompt, descriptors) in zip(batch, captions):
            prompt = (prompt or "").strip()
            if not prompt:
                results.append(Dropped(cand, "empty caption"))
                continue
            descriptors = list(descriptors) + [None] * (len(cand.subjects) - len(descriptors))
            if not self.descriptors:
                descriptors = [None] * len(cand.subjects)
            if any(d and d not in prompt for d in descriptors):
                results.append(Dropped(cand, "descriptor not in prompt"))
                continue
            cand.prompt = prompt
            for track, text in zip(cand.subjects, descriptors):
                track.descriptor = text or None
            categories = [t.category for t in cand.subjects]
            if len(set(categories)) == len(categories) and any(descriptors):
                try:
                    cand.info["marked_prompt"] = mark_descriptors(prompt, categories, descriptors)
                except ValueError:  # overlapping descriptors: the manifest keeps them, CCPA markup cannot
                    cand.info["marked_prompt"] = None
            results.append(cand)
        return results
