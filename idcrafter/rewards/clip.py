"""CLIP / DINOv2 rewards: CLIP-T, CLIP-I, DINO-I and the LAION aesthetic predictor.

    clip_text  = mean_f cos(CLIP_img(frame_f), CLIP_txt(prompt))
    clip_image = mean_{r, f} cos(CLIP_img(ref_r), CLIP_img(frame_f))
    dino_image = mean_{r, f} cos(DINOv2_cls(ref_r), DINOv2_cls(frame_f))
    aesthetic  = mean_f MLP(unit(CLIP_img(frame_f))) / scale          (LAION improved predictor, ViT-L/14;
                                                                        ID-Crafter's R_aes, MultiCrafter's is `hps`)

Frames are sampled with `stride` / `max_frames` (`sample_frames`). Models are transformers classes
loaded from a local folder at the first call; images go through the PIL image processors, so
torchvision is not needed.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from idcrafter.rewards.base import RewardModel, register_reward
from idcrafter.rewards.common import (
    check_frame_options,
    load_image_processor,
    model_dtype,
    require_path,
    sample_frames,
    unit_rows,
)

__all__ = [
    "AestheticMLP",
    "AestheticReward",
    "CLIPEmbedder",
    "CLIPImageReward",
    "CLIPTextReward",
    "DINOEmbedder",
    "DINOImageReward",
    "load_aesthetic_mlp",
    "make_image_embedder",
]


class CLIPEmbedder:
    """A CLIP model (transformers `CLIPModel`, tokenizer, image processor) from a local folder.

    `images` / `texts` return unit-norm float32 embeddings [N, D] on the CPU (D = projection_dim).
    """

    what = "a local CLIP folder saved with save_pretrained"

    def __init__(self, path: str | os.PathLike | None, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype | None = None, reward: str = "clip", option: str = "path",
                 batch_size: int = 32):
        self.path = require_path(reward, path, self.what, option)
        self.device, self.dtype = torch.device(device), model_dtype(dtype)
        self.batch_size = int(batch_size)
        self.model = self.tokenizer = self.processor = None

    def load(self) -> CLIPEmbedder:
        if self.model is None:
            from transformers import AutoTokenizer, CLIPModel

            self.model = CLIPModel.from_pretrained(str(self.path), dtype=self.dtype, local_files_only=True)
            self.model = self.model.to(self.device).eval().requires_grad_(False)
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
            self.processor = load_image_processor(self.path)
        return self

    @property
    def dim(self) -> int:
        return int(self.load().model.config.projection_dim)

    @torch.no_grad()
    def images(self, images: list[np.ndarray]) -> torch.Tensor:
        """RGB uint8 [H, W, 3] images -> [N, D]."""
        self.load()
        out = []
        for i in range(0, len(images), self.batch_size):
            # channels_last: the processor guesses the layout, and takes a crop 1 or 3 pixels high for [C, H, W].
            pixels = self.processor(images=list(images[i:i + self.batch_size]), return_tensors="pt",
                                    input_data_format="channels_last")["pixel_values"]
            pooled = self.model.vision_model(pixel_values=pixels.to(self.device, self.dtype)).pooler_output
            out.append(unit_rows(self.model.visual_projection(pooled)).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        """Strings -> [N, D]; longer texts are cut at CLIP's context (77 tokens for the real models)."""
        self.load()
        limit = int(self.model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=limit, return_tensors="pt")
        pooled = self.model.text_model(input_ids=tokens["input_ids"].to(self.device),
                                       attention_mask=tokens["attention_mask"].to(self.device)).pooler_output
        return unit_rows(self.model.text_projection(pooled)).cpu()


class DINOEmbedder:
    """DINOv2 (transformers `Dinov2Model`) CLS features from a local folder: `images` -> unit [N, D]."""

    what = "a local DINOv2 folder saved with save_pretrained"

    def __init__(self, path: str | os.PathLike | None, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype | None = None, reward: str = "dino", option: str = "path",
                 batch_size: int = 32):
        self.path = require_path(reward, path, self.what, option)
        self.device, self.dtype = torch.device(device), model_dtype(dtype)
        self.batch_size = int(batch_size)
        self.model = self.processor = None

    def load(self) -> DINOEmbedder:
        if self.model is None:
            from transformers import Dinov2Model

            self.model = Dinov2Model.from_pretrained(str(self.path), dtype=self.dtype, local_files_only=True)
            self.model = self.model.to(self.device).eval().requires_grad_(False)
            self.processor = load_image_processor(self.path)
        return self

    @property
    def dim(self) -> int:
        return int(self.load().model.config.hidden_size)

    @torch.no_grad()
    def images(self, images: list[np.ndarray]) -> torch.Tensor:
        self.load()
        out = []
        for i in range(0, len(images), self.batch_size):
            # channels_last: the processor guesses the layout, and takes a crop 1 or 3 pixels high for [C, H, W].
            pixels = self.processor(images=list(images[i:i + self.batch_size]), return_tensors="pt",
                                    input_data_format="channels_last")["pixel_values"]
            # pooler_output is the layer-normed CLS token, the feature DINO-I compares.
            cls = self.model(pixel_values=pixels.to(self.device, self.dtype)).pooler_output
            out.append(unit_rows(cls).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)


def make_image_embedder(kind: str, path, device="cpu", dtype=None, reward: str = "nexus",
                        option: str = "embedder_path") -> CLIPEmbedder | DINOEmbedder:
    """"clip" -> CLIPEmbedder, "dino" -> DINOEmbedder."""
    kinds = {"clip": CLIPEmbedder, "dino": DINOEmbedder}
    if kind not in kinds:
        raise ValueError(f"reward {reward!r}: embedder must be one of {', '.join(kinds)}, got {kind!r}")
    return kinds[kind](path, device, dtype, reward=reward, option=option)


class _FrameReward(RewardModel):
    """Frame sampling shared by the frame rewards (`stride`, `max_frames`)."""

    def __init__(self, device="cpu", stride: int = 1, max_frames: int | None = 8):
        super().__init__(device)
        self.stride, self.max_frames = check_frame_options(self.name, stride, max_frames)

    def frames(self, video: np.ndarray) -> list[np.ndarray]:
        return list(sample_frames(video, self.stride, self.max_frames))


@register_reward("clip_text")
class CLIPTextReward(_FrameReward):
    """CLIP-T: cosine of each sampled frame's CLIP image embedding with the prompt's, averaged.
    Options: path (CLIP folder), device, dtype, stride, max_frames."""

    name = "clip_text"

    def __init__(self, path=None, device="cpu", dtype=None, stride: int = 1, max_frames: int | None = 8):
        super().__init__(device, stride, max_frames)
        self.clip = CLIPEmbedder(path, device, dtype, reward=self.name)

    def score(self, samples, prompts, refs, meta, warnings):
        text = self.clip.texts(prompts)
        return [float((self.clip.images(self.frames(v)) @ t).mean()) for v, t in zip(samples, text)]


class _ImageSimilarityReward(_FrameReward):
    """mean over references and sampled frames of the embedding cosine; no references -> 0 + warning."""

    embedder: CLIPEmbedder | DINOEmbedder

    def score(self, samples, prompts, refs, meta, warnings: Counter):
        scores = []
        for video, images in zip(samples, refs):
            if not images:
                warnings["no reference images"] += 1
                scores.append(0.0)
                continue
            frames = self.frames(video)
            emb = self.embedder.images(list(images) + frames)
            scores.append(float((emb[: len(images)] @ emb[len(images):].T).mean()))
        return scores


@register_reward("clip_image")
class CLIPImageReward(_ImageSimilarityReward):
    """CLIP-I: reference vs frame CLIP image cosine, averaged over references and sampled frames.
    Options: path (CLIP folder), device, dtype, stride, max_frames."""

    name = "clip_image"

    def __init__(self, path=None, device="cpu", dtype=None, stride: int = 1, max_frames: int | None = 8):
        super().__init__(device, stride, max_frames)
        self.embedder = CLIPEmbedder(path, device, dtype, reward=self.name)


@register_reward("dino_image")
class DINOImageReward(_ImageSimilarityReward):
    """DINO-I: reference vs frame DINOv2 CLS cosine, averaged over references and sampled frames.
    Options: path (DINOv2 folder), device, dtype, stride, max_frames."""

    name = "dino_image"

    def __init__(self, path=None, device="cpu", dtype=None, stride: int = 1, max_frames: int | None = 8):
        super().__init__(device, stride, max_frames)
        self.embedder = DINOEmbedder(path, device, dtype, reward=self.name)


# ------------------------------------------------------------------------------------ aesthetic
class AestheticMLP(nn.Module):
    """The LAION "improved aesthetic predictor" head: unit CLIP ViT-L/14 image embedding [N, 768] ->
    score [N] on a 1-10 scale. Layer names match the released checkpoints (layers.0 ... layers.7)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)


def load_aesthetic_mlp(path: str | os.PathLike) -> AestheticMLP:
    """An `AestheticMLP` from a .safetensors file or a .pth / .pt state dict (torch.load, weights_only)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    if "layers.0.weight" not in state:
        raise ValueError(f"reward 'aesthetic': {path} is not an aesthetic-predictor state dict "
                         f"(no layers.0.weight; keys: {sorted(state)[:5]} ...)")
    model = AestheticMLP(int(state["layers.0.weight"].shape[1]))
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


@register_reward("aesthetic")
class AestheticReward(_FrameReward):
    """LAION aesthetic score of the sampled frames, averaged, divided by `scale` (10: about [0, 1]).

    ID-Crafter's R_aes (weight 0.24 in `VIDEO_WEIGHTS`); MultiCrafter's image composite uses HPS v2
    (`hps`, `idcrafter.rewards.hps`) instead.
    Options: path (the MLP file, .safetensors or .pth), clip_path (the CLIP folder: ViT-L/14 for
    LAION's released heads), scale (None: the raw 1-10 score), device, dtype, stride, max_frames.
    """

    name = "aesthetic"

    def __init__(self, path=None, clip_path=None, scale: float | None = 10.0, device="cpu", dtype=None,
                 stride: int = 1, max_frames: int | None = 8):
        super().__init__(device, stride, max_frames)
        self.weights = require_path(self.name, path, "the aesthetic MLP, .safetensors or .pth")
        self.clip = CLIPEmbedder(clip_path, device, dtype, reward=self.name, option="clip_path")
        if scale is not None and not float(scale) > 0:
            raise ValueError(f"reward 'aesthetic': scale must be > 0 or None, got {scale}")
        self.scale = None if scale is None else float(scale)
        self.mlp = None

    def load(self) -> AestheticMLP:
        if self.mlp is None:
            mlp = load_aesthetic_mlp(self.weights)
            if mlp.input_size != self.clip.dim:
                raise ValueError(f"reward 'aesthetic': the MLP in {self.weights} takes {mlp.input_size}-d embeddings but "
                                 f"the CLIP in {self.clip.path} gives {self.clip.dim}-d (use CLIP ViT-L/14 for LAION's)")
            self.mlp = mlp.to(self.device)
        return self.mlp

    @torch.no_grad()
    def score(self, samples, prompts, refs, meta, warnings):
        mlp = self.load()
        scores = []
        for video in samples:
            emb = self.clip.images(self.frames(video)).to(self.device)
            raw = float(mlp(emb).float().mean())
            scores.append(raw if self.scale is None else raw / self.scale)
        return scores
