"""MCImagePipeline: prompt + reference images -> image on FLUX with MultiCrafter / One-for-All.

Prompt encoding, latent packing, ids and the timestep schedule are diffusers' FluxPipeline's
(its methods are reused, not copied). Each reference is fitted on a white canvas, VAE-encoded
(distribution mode, FLUX scaling/shift), packed 2x2 and passed to `MCImageTransformer` as clean
context tokens at every Euler step. Guidance is FLUX's distilled guidance embedding; FluxPipeline's
true CFG (`negative_prompt` with `true_cfg_scale` > 1) adds a second pass when asked for.

`__call__` takes FluxPipeline's arguments (generator(s), latents, prompt_embeds, num_images_per_prompt,
output_type, return_dict, callbacks, joint_attention_kwargs) after our `refs` and `categories`; a seed
is the caller's business: `generator=torch.Generator().manual_seed(seed)`.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, FluxPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import get_module_execution_device, randn_tensor
from PIL import Image

from idcrafter.core.positions import canonical_category, parse_descriptor_markup, tokenize_with_descriptors
from idcrafter.utils.io import atomic_write_dir
from idcrafter.utils.media import RGB_CONVERTIBLE_MODES, fit_on_canvas, image_to_tensor, load_image, to_rgb
from mcimage.config import ADAPTER_SUBFOLDER, MCImageConfig, check_categories
from mcimage.transformer import MCImageTransformer, pack_latents, resolve_model_path

__all__ = [
    "ADAPTER_SUBFOLDER",
    "OUTPUT_TYPES",
    "PIPELINE_MODULE",
    "SUPPORTED_IMAGE_MODES",
    "MCImagePipeline",
    "MCImagePipelineOutput",
    "load_component",
    "prompt_descriptors",
]


# What `MCImagePipeline.__call__` returns, as FluxPipeline: PIL images, arrays [B, H, W, 3] or tensors
# [B, 3, H, W] in [0, 1], or the packed latents.
OUTPUT_TYPES = ("pil", "np", "pt", "latent")

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


def _batched(value, n: int, name: str) -> list[str] | None:
    """None, one string for all `n` prompts, or a list of `n` strings -> None or a list of `n`
    strings (FluxPipeline's prompt_2 / negative_prompt, broadcast over the batch). Raises ValueError."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value] * n
    if isinstance(value, list) and len(value) == n and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{name} must be a string or a list of {n} strings (one per prompt), got {value!r:.80}")


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
    """images: list of PIL ("pil"), np.ndarray [B, H, W, 3] ("np") or torch.Tensor [B, 3, H, W] ("pt") in
    [0, 1], or packed latents [B, L, 4C] ("latent")."""

    images: list | np.ndarray | torch.Tensor


class MCImagePipeline(DiffusionPipeline):
    """FLUX text-to-image with multi-subject references (MultiCrafter / One-for-All)."""

    # FluxPipeline's order less its image encoder. The VAE also encodes the references before the
    # denoising loop, so under model offload it stays on the accelerator until the decode (as in
    # FluxKontextPipeline, whose VAE encodes its context image).
    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->vae"
    # Tensors a step-end callback may read and replace (FluxPipeline's).
    _callback_tensor_inputs = ["latents", "prompt_embeds"]

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
        # As FluxPipeline: packing makes the pixel grid a multiple of 2 x the VAE factor.
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)
        # Text encoders may be None when prompts come as prompt_embeds (FluxPipeline's fallback: 77).
        self.tokenizer_max_length = tokenizer.model_max_length if tokenizer is not None else 77
        self.default_sample_size = 128

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
            FileFormatError: `base` is not a local folder (nor a Hugging Face id in the local cache).
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
    def check_inputs(
        self,
        prompt,
        refs: Sequence,
        categories,
        height: int,
        width: int,
        prompt_2=None,
        negative_prompt=None,
        negative_prompt_2=None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] | None = None,
        max_sequence_length: int | None = None,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
    ) -> None:
        """FluxPipeline's checks (prompt xor prompt_embeds, pooled embeds with embeds, callback
        tensors, max_sequence_length <= 512) plus ours (size multiple of 2 x the VAE factor,
        references and categories against the model, equal batch lengths). Raises ValueError."""
        cfg = self.mc_config
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("give prompt or prompt_embeds, not both")
        if prompt_2 is not None and prompt_embeds is not None:
            raise ValueError("give prompt_2 or prompt_embeds, not both")
        if prompt is None and prompt_embeds is None:
            raise ValueError("give a prompt or prompt_embeds (with pooled_prompt_embeds)")
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
                raise ValueError("prompt must be a string or a non-empty list of strings")
            _batched(prompt_2, len(prompts), "prompt_2")
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("prompt_embeds need pooled_prompt_embeds (the pooled CLIP state of the same prompts)")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("give negative_prompt or negative_prompt_embeds, not both")
        if negative_prompt_2 is not None and negative_prompt_embeds is not None:
            raise ValueError("give negative_prompt_2 or negative_prompt_embeds, not both")
        if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
            raise ValueError("negative_prompt_embeds need negative_pooled_prompt_embeds")
        batch = len(prompts) if prompt is not None else prompt_embeds.shape[0]
        _batched(negative_prompt, batch, "negative_prompt")
        _batched(negative_prompt_2, batch, "negative_prompt_2")
        if negative_prompt_embeds is not None and negative_prompt_embeds.shape[0] != batch:
            raise ValueError(f"negative_prompt_embeds has {negative_prompt_embeds.shape[0]} rows for {batch} prompts")
        bad = [k for k in callback_on_step_end_tensor_inputs or () if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs must be in {self._callback_tensor_inputs}, got {bad}")
        if max_sequence_length is not None and not 0 < max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length must be in [1, 512], got {max_sequence_length}")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
                or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(map(repr, OUTPUT_TYPES))}, got {output_type!r}")
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
        return to_rgb(ref, what=f"reference {k}")  # FileFormatError (a ValueError) for modes with no RGB reading

    def _latent_affine(self) -> tuple[float, float]:
        """FLUX's latent normalisation z' = (z - shift) * scaling; identity for codecs without one."""
        c = self.vae.config
        return float(c.get("scaling_factor") or 1.0), float(c.get("shift_factor") or 0.0)

    def encode_references(self, refs: Sequence, height: int, width: int, batch: int, device, dtype):
        """Fit each reference on a white height x width canvas, VAE-encode and pack.

        The pixels go to the VAE's execution device (its offload hook's when offloaded); the tokens
        come back on `device` in `dtype`. Returns (tokens: N x [batch, L_k, C], grids: N x (h_k, w_k)).
        """
        tokens, grids = [], []
        scaling, shift = self._latent_affine()
        vae_device = get_module_execution_device(self.vae)
        for k, ref in enumerate(refs):
            pixels = image_to_tensor(fit_on_canvas(self._to_image(ref, k), height, width))[None]
            latents = self.vae.encode(pixels.to(device=vae_device, dtype=self.vae.dtype)).latent_dist.mode()
            latents = (latents - shift) * scaling
            packed, grid = pack_latents(latents.to(device=device, dtype=dtype))
            tokens.append(packed.expand(batch, -1, -1))
            grids.append(grid)
        return tokens, grids

    def _text_inputs(
        self, prompt, prompt_2, prompt_embeds, pooled_prompt_embeds, categories, num_images_per_prompt: int,
        max_sequence_length: int, device, ccpa: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, list[int]] | None]:
        """(T5 states [B*n, L, D], pooled CLIP [B*n, P], descriptor tokens of the markup or None).

        Markup is stripped from both prompts; the descriptor positions come from the T5 prompt
        (`prompt_2` when given, else `prompt`), the one whose tokens they index. Given embeddings
        skip the text encoders and are repeated per image as `encode_prompt` repeats its own.
        """
        if prompt_embeds is not None:
            n = num_images_per_prompt
            return prompt_embeds.repeat_interleave(n, 0).to(device), pooled_prompt_embeds.repeat_interleave(n, 0).to(
                device), None
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        t5 = _batched(prompt_2, len(prompts), "prompt_2") or prompts
        t5, marked = prompt_descriptors(t5, self.tokenizer_2, max_sequence_length, categories, ccpa)
        clip = t5 if prompt_2 is None else prompt_descriptors(prompts, None, max_sequence_length, None, False)[0]
        embeds, pooled, _ = self.encode_prompt(
            prompt=clip, prompt_2=t5, device=device, num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length,
        )
        return embeds, pooled, marked

    def prepare_latents(
        self, batch: int, height: int, width: int, dtype, device, generator, latents: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Packed initial latents [batch, (h/2)*(w/2), 4C] and their grid (h/2, w/2), h = 2 * (height
        // (2 * vae_scale_factor)). Noise is FluxPipeline's: randn_tensor of the unpacked shape
        [batch, C, h, w], then packed. Given `latents` may be packed [batch, L, 4C] (what FluxPipeline
        takes) or unpacked [batch, C, h, w]. Raises ValueError for latents or a generator list that
        do not fit."""
        lat_c = self.transformer.config.in_channels // 4
        mult = self.vae_scale_factor * 2
        lh, lw = 2 * (height // mult), 2 * (width // mult)
        grid = (lh // 2, lw // 2)
        if latents is None:
            if isinstance(generator, list) and len(generator) != batch:
                raise ValueError(f"{len(generator)} generators for a batch of {batch} images (prompts x "
                                 "num_images_per_prompt): give one per image")
            noise = randn_tensor((batch, lat_c, lh, lw), generator=generator, device=device, dtype=dtype)
            return pack_latents(noise)[0], grid
        packed_shape, spatial_shape = (batch, grid[0] * grid[1], 4 * lat_c), (batch, lat_c, lh, lw)
        if tuple(latents.shape) == spatial_shape:
            latents = pack_latents(latents)[0]
        elif tuple(latents.shape) != packed_shape:
            raise ValueError(f"latents must be packed {list(packed_shape)} or unpacked {list(spatial_shape)} for "
                             f"{batch} images of {height}x{width}, got {list(latents.shape)}")
        return latents.to(device=device, dtype=dtype), grid

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, height: int, width: int, output_type: str):
        """Packed latents [B, L, 4C] -> images as `output_type` ("pil", "np" [B, H, W, 3] or "pt"
        [B, 3, H, W], in [0, 1]), through the VAE on its execution device."""
        spatial = FluxPipeline._unpack_latents(latents, height, width, self.vae_scale_factor)
        scaling, shift = self._latent_affine()
        spatial = spatial / scaling + shift
        spatial = spatial.to(device=get_module_execution_device(self.vae), dtype=self.vae.dtype)
        pixels = self.vae.decode(spatial, return_dict=False)[0]
        return self.image_processor.postprocess(pixels, output_type=output_type)

    # ------------------------------------------------------------------ sampling
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def joint_attention_kwargs(self) -> dict | None:
        return self._joint_attention_kwargs

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def current_timestep(self):
        return self._current_timestep

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        refs: Sequence | None = (),
        categories: Sequence[str] | None = None,
        *,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        max_sequence_length: int | None = None,
        ref_size: tuple[int, int] | None = None,
        descriptor_tokens: Mapping[str, Sequence[int]] | None = None,
    ) -> MCImagePipelineOutput | tuple:
        """Generate images with the given references (shared by the batch), with the arguments of
        diffusers' `FluxPipeline.__call__` (after ours, `refs` and `categories`, keyword-only).

        Ours:
            refs: paths, PIL images or uint8 arrays (any mode `to_rgb` handles, incl. 16-bit and
                CMYK), fitted on a white `ref_size` canvas (default config.ref_size, else the target
                size); categories: one per reference (required by condition ids).
            prompt: may carry descriptor markup, `a man <face>with short hair</face>`. Tags are
                stripped before encoding; with `config.ccpa` the descriptor's T5 tokens go to their
                reference's centroid (eq. 3). The positions are shared by the batch: every prompt
                must mark the same tokens (see `prompt_descriptors`). With `prompt_2` the markup of
                `prompt_2` (the T5 prompt) places them.
            descriptor_tokens: {category: T5 token indices}, an alternative to markup (the way to
                place descriptors with `prompt_embeds`).
            num_inference_steps, guidance_scale: default to the config's recipe (MCImageConfig).
            height, width: default `default_sample_size * vae_scale_factor` (1024 on FLUX), as
                FluxPipeline; they must be multiples of 2 x vae_scale_factor (an error, no rounding).
            max_sequence_length: T5 tokens (default min(512, tokenizer_2.model_max_length)).

        As FluxPipeline: prompt_2 (T5 prompt); negative_prompt / negative_prompt_2 /
        negative_prompt_embeds with `true_cfg_scale` > 1 run true CFG, a second transformer pass per
        step (same references, the negative prompt's own markup), v = v_neg + s (v - v_neg); FLUX.1
        models are guidance-distilled, so `guidance_scale` (the distilled embedding) is the usual
        knob. num_images_per_prompt; generator: a torch.Generator or one per image (None: the global
        RNG, nondeterministic); latents: packed [B, L, 4C] or unpacked [B, C, h, w] initial noise;
        prompt_embeds + pooled_prompt_embeds skip the text encoders; output_type "pil", "np", "pt"
        or "latent" (packed); return_dict=False returns (images,); joint_attention_kwargs go to the
        transformer's attention processors; callback_on_step_end(pipe, step, timestep,
        callback_kwargs) after each step with the tensors named in
        callback_on_step_end_tensor_inputs (of `_callback_tensor_inputs`), returning a dict whose
        "latents" / "prompt_embeds" replace the pipeline's; `pipe.interrupt` set by a callback
        skips the remaining steps. The progress bar follows `set_progress_bar_config`.

        Raises:
            ValueError: inconsistent or unusable inputs (see `check_inputs`), bad references.
            TypeError: an unknown keyword argument (nothing is silently ignored).
        """
        cfg = self.mc_config
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        refs = list(refs or ())
        self.check_inputs(
            prompt, refs, categories, height, width, prompt_2=prompt_2, negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length, num_images_per_prompt=num_images_per_prompt,
            output_type=output_type,
        )
        if max_sequence_length is None:
            max_sequence_length = min(512, int(self.tokenizer_2.model_max_length)) if self.tokenizer_2 is not None else 512
        ref_h, ref_w = ref_size or cfg.ref_size or (height, width)
        mult = self.vae_scale_factor * 2
        if ref_h % mult or ref_w % mult:
            raise ValueError(f"ref_size must be multiples of {mult}, got {ref_h}x{ref_w}")
        self._guidance_scale = cfg.guidance_scale if guidance_scale is None else guidance_scale
        self._joint_attention_kwargs = joint_attention_kwargs
        self._current_timestep = None
        self._interrupt = False

        device = self._execution_device
        batch = len([prompt] if isinstance(prompt, str) else prompt) if prompt is not None else prompt_embeds.shape[0]
        total = batch * num_images_per_prompt
        prompt_embeds, pooled_prompt_embeds, marked = self._text_inputs(
            prompt, prompt_2, prompt_embeds, pooled_prompt_embeds, categories, num_images_per_prompt,
            max_sequence_length, device, cfg.ccpa,
        )
        if marked is not None:
            if descriptor_tokens:
                raise ValueError("give descriptor markup in the prompt or descriptor_tokens, not both")
            descriptor_tokens = marked
        has_negative = negative_prompt is not None or negative_prompt_embeds is not None
        do_true_cfg = true_cfg_scale > 1 and has_negative
        negative_descriptors = None
        if do_true_cfg:
            negative_prompt_embeds, negative_pooled_prompt_embeds, negative_descriptors = self._text_inputs(
                _batched(negative_prompt, batch, "negative_prompt"), _batched(negative_prompt_2, batch, "negative_prompt_2"),
                negative_prompt_embeds, negative_pooled_prompt_embeds, categories, num_images_per_prompt,
                max_sequence_length, device, cfg.ccpa,
            )
        dtype = prompt_embeds.dtype
        ref_tokens, ref_hws = self.encode_references(refs, ref_h, ref_w, total, device, dtype)
        latents, target_hw = self.prepare_latents(total, height, width, dtype, device, generator, latents)

        steps = num_inference_steps or cfg.num_inference_steps
        if sigmas is None and not self.scheduler.config.get("use_flow_sigmas", False):
            sigmas = np.linspace(1.0, 1 / steps, steps)
        sched = self.scheduler.config
        mu = None
        if sched.get("use_dynamic_shifting", False):
            mu = calculate_shift(
                latents.shape[1], sched.get("base_image_seq_len", 256), sched.get("max_image_seq_len", 4096),
                sched.get("base_shift", 0.5), sched.get("max_shift", 1.15),
            )
        timesteps, steps = retrieve_timesteps(self.scheduler, steps, device, sigmas=sigmas, mu=mu)
        num_warmup_steps = max(len(timesteps) - steps * self.scheduler.order, 0)
        self._num_timesteps = len(timesteps)
        guidance = (
            torch.full((total,), float(self._guidance_scale), device=device) if cfg.flux.get("guidance_embeds") else None
        )
        ref_kwargs = dict(target_hw=target_hw, ref_hws=ref_hws or None, categories=categories,
                          joint_attention_kwargs=self._joint_attention_kwargs)

        # As FluxPipeline: the step index from 0, without a device-to-host lookup of the timestep.
        self.scheduler.set_begin_index(0)
        with self.progress_bar(total=steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                timestep = t.expand(total).float() / 1000
                # Where the loop is, for the caches of diffusers' `transformer.enable_cache(...)`.
                with self.transformer.cache_context("cond", step_index=i, num_inference_steps=steps, timestep=t):
                    v = self.transformer(
                        latents, ref_tokens or None, prompt_embeds, pooled_prompt_embeds, timestep, guidance,
                        descriptor_tokens=descriptor_tokens, **ref_kwargs,
                    )
                if do_true_cfg:
                    with self.transformer.cache_context("uncond", step_index=i, num_inference_steps=steps, timestep=t):
                        v_neg = self.transformer(
                            latents, ref_tokens or None, negative_prompt_embeds, negative_pooled_prompt_embeds,
                            timestep, guidance, descriptor_tokens=negative_descriptors, **ref_kwargs,
                        )
                    v = v_neg + true_cfg_scale * (v - v_neg)
                latents = self.scheduler.step(v, t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    tensors = {"latents": latents, "prompt_embeds": prompt_embeds}
                    outputs = callback_on_step_end(self, i, t, {k: tensors[k] for k in callback_on_step_end_tensor_inputs})
                    latents = outputs.pop("latents", latents)
                    prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
        self._current_timestep = None

        images = latents if output_type == "latent" else self.decode_latents(latents, height, width, output_type)
        # Offload every model again (enable_model_cpu_offload) and reset the transformer's caches.
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return MCImagePipelineOutput(images=images)
