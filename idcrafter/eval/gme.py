"""GME-Qwen2-VL embeddings, OpenS2V-Eval's GmeScore, and One-for-All's GME-I / GME-T.

GME (Zhang et al. 2024, "GME: Improving Universal Multimodal Retrieval by Multimodal LLMs") embeds
text, images or both with Qwen2-VL: the input goes through Qwen2-VL's chat template, and the
embedding is the language model's last hidden state at the last token, L2-normalised.
`GmeEmbedder` re-implements the benchmark's copy of GME's inference code (OpenS2V-Nexus,
`eval/utils/gme/gme_model.py`, Apache-2.0) on transformers' Qwen2-VL classes from a local folder:

  1. each image is opened as RGB and resized (PIL bicubic, Pillow's default) to `smart_resize(h, w)`
     with factor 28 and [4, 16384] x 28^2 pixels (`fetch_image`), then given to the Qwen2-VL image
     processor set to [256, 1280] x 28^2 pixels (min_image_tokens / max_image_tokens);
  2. each input is one prompt (`gme_prompt`):
         <|im_start|>system\\n{instruction}<|im_end|>\\n<|im_start|>user\\n
         [<|vision_start|><|image_pad|><|vision_end|>]{text}<|im_end|>\\n<|im_start|>assistant\\n<|endoftext|>
     instruction = the query's instruction for text queries, else "You are a helpful assistant.";
     tokenised in batches of 32 with padding, truncated at 1800 tokens;
  3. the token embeddings, with the vision tower's merged patch features written into the
     <|image_pad|> positions, go through the language model alone with plain positions 0..L-1 on
     all three rotary sections (the benchmark calls `base.model` with position_ids None, which in
     the transformers it ran numbers tokens sequentially; Qwen2-VL's own forward would use its 3-D
     image positions instead, which gives other embeddings);
  4. the hidden state of the last non-padding token, L2-normalised, is the embedding.

The benchmark's scripts load the model with flash-attention and pad on the left, taking the last
position; we pad on the right and take the last real token: with causal attention and rotary
positions (relative), the vector is the same.

GmeScore (`get_gmescore.py`): 32 frames evenly spaced over the video (`sample_indices`); the
prompt embedded as a query with "Find an image that matches the given text."; each frame embedded
as an image; the score is the mean over frames of the dot product (cosine: both are unit vectors).

One-for-All (App. D) defines GME-T as "the prompt following between the generated image and the
full prompt, based on GME" and GME-I as "the average subject consistency between the generated and
the reference subjects, based on GME and GroundingDINO" (`OneForAllGmeScorer` says what we chose
where the paper says no more).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DEFAULT_INSTRUCTION",
    "GMESCORE_FRAMES",
    "GmeEmbedder",
    "OneForAllGmeScorer",
    "QUERY_INSTRUCTION",
    "build_gmescore",
    "build_one_for_all",
    "embedder_from_options",
    "fetch_image",
    "gme_prompt",
    "gmescore",
    "smart_resize",
]

DEFAULT_INSTRUCTION = "You are a helpful assistant."  # gme_model.py: corpus side and queries without one
QUERY_INSTRUCTION = "Find an image that matches the given text."  # get_gmescore.py / get_nexusscore.py
GMESCORE_FRAMES = 32  # get_gmescore.py --num_frames default
MIN_IMAGE_TOKENS, MAX_IMAGE_TOKENS = 256, 1280  # GmeQwen2VL defaults -> the processor's min / max pixels
MAX_LENGTH = 1800  # GmeQwen2VL max_length (tokens)
BATCH_SIZE = 32  # get_fused_embeddings' default batch
# fetch_image's own resize, before the processor's: factor 28, [4, 16384] x 28^2 pixels, ratio <= 200.
IMAGE_FACTOR, FETCH_MIN_PIXELS, FETCH_MAX_PIXELS, MAX_RATIO = 28, 4 * 28 * 28, 16384 * 28 * 28, 200
VISION_TOKENS = "<|vision_start|><|image_pad|><|vision_end|>"


def smart_resize(height: int, width: int, factor: int = IMAGE_FACTOR, min_pixels: int = FETCH_MIN_PIXELS,
                 max_pixels: int = FETCH_MAX_PIXELS) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor`, scaled into [min_pixels, max_pixels] keeping the
    aspect ratio (Qwen2-VL's rule, as gme_model.py writes it: round, then floor when too large, ceil when
    too small; an aspect ratio above 200 is cut to 200)."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if max(h_bar, w_bar) / min(h_bar, w_bar) > MAX_RATIO:
        if h_bar > w_bar:
            h_bar = w_bar * MAX_RATIO
        else:
            w_bar = h_bar * MAX_RATIO
    return h_bar, w_bar


def fetch_image(image):
    """uint8 [H, W, 3] or a PIL image -> the RGB PIL image gme_model.py's `fetch_image` hands the processor:
    resized to `smart_resize(H, W)` with PIL's bicubic filter (its `resize` default for RGB)."""
    from PIL import Image

    image = (image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))).convert("RGB")
    height, width = smart_resize(image.height, image.width)
    return image.resize((width, height), Image.BICUBIC)


def gme_prompt(text: str | None = None, image: bool = False, instruction: str | None = None) -> str:
    """The chat prompt of one GME input (module doc, step 2): the vision tokens when it has an image, then
    the text; `instruction` None -> the default system instruction."""
    content = (VISION_TOKENS if image else "") + (text if text is not None else "")
    return (f"<|im_start|>system\n{instruction or DEFAULT_INSTRUCTION}<|im_end|>\n<|im_start|>user\n{content}"
            "<|im_end|>\n<|im_start|>assistant\n<|endoftext|>")


def _processor_class():
    from transformers import Qwen2VLProcessor

    class Qwen2VLImageTextProcessor(Qwen2VLProcessor):
        """`Qwen2VLProcessor` without its video processor: in transformers 5 every video processor needs
        torchvision and the stock class refuses to build without one; GME feeds only images and text."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
                             **kwargs)

    return Qwen2VLImageTextProcessor


class GmeEmbedder:
    """GME-Qwen2-VL from a local folder (a Qwen2-VL checkpoint and its processor, e.g.
    Alibaba-NLP/gme-Qwen2-VL-7B-Instruct); see the module doc for the computation.

    Args:
        path: the model folder (nothing is downloaded).
        dtype: the model's dtype (None: float32; the benchmark runs float16 on a GPU).
        batch_size: inputs per forward (the benchmark's 32; padding does not change the result).
        min_image_tokens, max_image_tokens: the image size range in 28 x 28 tiles (GmeQwen2VL's 256, 1280).
    """

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu", dtype=None,
                 batch_size: int = BATCH_SIZE, min_image_tokens: int = MIN_IMAGE_TOKENS,
                 max_image_tokens: int = MAX_IMAGE_TOKENS):
        from transformers import AutoModelForImageTextToText

        from idcrafter.rewards.common import model_dtype

        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"GME folder {str(path)!r} has no config.json (models are never downloaded)")
        self.device, self.dtype = torch.device(device), model_dtype(dtype)
        self.model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=self.dtype, local_files_only=True)
        self.model = self.model.to(self.device).eval().requires_grad_(False)
        self.processor = _processor_class().from_pretrained(str(path), local_files_only=True)
        # GmeQwen2VL passes tokens x 28^2 as min / max pixels to the processor; set them on its image processor.
        self.processor.image_processor.size = {"shortest_edge": int(min_image_tokens) * 28 * 28,
                                               "longest_edge": int(max_image_tokens) * 28 * 28}
        self.processor.tokenizer.padding_side = "right"
        self.batch_size = int(batch_size)
        self.image_token_id = int(self.model.config.image_token_id)

    def _parts(self):
        """(token embedding layer, vision tower, language model) in the transformers 5 layout
        (Qwen2VLForConditionalGeneration.model.{visual, language_model})."""
        inner = self.model.model
        return inner.language_model.embed_tokens, inner.visual, inner.language_model

    @torch.no_grad()
    def _forward(self, prompts: list[str], images: list | None) -> torch.Tensor:
        """One batch of prompts (and one image per prompt, or None) -> unit float32 [N, D] on the CPU."""
        inputs = self.processor(text=prompts, images=images, padding=True, truncation=True, max_length=MAX_LENGTH,
                                return_tensors="pt")
        ids = inputs["input_ids"].to(self.device)
        mask = inputs["attention_mask"].to(self.device)
        embed_tokens, visual, language_model = self._parts()
        embeds = embed_tokens(ids)
        if images is not None:
            pixels = inputs["pixel_values"].to(self.device, visual.dtype)
            out = visual(pixels, grid_thw=inputs["image_grid_thw"].to(self.device))
            merged = out.pooler_output if hasattr(out, "pooler_output") else out  # transformers 5: a model output
            embeds = embeds.clone()
            embeds[ids == self.image_token_id] = merged.to(embeds.dtype)
        # Positions 0..L-1 on the three rotary sections: what the benchmark's call produced (module doc, step 3).
        positions = torch.arange(ids.shape[1], device=self.device).view(1, 1, -1).expand(3, ids.shape[0], -1)
        hidden = language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                use_cache=False).last_hidden_state
        last = mask.sum(dim=1) - 1  # right padding: the last real token
        pooled = hidden[torch.arange(hidden.shape[0], device=self.device), last].float()
        return torch.nn.functional.normalize(pooled, p=2, dim=1).cpu()

    def _batched(self, prompts: list[str], images: list | None) -> torch.Tensor:
        out = []
        for i in range(0, len(prompts), self.batch_size):
            chunk = None if images is None else images[i:i + self.batch_size]
            out.append(self._forward(prompts[i:i + self.batch_size], chunk))
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    @property
    def dim(self) -> int:
        return int(self.model.config.text_config.hidden_size)

    def text_embeddings(self, texts: Sequence[str], instruction: str | None = None) -> torch.Tensor:
        """Texts embedded as queries with `instruction` (None: the default system instruction) -> float32 [N, D]."""
        return self._batched([gme_prompt(t, instruction=instruction) for t in texts], None)

    def image_embeddings(self, images: Sequence) -> torch.Tensor:
        """Images (uint8 [H, W, 3] or PIL) embedded as corpus entries -> float32 [N, D]."""
        return self._batched([gme_prompt(image=True)] * len(images), [fetch_image(i) for i in images])


def gmescore(embedder: GmeEmbedder, prompt: str, frames: np.ndarray, num_frames: int | None = GMESCORE_FRAMES) -> float:
    """OpenS2V-Eval's GmeScore of one video.

    Args:
        frames: uint8 [F, H, W, 3], every decoded frame (`num_frames` of them are sampled as the benchmark does).
    Returns:
        mean over the sampled frames of <text query embedding, frame embedding> (about -1..1).
    """
    from idcrafter.eval.opens2v import sample_indices

    frames = np.asarray(frames)
    picked = frames[sample_indices(len(frames), num_frames)]
    # The benchmark embeds the prompt once per frame; the copies are identical, so one is enough.
    query = embedder.text_embeddings([prompt], instruction=QUERY_INSTRUCTION)
    corpus = embedder.image_embeddings(list(picked))
    return float((corpus * query).sum(-1).mean())


def embedder_from_options(options: Mapping[str, object], device: str, key: str = "path") -> GmeEmbedder:
    """A GmeEmbedder from column-model options: options[key] (the folder), dtype, batch_size,
    min_image_tokens, max_image_tokens (the benchmark's defaults when absent)."""
    return GmeEmbedder(options[key], device=device, dtype=options.get("dtype"),
                       batch_size=int(options.get("batch_size", BATCH_SIZE)),
                       min_image_tokens=int(options.get("min_image_tokens", MIN_IMAGE_TOKENS)),
                       max_image_tokens=int(options.get("max_image_tokens", MAX_IMAGE_TOKENS)))


def build_gmescore(options: Mapping[str, object], device: str = "cpu"):
    """The GmeScore column model (`idcrafter.eval.protocols`): options path=DIR (GME-Qwen2-VL), frames (32),
    and those of `embedder_from_options`."""
    embedder = embedder_from_options(options, device)
    count = int(options.get("frames", GMESCORE_FRAMES))
    return lambda item, frames: {"gmescore": gmescore(embedder, item.prompt, frames, count)}


# ----------------------------------------------------------------------------------------------------
# One-for-All: GME-I and GME-T (App. D)
# ----------------------------------------------------------------------------------------------------


class OneForAllGmeScorer:
    """One-for-All's GME-T and GME-I of one generated image (a video: its first frame).

    GME-T: <GME(query: the full prompt), GME(image)>, the query embedded with GME's retrieval
    instruction "Find an image that matches the given text." (the paper names no instruction; this
    is the one OpenS2V's GmeScore uses for the same text-to-image question).
    GME-I: for each reference k, Grounding-DINO finds its category (item.categories[k]; "object"
    when the item has none) in the output; the best box of that category is cropped and
    <GME(crop), GME(reference)> is its score (0 when no box); GME-I is the mean over references.
    The paper leaves open how many boxes, how references sharing a category are matched, and what a
    missing subject scores: we take one box per reference, references of one category take that
    category's boxes in score order (distinct boxes), and a missing subject scores 0.
    """

    def __init__(self, embedder: GmeEmbedder, detector):
        self.embedder = embedder
        self.detector = detector

    def gme_t(self, image: np.ndarray, prompt: str) -> float:
        query = self.embedder.text_embeddings([prompt], instruction=QUERY_INSTRUCTION)
        return float((self.embedder.image_embeddings([image]) * query).sum())

    def crops(self, image: np.ndarray, categories: Sequence[str]) -> list[np.ndarray | None]:
        """One crop per reference (None where its category has no box left), best box first per category."""
        from collections import Counter

        from idcrafter.rewards.nexus import crop_box

        counts = Counter(categories)
        found = self.detector.detect([image], dict(counts))[0]
        taken: Counter = Counter()
        out: list[np.ndarray | None] = []
        for c in categories:
            boxes, _ = found.get(c, (np.zeros((0, 4), np.int64), np.zeros(0)))
            out.append(crop_box(image, boxes[taken[c]]) if taken[c] < len(boxes) else None)
            taken[c] += 1
        return out

    def gme_i(self, image: np.ndarray, refs: Sequence[np.ndarray], categories: Sequence[str]) -> float | None:
        if not refs:
            return None
        cats = [" ".join(str(c).lower().split()).rstrip(".") or "object" for c in categories] or ["object"] * len(refs)
        if len(cats) != len(refs):
            raise ValueError(f"GME-I: {len(refs)} references but {len(cats)} categories")
        crops = self.crops(image, cats)
        kept = [k for k, c in enumerate(crops) if c is not None]
        scores = np.zeros(len(refs))
        if kept:
            emb = self.embedder.image_embeddings([refs[k] for k in kept] + [crops[k] for k in kept])
            scores[kept] = (emb[: len(kept)] * emb[len(kept):]).sum(-1).double().numpy()
        return float(scores.mean())

    def __call__(self, item, frames: np.ndarray) -> dict[str, float | None]:
        image = np.asarray(frames)[0]
        return {"ofa_gme_t": self.gme_t(image, item.prompt), "ofa_gme_i": self.gme_i(image, item.refs, item.categories)}


def build_one_for_all(options: Mapping[str, object], device: str = "cpu"):
    """One-for-All's GME columns (`idcrafter.eval.protocols`): options path=DIR (GME-Qwen2-VL),
    detector=DIR (Grounding-DINO, transformers), box_threshold (0.35), and those of `embedder_from_options`."""
    from idcrafter.rewards.nexus import GroundingDINODetector

    embedder = embedder_from_options(options, device)
    detector = GroundingDINODetector(options["detector"], device, options.get("dtype"),
                                     box_threshold=float(options.get("box_threshold", 0.35)), reward="gme").load()
    return OneForAllGmeScorer(embedder, detector)
