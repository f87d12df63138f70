"""MCImagePipeline: prompt + reference images -> image on FLUX with MultiCrafter / One-for-All.

Prompt encoding, latent packing, ids and the timestep schedule are diffusers' FluxPipeline's
(its methods are reused, not copied). Each reference is fitted on a white canvas, VAE-encoded
(distribution mode, FLUX scaling/shift), packed 2x2 and passed to `MCImageTransformer` as clean
context tokens at every Euler step. Guidance is FLUX's distilled guidance embedding (no CFG pass).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from idcrafter.core.positions import canonical_category
from idcrafter.utils.media import HIGH_BIT_MODES, fit_on_canvas, image_to_tensor, load_image
from mcimage.config import MCImageConfig
from mcimage.transformer import MCImageTransformer, pack_latents

__all__ = ["MCImagePipeline", "MCImagePipelineOutput"]

# PIL modes `to_rgb` converts faithfully (16-bit greyscale is rescaled, alpha composited on white).
_SUPPORTED_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "La", "CMYK", "YCbCr", "LAB", "HSV", *HIGH_BIT_MODES)


@dataclass
class MCImagePipelineOutput(BaseOutput):
    """images: list of PIL ("pil"), np.ndarray [B, H, W, 3] in [0, 1] ("np"), or packed latents ("latent")."""

    images: list | np.ndarray | torch.Tensor


class MCImagePipeline(DiffusionPipeline):
    """FLUX text-to-image with multi-subject references (MultiCrafter / One-for-All)."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->vae"

    # FluxPipeline's prompt encoding, reused as is (they only read the components registered here).
    _get_t5_prompt_embeds = FluxPipeline._get_t5_prompt_embeds
    _get_clip_prompt_embeds = FluxPipeline._get_clip_prompt_embeds
    encode_prompt = FluxPipeline.encode_prompt

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, vae, transformer: MCImageTransformer, scheduler):
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer, text_encoder=text_encoder, tokenizer_2=tokenizer_2, text_encoder_2=text_encoder_2,
            vae=vae, transformer=transformer, scheduler=scheduler,
        )
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.tokenizer_max_length = tokenizer.model_max_length

    @classmethod
    def from_components(cls, components: dict) -> MCImagePipeline:
        return cls(**components)

    @property
    def device(self) -> torch.device:
        # MCImageTransformer is a plain nn.Module (no `.device`), which DiffusionPipeline.device expects.
        return next(self.transformer.parameters()).device

    @property
    def _execution_device(self) -> torch.device:
        return self.device

    @property
    def mc_config(self) -> MCImageConfig:
        return self.transformer.config

    # ------------------------------------------------------------------ inputs
    def check_inputs(self, prompts: list[str], refs: Sequence, categories, height: int, width: int) -> None:
        cfg = self.mc_config
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        mult = self.vae_scale_factor * 2
        if height <= 0 or width <= 0 or height % mult or width % mult:
            raise ValueError(f"height and width must be positive multiples of {mult}, got {height}x{width}")
        if len(refs) > cfg.max_subjects:
            raise ValueError(f"{len(refs)} reference images, this model supports at most {cfg.max_subjects}")
        if categories is not None:
            if len(categories) != len(refs):
                raise ValueError(f"{len(categories)} categories for {len(refs)} reference images; give one per reference")
            canon = []
            for k, name in enumerate(categories):
                try:
                    canon.append(canonical_category(name))
                except ValueError as err:
                    raise ValueError(f"categories[{k}]: {err}") from None
            if cfg.position_ids == "condition" and len(set(canon)) != len(canon):
                raise ValueError(f"categories {list(categories)} repeat a category; one reference per category")
        elif cfg.position_ids == "condition" and refs:
            raise ValueError("this model (condition position ids) needs categories=[...], one per reference image")

    @staticmethod
    def _to_image(ref, k: int) -> Image.Image:
        if isinstance(ref, (str, Path)):
            ref = load_image(ref)
        elif isinstance(ref, np.ndarray):
            if ref.dtype != np.uint8 or ref.ndim not in (2, 3) or (ref.ndim == 3 and ref.shape[2] not in (1, 3, 4)):
                raise ValueError(
                    f"reference {k}: numpy images must be uint8 [H, W], [H, W, 3] or [H, W, 4], "
                    f"got {ref.dtype} {ref.shape}"
                )
            ref = Image.fromarray(ref[..., 0] if ref.ndim == 3 and ref.shape[2] == 1 else ref)
        if not isinstance(ref, Image.Image):
            raise ValueError(f"reference {k}: expected a path, PIL image or uint8 array, got {type(ref).__name__}")
        if ref.mode not in _SUPPORTED_MODES:
            raise ValueError(f"reference {k}: unsupported image mode {ref.mode!r}; convert it to RGB first")
        return ref

    def encode_references(self, refs: Sequence, height: int, width: int, batch: int, device, dtype):
        """Fit each reference on a white height x width canvas, VAE-encode and pack: (tokens, grids)."""
        tokens, grids = [], []
        shift = self.vae.config.shift_factor or 0.0
        for k, ref in enumerate(refs):
            pixels = image_to_tensor(fit_on_canvas(self._to_image(ref, k), height, width))[None]
            latents = self.vae.encode(pixels.to(device=device, dtype=self.vae.dtype)).latent_dist.mode()
            latents = (latents - shift) * self.vae.config.scaling_factor
            packed, grid = pack_latents(latents.to(dtype))
            tokens.append(packed.expand(batch, -1, -1))
            grids.append(grid)
        return tokens, grids

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        refs: Sequence = (),
        categories: Sequence[str] | None = None,
        height: int = 512,
        width: int = 512,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        output_type: str = "pil",
        ref_size: tuple[int, int] | None = None,
        max_sequence_length: int = 512,
        descriptor_tokens=None,
    ) -> MCImagePipelineOutput:
        """Generate one image per prompt with the given references (shared by the batch).

        refs: paths, PIL images or uint8 arrays (any mode `to_rgb` handles, incl. 16-bit and CMYK);
        categories: one per reference (required by condition ids); ref_size: (h, w) canvas of the
        references (default: the target size); seed: used when no generator is given.
        """
        cfg = self.mc_config
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        refs = list(refs)
        self.check_inputs(prompts, refs, categories, height, width)
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
        ref_h, ref_w = ref_size or (height, width)
        mult = self.vae_scale_factor * 2
        if ref_h % mult or ref_w % mult:
            raise ValueError(f"ref_size must be multiples of {mult}, got {ref_h}x{ref_w}")
        steps = num_inference_steps or cfg.num_inference_steps
        guidance_scale = cfg.guidance_scale if guidance_scale is None else guidance_scale
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(seed)
        device = self._execution_device
        batch = len(prompts)

        prompt_embeds, pooled, _ = self.encode_prompt(
            prompt=prompts, prompt_2=None, device=device, max_sequence_length=max_sequence_length
        )
        dtype = prompt_embeds.dtype
        ref_tokens, ref_hws = self.encode_references(refs, ref_h, ref_w, batch, device, dtype)

        lat_c = cfg.flux["in_channels"] // 4
        lh, lw = 2 * (height // mult), 2 * (width // mult)
        noise = randn_tensor((batch, lat_c, lh, lw), generator=generator, device=device, dtype=dtype)
        latents, target_hw = pack_latents(noise)

        sigmas = np.linspace(1.0, 1 / steps, steps)
        sched = self.scheduler.config
        mu = None
        if sched.get("use_dynamic_shifting", False):
            mu = calculate_shift(
                latents.shape[1], sched.get("base_image_seq_len", 256), sched.get("max_image_seq_len", 4096),
                sched.get("base_shift", 0.5), sched.get("max_shift", 1.15),
            )
        timesteps, _ = retrieve_timesteps(self.scheduler, steps, device, sigmas=sigmas, mu=mu)
        guidance = torch.full((batch,), float(guidance_scale), device=device) if cfg.flux.get("guidance_embeds") else None

        for t in timesteps:
            v = self.transformer(
                latents, ref_tokens or None, prompt_embeds, pooled, t.expand(batch).to(dtype) / 1000, guidance,
                target_hw=target_hw, ref_hws=ref_hws or None, categories=categories,
                descriptor_tokens=descriptor_tokens,
            )
            latents = self.scheduler.step(v, t, latents, return_dict=False)[0]

        if output_type == "latent":
            return MCImagePipelineOutput(images=latents)
        spatial = FluxPipeline._unpack_latents(latents, height, width, self.vae_scale_factor)
        spatial = spatial / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)
        pixels = self.vae.decode(spatial.to(self.vae.dtype), return_dict=False)[0]
        images = ((pixels.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return MCImagePipelineOutput(images=images)
        return MCImagePipelineOutput(images=[Image.fromarray((im * 255).round().astype(np.uint8)) for im in images])
