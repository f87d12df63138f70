"""MultiCrafter's IPPO as an `RLSpec` (idcrafter.rl.trainer): rollouts of the FLUX image policy.

The policy's velocity is `MCImageTransformer` on packed latents with the references as clean
context tokens, exactly as `MCImagePipeline` samples; text, pooled CLIP state and reference tokens
are encoded once per group. The sigma schedule is the pipeline scheduler's (its shift at the
target's token count), so RL trains the sampler users run. With `--objective gspo` the trainer's
sequence-level ratio over the window steps is MultiCrafter's IPPO objective. The reference policy
is the model with its (MoE-)LoRA switched off.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from idcrafter.core.moe_lora import moe_lora_disabled
from idcrafter.core.positions import canonical_category
from idcrafter.rl.trainer import load_prompt_samples, reference_arrays
from idcrafter.utils.errors import FileFormatError
from mcimage.config import check_categories
from mcimage.training import ImageDataArgs, ImageModelArgs, ImageTrainingSpec
from mcimage.transformer import unpack_latents

__all__ = ["ImageCondition", "ImageItem", "ImageRLSpec"]


@dataclass
class ImageItem:
    """One (prompt, subjects) of the RL data: reference paths and categories from a manifest line."""

    id: str
    prompt: str
    refs: tuple[Path, ...]
    categories: tuple[str, ...] | None  # None with UNO ids


@dataclass
class ImageCondition:
    text: torch.Tensor  # [1, L_txt, D]
    pooled: torch.Tensor  # [1, D_pool]
    refs: list[torch.Tensor]  # N x [1, L_r, C] packed clean reference tokens
    ref_hws: list[tuple[int, int]]
    categories: list[str] | None
    descriptors: dict[str, list[int]] | None


class ImageRLSpec:
    """Loading, prompt data, conditioning, the image velocity, decoding and export for image RL."""

    def __init__(self, model_args: ImageModelArgs, data: str, eval_data: str | None = None, policy: str = "lora",
                 height: int = 512, width: int = 512, ref_size: tuple[int, int] | None = None,
                 categories: tuple[str, ...] | None = None):
        self.sft = ImageTrainingSpec(model_args, ImageDataArgs(data=data, height=height, width=width, ref_size=ref_size),
                                     policy=policy)
        self.config = self.sft.config
        self.hidden_size = self.sft.hidden_size
        self.data, self.eval_data, self.policy = data, eval_data, policy
        self.height, self.width, self.ref_size = height, width, self.sft.ref_size
        self.categories = None if categories is None else tuple(canonical_category(c) for c in categories)
        self.flow_shift = 1.0  # set from the scheduler in build_model

    # ------------------------------------------------------------------ model
    def build_model(self, device: torch.device, dtype: torch.dtype):
        model = self.sft.build_model(device, dtype)
        self.pipe, self.device = self.sft.pipe, device
        self.flow_shift = self.sft.shift
        mult = self.pipe.vae_scale_factor * 2
        self.grid = (self.height // mult, self.width // mult)
        return model

    def trainable_parameters(self, model, policy: str):
        return self.sft.trainable_parameters(model, policy)

    @contextlib.contextmanager
    def reference(self, model):
        """The starting policy when RL trains a fresh (MoE-)LoRA only: that LoRA off. The trainer
        uses a frozen copy of the starting weights instead in every other case."""
        with moe_lora_disabled(model):
            yield

    # ------------------------------------------------------------------ data
    def build_items(self, which: str) -> list[ImageItem]:
        path = self.data if which == "train" else self.eval_data
        if path is None:
            return []
        return [ImageItem(s.id, s.prompt, tuple(x.image for x in s.subjects),
                          self._categories(path, s.id, [x.category for x in s.subjects]))
                for s in load_prompt_samples(path, self.config.max_subjects)]

    def _categories(self, path, sample_id: str, manifest: list[str]) -> tuple[str, ...] | None:
        """Condition ids need one distinct category per reference: the manifest's, or --categories in order."""
        if self.config.position_ids != "condition":
            return None
        if self.categories is not None:
            if len(manifest) > len(self.categories):
                raise FileFormatError(f"{path}: sample {sample_id} has {len(manifest)} subjects but --categories gives "
                                      f"{len(self.categories)}")
            return self.categories[: len(manifest)]
        try:
            return check_categories(self.config, len(manifest), manifest)
        except ValueError as err:
            raise FileFormatError(f"{path}: sample {sample_id}: {err} (or pass --categories)") from None

    def reward_inputs(self, item: ImageItem) -> tuple[str, list[np.ndarray], dict]:
        from idcrafter.core.positions import parse_descriptor_markup

        clean, _ = parse_descriptor_markup(item.prompt)
        return clean, reference_arrays(item.refs), {"categories": list(item.categories or ()), "id": item.id}

    # ------------------------------------------------------------------ conditioning and policy
    @torch.no_grad()
    def condition(self, model, item: ImageItem, device: torch.device) -> ImageCondition:
        from mcimage.pipeline import prompt_descriptors

        pipe, cfg = self.pipe, self.config
        (prompt,), descriptors = prompt_descriptors([item.prompt], pipe.tokenizer_2, cfg.text_length,
                                                    item.categories, cfg.ccpa)
        text, pooled, _ = pipe.encode_prompt(prompt=[prompt], prompt_2=None, device=device,
                                             max_sequence_length=cfg.text_length)
        dtype = model.dtype
        refs, hws = pipe.encode_references(list(item.refs), *self.ref_size, 1, device, dtype)
        return ImageCondition(text.to(dtype), pooled.to(dtype), refs, hws,
                              list(item.categories) if item.categories else None, descriptors)

    def velocity(self, model, cond: ImageCondition):
        """v(x [B, L, C], sigma [B]) of `model` (the pipeline's transformer, the engine's module)."""
        if model is not self.pipe.transformer:
            raise ValueError("the policy model must be the pipeline's transformer")
        dtype = model.dtype
        guidance_value = self.config.guidance_scale if self.sft.m.guidance is None else self.sft.m.guidance

        def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            b = x.shape[0]
            guidance = torch.full((b,), float(guidance_value), device=x.device) if self.config.flux.get("guidance_embeds") else None
            v = model(x.to(dtype), [r.expand(b, -1, -1) for r in cond.refs] or None, cond.text.expand(b, -1, -1),
                      cond.pooled.expand(b, -1), sigma.float(), guidance, target_hw=self.grid,
                      ref_hws=cond.ref_hws or None, categories=cond.categories, descriptor_tokens=cond.descriptors)
            return v.float()

        return velocity

    def initial_noise(self, item: ImageItem, generator: torch.Generator) -> torch.Tensor:
        """Packed Gaussian latents [1, h * w, C] (packing a Gaussian is a Gaussian)."""
        h, w = self.grid
        return torch.randn((1, h * w, self.config.flux["in_channels"]), generator=generator)

    def forward_work(self, cond: ImageCondition, checkpointing: bool) -> tuple[int, int, int]:
        """(target tokens of one transformer row, its analytic FLOPs with the condition's reference
        tokens in context, 0: nothing is encoded ahead) (mcimage/flops.py)."""
        from mcimage import flops

        target = self.grid[0] * self.grid[1]
        refs = sum(r.shape[1] for r in cond.refs)
        return target, flops.forward_flops(self.config, target, cond.text.shape[1], refs, len(cond.refs)), 0

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[np.ndarray]:
        """Packed latents [B, L, C] -> one uint8 [1, H, W, 3] frame per sample (the rewards' video layout)."""
        vae = self.pipe.vae
        scaling, shift = self.pipe._latent_affine()
        z = unpack_latents(latents.float(), self.grid) / scaling + shift
        pixels = vae.decode(z.to(device=self.device, dtype=vae.dtype), return_dict=False)[0]
        images = ((pixels.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu()
        return [(im * 255).round().to(torch.uint8).numpy()[None] for im in images]

    # ------------------------------------------------------------------ files
    def export(self, model, folder: Path) -> None:
        self.sft.export(model, folder)

    def describe(self) -> dict:
        return {"preset": self.config.preset, "policy": self.policy, "size": [self.height, self.width],
                "flow_shift": self.flow_shift}
