"""Semantic encoder (docs/design.md 4): Qwen2.5-VL reads the prompt and the reference images.

    states = last_hidden_layer(Qwen2.5-VL(chat([ref_1 .. ref_N, INSTRUCTION(prompt)])))   [B, L, D_vlm]
    tokens = VLMConnector(states)                                                       [B, L, dim]

The VLM is frozen; its states can be precomputed once per (prompt, references) and cached on disk
(`VLMEmbeddingCache`) for training. The connector is trainable and lives in the transformer
adapter, so it is a separate module. UMT5 stays on the stock text cross-attention (dual encoder).

Typical use::

    encoder = VLMSemanticEncoder.from_pretrained("models/Qwen2.5-VL-7B-Instruct", device="cuda",
                                                 dtype=torch.bfloat16)
    out = encoder.encode(["a cat and a dog on a beach"], [[cat_image, dog_image]],
                         cache=VLMEmbeddingCache("cache/vlm"))
    tokens = connector(out.states, out.mask)  # [B, L, dim]

`build_tiny_qwen2_5_vl` writes a tiny random Qwen2.5-VL (model, tokenizer, image processor, chat
template) to a folder, for tests and CPU demos: nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

from idcrafter.utils.io import atomic_write, atomic_write_dir
from idcrafter.utils.logging import get_logger
from idcrafter.utils.media import to_rgb

__all__ = [
    "DEFAULT_MAX_IMAGE_SIDE",
    "INSTRUCTION",
    "QWEN_SPECIAL_TOKENS",
    "TINY_CHAT_TEMPLATE",
    "VISION_PATCH_MULTIPLE",
    "Qwen2_5_VLImageTextProcessor",
    "VLMConnector",
    "VLMEmbeddingCache",
    "VLMOutput",
    "VLMSemanticEncoder",
    "build_tiny_qwen2_5_vl",
    "fit_to_patch_grid",
    "pad_states",
    "to_rgb",
]

logger = get_logger(__name__)

# The user turn's text; part of every cache key, so editing it never reuses old entries.
INSTRUCTION = "Describe the subjects in the images and how they appear in this scene: {prompt}"

# Qwen's vision patch (14) times the spatial merge (2): one vision token per 28 x 28 pixels.
VISION_PATCH_MULTIPLE = 28
# Longest side a reference is resized to: at most 16 x 16 = 256 vision tokens per reference.
DEFAULT_MAX_IMAGE_SIDE = 448

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen-style chat template reduced to what the encoder uses: roles, text items and image items.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CACHE_FORMAT = "idcrafter-vlm-cache-v1"

# ---------------------------------------------------------------------------- images
def fit_to_patch_grid(
    image: Image.Image, max_side: int = 448, multiple: int = VISION_PATCH_MULTIPLE
) -> Image.Image:
    """Resize so the longer side is at most `max_side` and both sides are multiples of `multiple`.

    Sides are scaled down to fit, then rounded to the nearest multiple (at least one, at most
    `max_side`). This bounds the vision tokens per reference at (max_side / 28)^2 and leaves nothing
    for Qwen's own `smart_resize` to change (within its pixel limits).
    """
    if max_side < multiple:
        raise ValueError(f"fit_to_patch_grid: max_side must be at least {multiple}, got {max_side}")
    width, height = image.size
    scale = min(1.0, max_side / max(width, height))
    limit = max_side // multiple * multiple

    def snap(x: int) -> int:
        return int(max(multiple, min(limit, round(x * scale / multiple) * multiple)))

    size = (snap(width), snap(height))
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)


# ---------------------------------------------------------------------------- outputs
@dataclass
class VLMOutput:
    """VLM states of a batch, right-padded.

    Attributes:
        states: [B, L, D] last hidden layer; padded positions are zero.
        mask: [B, L] bool, True on valid tokens (a prefix of each row).
    """

    states: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        if self.states.ndim != 3 or self.mask.shape != self.states.shape[:2]:
            raise ValueError(
                f"VLMOutput: states must be [B, L, D] and mask [B, L], got {tuple(self.states.shape)} "
                f"and {tuple(self.mask.shape)}"
            )

    def __len__(self) -> int:
        return self.states.shape[0]

    def lengths(self) -> list[int]:
        return [int(n) for n in self.mask.sum(dim=1)]

    def unpadded(self) -> list[torch.Tensor]:
        """One [L_i, D] tensor per sample: its valid tokens."""
        return [s[m] for s, m in zip(self.states, self.mask)]


def pad_states(sequences: Sequence[torch.Tensor]) -> VLMOutput:
    """Right-pad [L_i, D] tensors to a batch: states [B, max L_i, D] (zeros after L_i), mask [B, max L_i]."""
    if len(sequences) == 0:
        raise ValueError("pad_states: no sequences")
    length = max(s.shape[0] for s in sequences)
    first = sequences[0]
    states = first.new_zeros(len(sequences), length, first.shape[-1])
    mask = torch.zeros(len(sequences), length, dtype=torch.bool, device=first.device)
    for i, s in enumerate(sequences):
        states[i, : s.shape[0]] = s.to(device=first.device, dtype=first.dtype)
        mask[i, : s.shape[0]] = True
    return VLMOutput(states, mask)


# ---------------------------------------------------------------------------- connector
class VLMConnector(nn.Module):
    """VLM states -> DiT width: LayerNorm, Linear, GELU(tanh), Linear. Trainable (adapter weights).

    Args:
        vlm_dim: D_vlm, the VLM hidden size (Qwen2.5-VL-7B: 3584).
        dim: the DiT width.
    """

    def __init__(self, vlm_dim: int, dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(vlm_dim, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(vlm_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))

    def forward(self, states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """states [B, L, D_vlm] (any float dtype), mask [B, L] bool or None -> [B, L, dim].

        With a mask, padded positions come out as zeros (the attention masks them as well).
        """
        out = self.mlp(self.norm(states.to(self.norm.weight.dtype)))
        if mask is not None:
            out = out * mask.unsqueeze(-1).to(out.dtype)
        return out


# ---------------------------------------------------------------------------- cache
class VLMEmbeddingCache:
    """Disk cache of VLM states: one safetensors file (states [1, L, D], mask [1, L]) per key.

    Keys are a sha256 of the content, not of file names: the model identifier, the instruction
    template, the prompt and each reference's RGB pixels and size. A changed image, prompt,
    instruction or model therefore gets a new key and never reads a stale entry; the price is
    hashing the pixels on every lookup. Files are written atomically, so a crash never leaves an
    entry that looks complete.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    @staticmethod
    def key_for(
        model_id: str, prompt: str, images: Sequence[Image.Image], instruction: str = INSTRUCTION
    ) -> str:
        """sha256 hex key of (model_id, instruction, prompt, each image's RGB bytes and size)."""
        digest = hashlib.sha256()

        def field(data: bytes) -> None:  # length-prefixed, so fields can never run into each other
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)

        field(_CACHE_FORMAT.encode())
        field(model_id.encode())
        field(instruction.encode())
        field(prompt.encode())
        field(len(images).to_bytes(8, "little"))
        for image in images:
            rgb = to_rgb(image)
            field(f"{rgb.size[0]}x{rgb.size[1]}".encode())
            field(rgb.tobytes())
        return digest.hexdigest()

    def path(self, key: str) -> Path:
        # Two-character shards keep folders small when a data set has millions of samples.
        return self.folder / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def get(self, key: str) -> VLMOutput | None:
        """The cached single-sample output (on the CPU), or None on a miss."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            tensors = load_file(path)
            return VLMOutput(tensors["states"], tensors["mask"].bool())
        except (SafetensorError, KeyError, ValueError) as err:
            raise ValueError(
                f"VLMEmbeddingCache: unreadable entry {path} ({err}); delete it to recompute"
            ) from err

    def put(self, key: str, out: VLMOutput) -> Path:
        """Store one sample (states [1, L, D], mask [1, L]) atomically; returns the file path."""
        if len(out) != 1:
            raise ValueError(f"VLMEmbeddingCache.put: one sample per key, got a batch of {len(out)}")
        path = self.path(key)
        tensors = {
            "states": out.states.detach().contiguous().cpu(),
            "mask": out.mask.detach().bool().contiguous().cpu(),
        }
        with atomic_write(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt", "cache": _CACHE_FORMAT})
        return path


# ---------------------------------------------------------------------------- processor
class Qwen2_5_VLImageTextProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` without the video processor: tokenizer, image processor, chat template.

    In transformers 5 every video processor needs torchvision, and the stock processor refuses to
    build or load without one (`AutoProcessor` raises on a Qwen2.5-VL folder). The encoder only
    feeds images and text, so this subclass takes the two other parts; its `__call__`, chat
    template and image-token expansion are the stock ones. It reads a stock Qwen2.5-VL folder.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs
        )


def _load_processor(path: Path, trust_remote_code: bool) -> Qwen2_5_VLImageTextProcessor:
    return Qwen2_5_VLImageTextProcessor.from_pretrained(
        str(path), local_files_only=True, trust_remote_code=trust_remote_code
    )


# ---------------------------------------------------------------------------- encoder
class VLMSemanticEncoder:
    """Frozen Qwen2.5-VL: (prompt, reference images) -> last-layer hidden states.

    Args:
        model: a `Qwen2_5_VLForConditionalGeneration`; it is put in eval mode and frozen.
        processor: its Qwen2.5-VL processor (tokenizer + image processor + chat template).
        model_id: identifies the weights in cache keys; defaults to the model's name or path.
        max_image_side: references are resized to at most this side, in multiples of 28.
        instruction: the user text, with a `{prompt}` field.
    """

    def __init__(
        self,
        model: Qwen2_5_VLForConditionalGeneration,
        processor: Qwen2_5_VLProcessor,
        model_id: str | None = None,
        max_image_side: int = DEFAULT_MAX_IMAGE_SIDE,
        instruction: str = INSTRUCTION,
    ):
        if max_image_side < VISION_PATCH_MULTIPLE:
            raise ValueError(
                f"VLMSemanticEncoder: max_image_side must be at least {VISION_PATCH_MULTIPLE}, got {max_image_side}"
            )
        if "{prompt}" not in instruction:
            raise ValueError(
                f"VLMSemanticEncoder: instruction must contain '{{prompt}}', got {instruction!r}"
            )
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        # Right padding puts every sample's tokens at the same positions as when it runs alone, so
        # batched, single and cached states agree.
        self.processor.tokenizer.padding_side = "right"
        self.model_id = model_id or str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
        self.max_image_side = int(max_image_side)
        self.instruction = instruction

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        trust_remote_code: bool = False,
        **kwargs,
    ) -> VLMSemanticEncoder:
        """Load model and processor from a local Qwen2.5-VL folder (never from a hub).

        Args:
            path: folder with config.json, the weights, tokenizer, image processor and chat template.
            device: where the model runs.
            dtype: model dtype; None keeps the checkpoint's.
            trust_remote_code: passed to transformers; only set it for folders you trust.
            **kwargs: `model_id`, `max_image_side`, `instruction` (see the class).

        Raises:
            FileNotFoundError: `path` is not a folder with a config.json.
        """
        path = Path(path)
        if not (path / "config.json").is_file():
            what = "has no config.json" if path.is_dir() else "does not exist"
            raise FileNotFoundError(
                f"VLMSemanticEncoder: Qwen2.5-VL model folder {str(path)!r} {what}; give a local folder "
                "saved with save_pretrained (models are never downloaded)"
            )
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            str(path),
            dtype=dtype if dtype is not None else "auto",
            local_files_only=True,
            trust_remote_code=trust_remote_code,
        ).to(device)
        processor = _load_processor(path, trust_remote_code)
        kwargs.setdefault("model_id", str(path.resolve()))
        return cls(model, processor, **kwargs)

    # ------------------------------------------------------------------ facts
    @property
    def hidden_size(self) -> int:
        """D_vlm, the width of `encode`'s states."""
        return int(self.model.config.text_config.hidden_size)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def cache_id(self) -> str:
        """Everything besides prompt and pixels that changes the states: weights, dtype, image size."""
        return f"{self.model_id}|{self.dtype}|max_image_side={self.max_image_side}"

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> VLMSemanticEncoder:
        self.model.to(device=device, dtype=dtype)
        return self

    # ------------------------------------------------------------------ inputs
    def messages(self, prompt: str, num_images: int) -> list[dict]:
        """One user turn: the reference images first, then the instruction with the prompt."""
        content = [{"type": "image"} for _ in range(num_images)]
        content.append({"type": "text", "text": self.instruction.format(prompt=prompt)})
        return [{"role": "user", "content": content}]

    def prepare_image(self, image: Image.Image) -> Image.Image:
        return fit_to_patch_grid(to_rgb(image), self.max_image_side)

    @torch.no_grad()
    def _forward(self, prompts: Sequence[str], refs: Sequence[Sequence[Image.Image]]) -> list[torch.Tensor]:
        """One model call; returns each sample's valid last-layer states, [L_i, D]."""
        texts = [
            self.processor.apply_chat_template(
                self.messages(p, len(r)), tokenize=False, add_generation_prompt=False
            )
            for p, r in zip(prompts, refs)
        ]
        images = [self.prepare_image(image) for r in refs for image in r]
        inputs = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt").to(
            self.device
        )
        # logits_to_keep=1: the encoder needs no logits, so skip the vocabulary projection of all tokens.
        out = self.model(**inputs, output_hidden_states=True, use_cache=False, logits_to_keep=1)
        last = out.hidden_states[-1]
        valid = inputs["attention_mask"].bool()
        return [h[m] for h, m in zip(last, valid)]

    def encode(
        self,
        prompts: Sequence[str],
        refs: Sequence[Sequence[Image.Image]],
        cache: VLMEmbeddingCache | None = None,
        batch_size: int | None = None,
    ) -> VLMOutput:
        """Encode each (prompt, references) sample; cache hits skip the model.

        Args:
            prompts: B prompts.
            refs: B lists of reference images (any PIL mode; transparency goes on white).
            cache: optional disk cache, looked up and filled per sample.
            batch_size: samples per model call (None: all misses in one call).

        Returns:
            VLMOutput: states [B, L, D] in the model's dtype on its device, mask [B, L].
        """
        if len(prompts) != len(refs):
            raise ValueError(
                f"VLMSemanticEncoder.encode: {len(prompts)} prompts but {len(refs)} reference lists"
            )
        if len(prompts) == 0:
            raise ValueError("VLMSemanticEncoder.encode: no samples")
        rgb_refs = [[to_rgb(image) for image in r] for r in refs]
        results: list[torch.Tensor | None] = [None] * len(prompts)
        keys: list[str | None] = [None] * len(prompts)
        if cache is not None:
            for i, (prompt, images) in enumerate(zip(prompts, rgb_refs)):
                keys[i] = cache.key_for(self.cache_id, prompt, images, instruction=self.instruction)
                hit = cache.get(keys[i])
                if hit is not None:
                    results[i] = hit.unpadded()[0].to(device=self.device, dtype=self.dtype)
        misses = [i for i, r in enumerate(results) if r is None]
        step = batch_size or max(len(misses), 1)
        for start in range(0, len(misses), step):
            chunk = misses[start : start + step]
            states = self._forward([prompts[i] for i in chunk], [rgb_refs[i] for i in chunk])
            for i, s in zip(chunk, states):
                results[i] = s
                if cache is not None:
                    cache.put(keys[i], pad_states([s]))
        if cache is not None:
            logger.debug("VLM cache: %d hits, %d misses", len(prompts) - len(misses), len(misses))
        return pad_states(results)


# ---------------------------------------------------------------------------- tiny model
_TINY_CORPUS = (
    INSTRUCTION.format(prompt="a red cat and a blue dog walk in the park"),
    "a person with a hat rides a bike past a tall tree near the river at sunset",
    "the woman holds a cup, the man plays a guitar, two friends sit on a bench",
    "user assistant system image video scene subject subjects describe appear",
    "0 1 2 3 4 5 6 7 8 9 , . : ; ! ? ' \" ( ) - _ / a b c d e f g h i j k l m n o p q r s t u v w x y z",
)


def _tiny_tokenizer():
    """A byte-level BPE (any text encodes) trained on a few sentences, as a `Qwen2Tokenizer`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(_TINY_CORPUS), trainer)
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    return Qwen2Tokenizer(
        vocab=bpe.get_vocab(),
        merges=merges,
        extra_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
    )


def build_tiny_qwen2_5_vl(folder: str | os.PathLike, seed: int = 0, max_pixels: int = 28 * 28 * 64) -> Path:
    """Write a tiny random Qwen2.5-VL (about 100k parameters) to `folder`, for tests and CPU demos.

    Text model: hidden 32, 2 layers, 4 heads (2 KV), head_dim 8, mrope_section [2, 1, 1]. Vision:
    depth 1, width 32, patch 14, merge 2. Tokenizer: byte-level BPE trained on a few sentences with
    the Qwen special tokens; image processor with small `min_pixels` / `max_pixels`; a Qwen-style
    chat template. The folder is laid out like a hub checkpoint and replaced atomically. The global
    RNG is left untouched.

    Returns:
        The folder, for `VLMSemanticEncoder.from_pretrained`.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2VLImageProcessorPil

    tokenizer = _tiny_tokenizer()
    ids = dict(zip(QWEN_SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS))))
    hidden, heads, mrope_section = 32, 4, [2, 1, 1]
    assert sum(mrope_section) == hidden // heads // 2, "mrope_section must sum to head_dim / 2"
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=heads,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=hidden,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[0],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=VISION_PATCH_MULTIPLE**2,
        max_pixels=max_pixels,
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
    )
    processor = Qwen2_5_VLImageTextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=TINY_CHAT_TEMPLATE
    )
    folder = Path(folder)
    with atomic_write_dir(folder) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        # Name the stock class, as a hub checkpoint does; our loader reads it either way.
        for name in ("processor_config.json", "tokenizer_config.json"):
            file = tmp / name
            if file.is_file():
                data = json.loads(file.read_text())
                if "processor_class" in data:
                    data["processor_class"] = "Qwen2_5_VLProcessor"
                    file.write_text(json.dumps(data, indent=2) + "\n")
    return folder
