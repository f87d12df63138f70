"""OpenS2V-Eval's NaturalScore with a local VLM (`eval/get_naturalscore.py` of OpenS2V-Nexus, re-implemented).

The benchmark asks GPT-4o (`gpt-4o-2024-11-20`, through the OpenAI chat API) to rate how real a video
looks, 1-5. GPT-4o cannot run here; a local Qwen2.5-VL (or Qwen2-VL) folder loaded with transformers
takes its place, and everything around the model is the benchmark's:

  1. frames i * max(F // 16, 1) for i < 16, those inside the video (`natural_frame_indices`);
  2. each resized with OpenCV INTER_AREA so its long side is 512 (`natural_frame_size`), then
     JPEG-encoded by `cv2.imencode(".jpg")` (OpenCV's default quality, 95) as the benchmark sends
     them; the VLM sees the decoded JPEGs, compression artefacts included;
  3. one user message: the 16 images, then the benchmark's prompt (`NATURAL_PROMPT`, verbatim);
  4. the reply, stripped, is parsed by `parse_natural_score`; three repeats (naturalscore_1..3.json)
     are averaged by `natural_score`.

Generation follows the benchmark's call, which sets neither temperature nor a token limit: the API's
defaults are temperature 1 and top_p 1, so the repeats are samples, each seeded (seed + repeat) so a
run is reproducible and the repeats differ. The VLM folder's own generation defaults (Qwen's
top_k 1, top_p 0.001, repetition penalty 1.05) are overridden to plain sampling at that temperature.
`temperature=0` gives greedy decoding (the three repeats are then equal). The reply is capped at
`max_new_tokens` (32: the prompt asks for the bare score).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from idcrafter.eval.opens2v import (
    NATURAL_FRAMES,
    NATURAL_LONG_SIDE,
    NATURAL_PROMPT,
    NATURAL_REPEATS,
    natural_frame_indices,
    natural_frame_size,
    natural_score,
)

__all__ = ["NATURAL_MAX_NEW_TOKENS", "NATURAL_TEMPERATURE", "NaturalScorer", "build_naturalscore", "jpeg_roundtrip",
           "natural_frames", "natural_messages"]

NATURAL_TEMPERATURE = 1.0  # the OpenAI chat API's default; get_naturalscore.py sets none
NATURAL_MAX_NEW_TOKENS = 32
JPEG_QUALITY = 95  # cv2.imencode's default (IMWRITE_JPEG_QUALITY)

# config.model_type -> (model class, processor class) in transformers.
_VLMS = {
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
}


def _cv2():
    from idcrafter.utils.deps import require

    return require("cv2")


def jpeg_roundtrip(frame_rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> the same frame after the benchmark's JPEG encoding (cv2.imencode on the BGR
    frame, quality 95) and decoding, uint8 RGB [H, W, 3]."""
    cv2 = _cv2()
    ok, buffer = cv2.imencode(".jpg", np.ascontiguousarray(frame_rgb[..., ::-1]),
                              [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError(f"NaturalScore: OpenCV could not JPEG-encode a frame of shape {frame_rgb.shape}")
    return np.ascontiguousarray(cv2.imdecode(buffer, cv2.IMREAD_COLOR)[..., ::-1])


def natural_frames(frames: np.ndarray, count: int = NATURAL_FRAMES, long_side: int = NATURAL_LONG_SIDE,
                   jpeg: bool = True) -> list[np.ndarray]:
    """The images the rater sees: uint8 [F, H, W, 3] (every decoded frame) -> up to `count` uint8
    [h, w, 3] frames, long side `long_side` (INTER_AREA), JPEG round-tripped (steps 1-2 of the module doc)."""
    cv2 = _cv2()
    frames = np.asarray(frames)
    out = []
    for i in natural_frame_indices(len(frames), count):
        h, w = natural_frame_size(*frames[i].shape[:2], long_side)
        small = cv2.resize(np.ascontiguousarray(frames[i]), (w, h), interpolation=cv2.INTER_AREA)
        out.append(jpeg_roundtrip(small) if jpeg else small)
    return out


def natural_messages(count: int, prompt: str = NATURAL_PROMPT) -> list[dict]:
    """The benchmark's chat: one user turn holding `count` images, then the prompt (its content order)."""
    content: list[dict] = [{"type": "image"} for _ in range(count)]
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def _vlm_classes(path: Path):
    """(model class, processor class without a video processor) of a local Qwen2.5-VL / Qwen2-VL folder."""
    import json

    import transformers

    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"naturalscore.path {path}: no config.json (a transformers VLM folder saved with "
                                "save_pretrained)")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type not in _VLMS:
        raise ValueError(f"naturalscore.path {path}: model_type {model_type!r} is not a supported VLM; "
                         f"known: {', '.join(_VLMS)}")
    model_name, processor_name = _VLMS[model_type]
    stock = getattr(transformers, processor_name)

    # transformers 5's video processors need torchvision: the processor is built from its two other parts.
    class ImageTextProcessor(stock):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
                             **kwargs)

    return getattr(transformers, model_name), ImageTextProcessor


class NaturalScorer:
    """NaturalScore of one video with a local VLM standing in for GPT-4o (module doc).

    Args:
        path: a transformers Qwen2.5-VL or Qwen2-VL folder.
        temperature: sampling temperature of every repeat (1, the API default); 0 = greedy.
        repeats: replies averaged per video (3, as the benchmark).
        max_new_tokens: reply length cap.
        seed: repeat r samples with torch.manual_seed(seed + r) (the global RNG is restored afterwards).
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu", dtype: str | None = None,
                 temperature: float = NATURAL_TEMPERATURE, repeats: int = NATURAL_REPEATS,
                 max_new_tokens: int = NATURAL_MAX_NEW_TOKENS, seed: int = 0):
        import torch

        from idcrafter.rewards.common import model_dtype

        if float(temperature) < 0 or int(repeats) < 1 or int(max_new_tokens) < 1:
            raise ValueError(f"naturalscore: temperature must be >= 0, repeats and max_new_tokens >= 1; got "
                             f"{temperature}, {repeats}, {max_new_tokens}")
        self.path = Path(path)
        model_cls, processor_cls = _vlm_classes(self.path)
        self.model = model_cls.from_pretrained(str(self.path), dtype=model_dtype(dtype), local_files_only=True)
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.processor = processor_cls.from_pretrained(str(self.path), local_files_only=True)
        self.device = torch.device(device)
        self.temperature, self.repeats = float(temperature), int(repeats)
        self.max_new_tokens, self.seed = int(max_new_tokens), int(seed)
        self.last_replies: list[str] = []

    def model_inputs(self, frames: np.ndarray):
        """uint8 [F, H, W, 3] -> (messages, images shown: uint8 [h, w, 3] each, the processor's tensors)."""
        from PIL import Image

        images = natural_frames(frames)
        messages = natural_messages(len(images))
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = self.processor(text=[text], images=[Image.fromarray(f) for f in images], return_tensors="pt")
        return messages, images, inputs.to(self.device)

    def generation_config(self):
        """The VLM's generation config with the benchmark call's sampling (module doc)."""
        config = copy.deepcopy(self.model.generation_config)
        if self.temperature > 0:
            config.update(do_sample=True, temperature=self.temperature, top_p=1.0, top_k=0, repetition_penalty=1.0,
                          max_new_tokens=self.max_new_tokens)
        else:
            config.update(do_sample=False, temperature=None, top_p=None, top_k=None, repetition_penalty=1.0,
                          max_new_tokens=self.max_new_tokens)
        return config

    def replies(self, frames: np.ndarray) -> list[str]:
        """The VLM's `repeats` stripped replies (new tokens, special tokens dropped) for one video."""
        import torch

        _, _, inputs = self.model_inputs(frames)
        config = self.generation_config()
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        out = []
        for r in range(self.repeats):
            with torch.no_grad(), torch.random.fork_rng(devices=cuda):
                torch.manual_seed(self.seed + r)
                ids = self.model.generate(**inputs, generation_config=config)
            new = ids[:, inputs["input_ids"].shape[1]:]
            out.append(self.processor.batch_decode(new, skip_special_tokens=True)[0].strip())
        return out

    def __call__(self, frames: np.ndarray) -> float | None:
        """uint8 [F, H, W, 3] -> the mean parsed score of the repeats (None when no reply holds one)."""
        self.last_replies = self.replies(frames)
        return natural_score(self.last_replies)


def build_naturalscore(options: Mapping[str, object], device: str = "cpu"):
    """The NaturalScore column model (`idcrafter.eval.protocols`): options path=DIR, and temperature,
    repeats, max_new_tokens, seed, dtype."""
    known = {"path", "temperature", "repeats", "max_new_tokens", "seed", "dtype"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"naturalscore: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    kwargs = {k: v for k, v in options.items() if k != "path"}
    scorer = NaturalScorer(str(options["path"]), device=device, **kwargs)
    return lambda item, frames: {"naturalscore": scorer(frames)}
