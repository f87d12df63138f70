"""MCImagePipeline: prompt + reference images -> image on FLUX with MultiCrafter / One-for-All.

Prompt encoding, latent packing, ids and the timestep schedule are diffusers' FluxPipeline's
(its methods are reused, not copied). Each reference is fitted on a white canvas, VAE-encoded
(distribution mode, FLUX scaling/shift), packed 2x2 and passed to `MCImageTransformer` as clean
context tokens at every Euler step. Guidance is FLUX's distilled guidance embedding (no CFG pass).

Prompts may mark item descriptors, `a man <face>with short hair</face>`: the tags are always
stripped before text encoding; with `config.ccpa` the descriptor's T5 tokens are placed at their
category's reference centroid (docs/design.md 3.5, eq. 3).

On disk a pipeline is a diffusers folder whose transformer/ is an `MCImageTransformer` (FLUX's
weights, adapter and DAM weights, MCImageConfig in its config.json), written by diffusers' own
`save_pretrained` (variant, sharding) plus a one-line module file that lets diffusers find this class:

    pipe.save_pretrained("out/model")            # tokenizer .. scheduler, model_index.json, mcimage_pipeline.py
    pipe = MCImagePipeline.from_pretrained("out/model")
    pipe = DiffusionPipeline.from_pretrained("out/model", trust_remote_code=True)   # the same pipeline
    pipe = MCImagePipeline.from_pretrained("FLUX.1-Kontext-dev", config=MCImageConfig.from_preset("one-for-all"))

The older layout, a stock FLUX folder plus `mcimage_adapter/` (the built-in toy model, and a base
model with an adapter that training exported), loads by the same call through one conversion
(`MCImageTransformer.from_pretrained`).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from idcrafter.core.positions import canonical_category, parse_descriptor_markup, tokenize_with_descriptors
from idcrafter.utils.io import atomic_write_dir
from idcrafter.utils.media import RGB_CONVERTIBLE_MODES, fit_on_canvas, image_to_tensor, load_image, to_rgb
from mcimage.config import ADAPTER_SUBFOLDER, MCImageConfig, check_categories
from mcimage.transformer import MCImageTransformer, pack_latents, resolve_model_path

__all__ = [
    "ADAPTER_SUBFOLDER",
    "PIPELINE_MODULE",
    "SUPPORTED_IMAGE_MODES",
    "MCImagePipeline",
    "MCImagePipelineOutput",
    "load_component",
    "prompt_descriptors",
]


# PIL modes `to_rgb` converts faithfully (16-bit greyscale is rescaled, alpha composited on white).
SUPPORTED_IMAGE_MODES = RGB_CONVERTIBLE_MODES

# Components of a FLUX diffusers folder and the classes FLUX.1-dev ships, used when a folder has
# no model_index.json entry for one.
_FLUX_COMPONENTS: dict[str, tuple[str, str]] = {
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "tokenizer_2": ("transformers", "T5TokenizerFast"),
    "text_encoder_2": ("transformers", "T5EncoderModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "transformer": ("diffusers", "FluxTransformer2DModel"),
    "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
}
# The module file `save_pretrained` writes into a pipeline folder, named by model_index.json's
# "_class_name": [module, class]; diffusers' DiffusionPipeline.from_pretrained imports the class from it.
PIPELINE_MODULE = "mcimage_pipeline"
_PIPELINE_MODULE_SOURCE = '''"""Makes diffusers' DiffusionPipeline.from_pretrained(this folder, trust_remote_code=True) return an
MCImagePipeline: model_index.json names ["mcimage_pipeline", "MCImagePipeline"]. The class itself
is in the installed `mcimage` package; this file only points at it."""

from mcimage.pipeline import MCImagePipeline

__all__ = ["MCImagePipeline"]
'''
# Packages a model_index.json may name a class from. Importing a module runs its code, so a folder
# downloaded from elsewhere must not be able to pick an arbitrary one.
_TRUSTED_LIBRARIES = ("diffusers", "transformers", "idcrafter", "mcimage")


def _has_variant(folder: Path, variant: str | None) -> bool:
    """Whether `folder` holds weights of `variant` ("model.fp16.safetensors", sharded or not): diffusers
    passes a pipeline's variant only to such components (`_identify_model_variants`)."""
    return variant is not None and folder.is_dir() and any(
        len(f.name.split(".")) > 2 and f.name.split(".")[1].startswith(variant) for f in folder.iterdir()
    )


def load_component(
    folder: str | Path, name: str, library: str, class_name: str, torch_dtype: torch.dtype | None = None,
    variant: str | None = None,
):
    """Load `folder/name` with the class `library.class_name` (a model_index.json entry).

    Any class with `from_pretrained` works: stock diffusers / transformers classes, and custom
    codecs behind the VAE interface given by module path (`["idcrafter.toyworld.codec",
    "PixelUnshuffleCodec"]`). `torch_dtype` applies to torch modules only (tokenizers and
    schedulers take none), and so does `variant` (diffusers and transformers models; a component
    without files of that variant loads its default files, as in diffusers). Raises ValueError for
    a library outside the trusted packages or a missing class, FileNotFoundError for a missing
    subfolder.
    """
    path = Path(folder) / name
    where = f"{Path(folder)}: component {name!r} ({library}.{class_name})"
    if not isinstance(library, str) or library.split(".")[0] not in _TRUSTED_LIBRARIES:
        raise ValueError(f"{where}: library must be in one of the packages {', '.join(_TRUSTED_LIBRARIES)}")
    try:
        module = importlib.import_module(library)
    except ImportError as err:
        raise ValueError(f"{where}: cannot import {library} ({err})") from None
    cls = getattr(module, str(class_name), None)
    if not isinstance(cls, type) or not hasattr(cls, "from_pretrained"):
        raise ValueError(f"{where}: {library} has no loadable class {class_name!r}")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: missing {name}/ subfolder")
    kwargs = {}
    if issubclass(cls, torch.nn.Module):
        if torch_dtype is not None:
            # transformers >= 5 names the argument `dtype`, diffusers `torch_dtype`.
            kwargs["dtype" if cls.__module__.startswith("transformers") else "torch_dtype"] = torch_dtype
        if _has_variant(path, variant):
            kwargs["variant"] = variant
    return cls.from_pretrained(path, **kwargs)


def _read_model_index(folder: Path) -> dict[str, tuple[str, str]]:
    """{component: (library, class)} from folder/model_index.json, FLUX.1-dev's classes when absent."""
    path = folder / "model_index.json"
    classes = dict(_FLUX_COMPONENTS)
    if not path.is_file():
        return classes
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable model index ({err})") from None
    for name in _FLUX_COMPONENTS:
        entry = index.get(name)
        if entry is None:
            continue
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(v, str) for v in entry)):
            raise ValueError(f"{path}: entry {name!r} must be [library, class], got {entry!r}")
        classes[name] = (entry[0], entry[1])
    return classes


def prompt_descriptors(
    prompts: Sequence[str],
    tokenizer,
    max_length: int,
    categories: Sequence[str] | None,
    ccpa: bool,
) -> tuple[list[str], dict[str, list[int]] | None]:
    """Strip descriptor markup from every prompt; with CCPA, its T5 token indices.

    Returns (clean prompts, {category: token indices} or None). The indices are shared by the
    whole batch (the transformer takes one `txt_ids` for all rows), so every prompt of a batch
    must put its descriptors on the same tokens; prompts that differ there go in separate calls.
    Without CCPA the tags are stripped and ignored. Raises ValueError for malformed markup, markup
    naming a category with no reference (CCPA only), or prompts of one batch that disagree.
    """
    clean, found = [], []
    for k, prompt in enumerate(prompts):
        try:
            text, spans = parse_descriptor_markup(prompt)
        except ValueError as err:
            raise ValueError(f"prompt {k}: descriptor markup: {err}") from None
        clean.append(text)
        found.append(spans)
    if not ccpa or not any(found):
        return clean, None
    have = {canonical_category(c) for c in categories or ()}
    per_prompt = []
    for k, (prompt, spans) in enumerate(zip(prompts, found)):
        for span in spans:
            if span.category not in have:
                raise ValueError(
                    f"prompt {k}: descriptor markup names category {span.category!r} but no reference has "
                    f"that category (reference categories: {', '.join(sorted(have)) or 'none'})"
                )
        try:
            _, tokens = tokenize_with_descriptors(tokenizer, prompt, max_length=max_length)
        except ValueError as err:
            raise ValueError(f"prompt {k}: {err}") from None
        per_prompt.append(tokens)
    if any(tokens != per_prompt[0] for tokens in per_prompt[1:]):
        raise ValueError(
            "prompts of one batch put their descriptor markup on different tokens; the descriptor positions "
            "are shared by the batch, so generate such prompts in separate calls"
        )
    return clean, per_prompt[0]


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
        # AutoencoderKL reports its downsampling through its blocks; codecs behind the same
        # interface (no blocks) give it as scale_factor_spatial.
        scale = vae.config.get("scale_factor_spatial") or 2 ** (len(vae.config.block_out_channels) - 1)
        self.vae_scale_factor = int(scale)
        self.tokenizer_max_length = tokenizer.model_max_length

    # ------------------------------------------------------------------ construction / IO
    @classmethod
    def from_components(cls, components: dict) -> MCImagePipeline:
        return cls(**components)

    @classmethod
    def from_pretrained(
        cls,
        base: str | Path,
        adapter: str | Path | None = None,
        config: MCImageConfig | None = None,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
    ) -> MCImagePipeline:
        """Load a FLUX diffusers folder (FLUX.1-dev, Kontext, or one `save_pretrained` wrote) [+ an adapter].

        Each component is loaded with the (library, class) its model_index.json names, so custom
        codecs in place of the VAE load too. The transformer is `MCImageTransformer.from_pretrained`:
        a folder `save_pretrained` wrote holds its config and adapter; a stock FLUX transformer/ is
        converted, with `adapter` (default `base/mcimage_adapter` when that exists: the older
        layout), whose saved config wins, or else with fresh modules of `config` (default
        `MCImageConfig()`), which start at zero contribution: the result is then the base model.
        An `adapter` given with a folder of the current layout replaces its adapter. Either way the
        architecture is the loaded transformer's. `torch_dtype` (default float32) applies to the
        text encoders and the transformer (MoE-LoRA stays float32); the VAE stays float32.
        `variant` picks the weights files of that variant (diffusers' `variant`).

        diffusers' own `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` also returns
        this class for a folder `save_pretrained` wrote (see `save_pretrained`), with equal output.

        Raises:
            InputError: `base` is not a local folder (nor a Hugging Face id in the local cache).
            FileNotFoundError: `base` has no transformer/ subfolder (or another component's), or
                `adapter` does not exist.
            ValueError: a broken adapter (unreadable config or weights, or weights that do not fit
                the base transformer) or an unusable model_index.json entry.
        """
        base = resolve_model_path(base, "base")
        torch_dtype = torch_dtype or torch.float32  # weights may be stored in half precision
        if not (base / "transformer").is_dir():
            raise FileNotFoundError(f"{base} is not a FLUX diffusers folder (no transformer/ subfolder)")
        classes = _read_model_index(base)
        transformer = MCImageTransformer.from_pretrained(
            base, subfolder="transformer", adapter=adapter, mc_config=config, torch_dtype=torch_dtype,
            **({"variant": variant} if _has_variant(base / "transformer", variant) else {}),
        )
        parts = {
            name: load_component(base, name, *classes[name], torch_dtype=torch_dtype, variant=variant)
            for name in ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
        }
        vae = load_component(base, "vae", *classes["vae"], torch_dtype=torch.float32, variant=variant)
        scheduler = load_component(base, "scheduler", *classes["scheduler"])
        return cls(
            parts["tokenizer"], parts["text_encoder"].eval(), parts["tokenizer_2"], parts["text_encoder_2"].eval(),
            vae.eval(), transformer.eval(), scheduler,
        )

    def save_pretrained(
        self,
        folder: str | Path,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
    ) -> Path:
        """Write the pipeline with diffusers' `DiffusionPipeline.save_pretrained` (variant, sharding).

        transformer/ is the `MCImageTransformer` folder: FLUX's weights, the adapter and DAM weights,
        and the MCImageConfig in its config.json. model_index.json names the transformer
        ["mcimage.transformer", "MCImageTransformer"] and the pipeline ["mcimage_pipeline",
        "MCImagePipeline"], with `mcimage_pipeline.py` written next to it: that module imports this
        class, which is how diffusers' `DiffusionPipeline.from_pretrained(folder,
        trust_remote_code=True)` finds it (diffusers runs a folder's module file only when trusted).
        The folder appears complete or not at all.
        """
        folder = Path(folder)
        with atomic_write_dir(folder) as tmp:
            DiffusionPipeline.save_pretrained(
                self, tmp, safe_serialization=safe_serialization, variant=variant, max_shard_size=max_shard_size
            )
            index_path = tmp / "model_index.json"
            index = json.loads(index_path.read_text())
            index["_class_name"] = [PIPELINE_MODULE, type(self).__name__]
            index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            (tmp / f"{PIPELINE_MODULE}.py").write_text(_PIPELINE_MODULE_SOURCE)
        return folder

    @property
    def mc_config(self) -> MCImageConfig:
        return self.transformer.mc_config

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
        check_categories(cfg, len(refs), categories)

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
        return to_rgb(ref, what=f"reference {k}")  # InputError (a ValueError) for modes with no RGB reading

    def _latent_affine(self) -> tuple[float, float]:
        """FLUX's latent normalisation z' = (z - shift) * scaling; identity for codecs without one."""
        c = self.vae.config
        return float(c.get("scaling_factor") or 1.0), float(c.get("shift_factor") or 0.0)

    def encode_references(self, refs: Sequence, height: int, width: int, batch: int, device, dtype):
        """Fit each reference on a white height x width canvas, VAE-encode and pack: (tokens, grids)."""
        tokens, grids = [], []
        scaling, shift = self._latent_affine()
        for k, ref in enumerate(refs):
            pixels = image_to_tensor(fit_on_canvas(self._to_image(ref, k), height, width))[None]
            latents = self.vae.encode(pixels.to(device=device, dtype=self.vae.dtype)).latent_dist.mode()
            latents = (latents - shift) * scaling
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
        max_sequence_length: int | None = None,
        descriptor_tokens: Mapping[str, Sequence[int]] | None = None,
    ) -> MCImagePipelineOutput:
        """Generate one image per prompt with the given references (shared by the batch).

        prompt: a string or a list (the batch); may carry descriptor markup,
            `a man <face>with short hair</face>`. Tags are stripped before encoding; with
            `config.ccpa` the descriptor tokens go to their reference's centroid (eq. 3). The
            positions are shared by the batch: every prompt must mark the same tokens (see
            `prompt_descriptors`).
        refs: paths, PIL images or uint8 arrays (any mode `to_rgb` handles, incl. 16-bit and CMYK);
        categories: one per reference (required by condition ids); ref_size: (h, w) canvas of the
        references (default: config.ref_size, else the target size); seed: used when no generator is given.
        max_sequence_length: T5 tokens (default min(512, tokenizer_2.model_max_length)).
        descriptor_tokens: {category: T5 token indices}, an alternative to markup.
        """
        cfg = self.mc_config
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        refs = list(refs)
        self.check_inputs(prompts, refs, categories, height, width)
        if max_sequence_length is None:
            max_sequence_length = min(512, int(self.tokenizer_2.model_max_length))
        prompts, marked = prompt_descriptors(prompts, self.tokenizer_2, max_sequence_length, categories, cfg.ccpa)
        if marked is not None:
            if descriptor_tokens:
                raise ValueError("give descriptor markup in the prompt or descriptor_tokens, not both")
            descriptor_tokens = marked
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
        ref_h, ref_w = ref_size or cfg.ref_size or (height, width)
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

        for i, t in enumerate(timesteps):
            # Where the loop is, for the caches of diffusers' `transformer.enable_cache(...)`.
            with self.transformer.cache_context("cond", step_index=i, num_inference_steps=steps, timestep=t):
                v = self.transformer(
                    latents, ref_tokens or None, prompt_embeds, pooled, t.expand(batch).float() / 1000, guidance,
                    target_hw=target_hw, ref_hws=ref_hws or None, categories=categories,
                    descriptor_tokens=descriptor_tokens,
                )
            latents = self.scheduler.step(v, t, latents, return_dict=False)[0]

        if output_type == "latent":
            return MCImagePipelineOutput(images=latents)
        spatial = FluxPipeline._unpack_latents(latents, height, width, self.vae_scale_factor)
        scaling, shift = self._latent_affine()
        spatial = spatial / scaling + shift
        pixels = self.vae.decode(spatial.to(self.vae.dtype), return_dict=False)[0]
        images = ((pixels.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return MCImagePipelineOutput(images=images)
        return MCImagePipelineOutput(images=[Image.fromarray((im * 255).round().astype(np.uint8)) for im in images])
