"""IDCrafterPipeline: text + reference images -> video on Wan 2.1 with ID-Crafter.

Flow-matching Euler sampling with the Wan shift and three-pass guidance (docs/design.md 4):

    v = v_uncond + s_img * (v_ref - v_uncond) + s_txt * (v_ref_txt - v_ref)

v_uncond sees neither subjects nor the prompt (the negative prompt stands in for text), v_ref sees
the subjects only, v_ref_txt both. The subject stream (stages 1-2 and stage-3 keys/values) and the
text/VLM conditioning are computed once per call and reused by every step and pass.

With the VLM encoder (ID-Crafter Sec. 3.2), each pass's VLM tokens come from exactly what that pass
conditions on, the same inputs training's condition dropout gives the VLM
(`VideoTrainingSpec.vlm_conditions`):
    v_uncond   no VLM token: no subject, no prompt (its stage 3 has no key and adds nothing)
    v_ref      VLM(references, empty prompt)
    v_ref_txt  VLM(references, prompt)
and without references the text pass reads VLM(prompt, no images), the negative pass nothing.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput
from PIL import Image
from transformers import AutoTokenizer, UMT5EncoderModel

from idcrafter.utils.cli import InputError
from idcrafter.utils.io import atomic_write_dir
from idcrafter.utils.media import fit_on_canvas, image_to_tensor, load_image, read_video
from idcrafter.video.attention import LayerKV, SubjectStream
from idcrafter.video.config import (
    ADAPTER_CONFIG,
    ADAPTER_SUBFOLDER,
    IDCrafterConfig,
    VideoLimits,
    local_model_folder,
    read_model_config,
    vae_scale_factors,
)
from idcrafter.video.transformer import IDCrafterTransformer, to_velocity

# The module `save_pretrained` writes into a pipeline folder (model_index.json names it).
PIPELINE_MODULE = "idcrafter_pipeline"
_COMPONENTS = ("tokenizer", "text_encoder", "vae", "transformer", "scheduler", "vlm")
_MODEL_OPTIONS = ("variant", "use_safetensors", "low_cpu_mem_usage")


def pipeline_module_source(pipeline_class: type, index: dict) -> str:
    """The module diffusers runs (with trust_remote_code=True) to find the pipeline class: imports from
    the installed package only, the pipeline's module and every component module that model_index.json
    names by module path (diffusers resolves those from the imported modules)."""
    libraries = sorted({v[0] for k, v in index.items() if not k.startswith("_") and isinstance(v, list)
                        and isinstance(v[0], str) and "." in v[0]})
    lines = [
        f'"""Makes diffusers load this folder as {pipeline_class.__name__}:',
        "",
        "    DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)",
        "",
        "Written by IDCrafterPipeline.save_pretrained; it holds no model code, it imports the installed",
        'idcrafter package."""',
        "",
        *[f"import {library}" for library in libraries],
        f"from {pipeline_class.__module__} import {pipeline_class.__name__}",
        "",
        f'__all__ = ["{pipeline_class.__name__}"]',
        "",
    ]
    return "\n".join(lines)


def _variant_of(folder: Path, variant: str | None) -> str | None:
    """`variant` when `folder` holds weights of that variant (diffusers saves it for models that take
    one), else None: the component's plain weights."""
    if variant is None or not folder.is_dir():
        return None
    return variant if any(f".{variant}." in p.name for p in folder.iterdir()) else None


def load_vae(folder: Path, variant: str | None = None):
    """The Wan VAE, or the toy world's lossless codec, by the class named in its config (float32)."""
    name = json.loads((folder / "config.json").read_text()).get("_class_name", "AutoencoderKLWan")
    if name == "PixelUnshuffleCodec":
        from idcrafter.toyworld.codec import PixelUnshuffleCodec

        return PixelUnshuffleCodec.from_pretrained(folder, variant=variant)
    return AutoencoderKLWan.from_pretrained(folder, torch_dtype=torch.float32, variant=variant)


def load_scheduler(folder: Path, config: IDCrafterConfig, saved: bool) -> FlowMatchEulerDiscreteScheduler:
    """The flow-matching Euler scheduler: the folder's own when it is a pipeline folder saved by
    `IDCrafterPipeline.save_pretrained` (`saved`), as diffusers loads it; else one with the model's
    `flow_shift` (a stock Wan folder ships another sampler, and older saves built it this way)."""
    path = folder / "scheduler" / FlowMatchEulerDiscreteScheduler.config_name
    if saved and path.is_file() and json.loads(path.read_text()).get("_class_name") == "FlowMatchEulerDiscreteScheduler":
        return FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    return FlowMatchEulerDiscreteScheduler(shift=config.flow_shift)


def concat_streams(streams: Sequence[SubjectStream]) -> SubjectStream:
    """The rows of several streams of the same references as one batch. Key sequences of different
    lengths (VLM tokens of different prompts) are right-padded with masked keys."""
    kv = []
    for layers in zip(*(s.kv for s in streams)):
        axis = layers[0].k.ndim - 2  # the key axis: k [B, H, L, Dh]; the plain ablation's tokens [B, L, D]
        length = max(layer.k.shape[axis] for layer in layers)
        ks, vs, keeps = [], [], []
        for layer in layers:
            b, n = layer.k.shape[0], layer.k.shape[axis]
            keep = layer.keep if layer.keep is not None else torch.ones(b, n, dtype=torch.bool, device=layer.k.device)
            pad = [0, 0] * (layer.k.ndim - 1 - axis) + [0, length - n]
            ks.append(torch.nn.functional.pad(layer.k, pad))
            vs.append(None if layer.v is None else torch.nn.functional.pad(layer.v, pad))
            keeps.append(torch.nn.functional.pad(keep, (0, length - n), value=False))
        kv.append(LayerKV(torch.cat(ks), None if vs[0] is None else torch.cat(vs), torch.cat(keeps)))
    first = streams[0]
    return SubjectStream(kv, first.ref_ranges, torch.cat([s.subject_mask for s in streams]), first.captures)


@dataclass
class IDCrafterPipelineOutput(BaseOutput):
    """frames: np.ndarray [B, F, H, W, 3] in [0, 1] ("np"), list of lists of PIL ("pil"), or latents."""

    frames: np.ndarray | list | torch.Tensor


class IDCrafterPipeline(DiffusionPipeline):
    """Wan 2.1 text-to-video with multi-subject references (ID-Crafter).

    Components: `tokenizer`, `text_encoder` (UMT5), `vae` (AutoencoderKLWan), `transformer`
    (`IDCrafterTransformer`), `scheduler` (FlowMatchEulerDiscreteScheduler), and optionally
    `vlm` (`idcrafter.video.vlm.VLMSemanticEncoder`, used when the adapter has a VLM connector).

    Files. `save_pretrained` is diffusers' own (safe_serialization, variant, max_shard_size): each
    component in its subfolder, the transformer with its adapter inside, and a model_index.json
    whose `_class_name` is ["idcrafter_pipeline", "IDCrafterPipeline"] beside a small module
    `idcrafter_pipeline.py` that imports this class from the installed package (and the modules
    of our own components, which model_index.json names by module path). So diffusers itself
    loads the folder as this pipeline:

        DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)

    diffusers 0.42 resolves a pipeline class outside diffusers only through such a module file,
    and runs a module file only with `trust_remote_code=True`, also from a local folder; without
    it diffusers stops with its own error naming the file, never with a stock pipeline. The VLM
    is not saved (it is a folder of its own; the transformer config records which one).

    `IDCrafterPipeline.from_pretrained(folder)` runs no code from the folder. It loads these
    folders and the older layout too: a stock Wan folder whose transformer/ is the stock model,
    with the adapter beside it in idcrafter_adapter/ (what older saves and the committed toy-world
    model hold), and plain Wan diffusers folders (a fresh adapter). diffusers reads an older-layout
    folder as a stock WanPipeline without the adapter; loading it here and saving converts it.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["vlm"]

    def __init__(self, tokenizer, text_encoder, vae, transformer: IDCrafterTransformer, scheduler, vlm=None):
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler, vlm=vlm
        )
        self.vae_scale_temporal, self.vae_scale_spatial = vae_scale_factors(vae.config)
        self.offload = False

    # ------------------------------------------------------------------ construction
    @property
    def config_idc(self) -> IDCrafterConfig:
        return self.transformer.idcrafter_config

    @classmethod
    def from_components(cls, components: dict, vlm=None) -> IDCrafterPipeline:
        return cls(vlm=vlm, **components)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        adapter: str | Path | None = None,
        torch_dtype: torch.dtype | None = None,
        vlm: str | Path | None = None,
        **kwargs,
    ) -> IDCrafterPipeline:
        """Load a pipeline folder (either layout, see the class docstring) or a Wan diffusers folder.

        `adapter`: an adapter folder (`IDCrafterTransformer.save_adapter`) to use instead of the
        folder's own; in the older layout it defaults to `folder/idcrafter_adapter`, and without
        any the ID-Crafter modules are fresh (zero contribution: the base model). `vlm`: a
        Qwen2.5-VL folder to load as the `vlm` component. `torch_dtype` (default float32: weights
        may be stored in half precision) applies to the text encoder and the transformer.
        kwargs: `variant`, `use_safetensors`, `low_cpu_mem_usage` for the model components, or a
        component object to use as is (`transformer=...`). Folders only: a hub id or a Hub option
        (revision=, custom_pipeline=, token=, ...) is an InputError; so is anything else unknown.
        """
        what = f"{cls.__name__}.from_pretrained"
        folder = local_model_folder(pretrained_model_name_or_path, what, kwargs)
        components = {k: kwargs.pop(k) for k in _COMPONENTS if k in kwargs}
        options = {k: kwargs.pop(k) for k in _MODEL_OPTIONS if k in kwargs}
        for ignored in ("local_files_only", "trust_remote_code"):  # offline always; no code runs from the folder
            kwargs.pop(ignored, None)
        if kwargs:
            raise InputError(f"{what}: unknown option(s) {', '.join(sorted(kwargs))}")
        torch_dtype = torch_dtype or torch.float32
        if not (folder / "transformer").is_dir() and "transformer" not in components:
            raise InputError(f"{what}: {folder} is not a Wan diffusers folder (no transformer/ subfolder)")
        own = "transformer" in components or (
            (folder / "transformer" / "config.json").is_file() and read_model_config(folder / "transformer") is not None
        )
        if adapter is None and not own and (folder / ADAPTER_SUBFOLDER / ADAPTER_CONFIG).is_file():
            adapter = folder / ADAPTER_SUBFOLDER
        variant = options.pop("variant", None)
        transformer = components.get("transformer") or IDCrafterTransformer.from_pretrained(
            folder, adapter, subfolder="transformer", torch_dtype=torch_dtype,
            variant=_variant_of(folder / "transformer", variant), **options,
        )
        tokenizer = components.get("tokenizer") or AutoTokenizer.from_pretrained(folder / "tokenizer")
        text_encoder = components.get("text_encoder") or UMT5EncoderModel.from_pretrained(
            folder / "text_encoder", dtype=torch_dtype, variant=_variant_of(folder / "text_encoder", variant),
            **({"use_safetensors": options["use_safetensors"]} if "use_safetensors" in options else {}),
        )
        vae = components.get("vae") or load_vae(folder / "vae", _variant_of(folder / "vae", variant))
        scheduler = components.get("scheduler") or load_scheduler(folder, transformer.idcrafter_config, own)
        vlm_encoder = components.get("vlm")
        if vlm is not None:
            from idcrafter.video.vlm import VLMSemanticEncoder

            vlm_encoder = VLMSemanticEncoder.from_pretrained(vlm, dtype=torch_dtype)
            transformer.vlm_folder = str(Path(vlm).resolve())
        return cls(tokenizer, text_encoder.eval(), vae.eval(), transformer.eval(), scheduler, vlm=vlm_encoder)

    def save_pretrained(
        self,
        save_directory: str | Path,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        **kwargs,
    ) -> Path:
        """diffusers' `save_pretrained`, written atomically, plus what makes diffusers load the folder
        as this pipeline (see the class docstring). Returns the folder."""
        if push_to_hub:
            raise InputError("IDCrafterPipeline.save_pretrained: push_to_hub= is not supported (folders only)")
        folder = Path(save_directory)
        with atomic_write_dir(folder) as tmp, self._without_vlm():
            super().save_pretrained(tmp, safe_serialization=safe_serialization, variant=variant,
                                    max_shard_size=max_shard_size, **kwargs)
            index = json.loads((tmp / "model_index.json").read_text())
            index["_class_name"] = [PIPELINE_MODULE, type(self).__name__]
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            (tmp / f"{PIPELINE_MODULE}.py").write_text(pipeline_module_source(type(self), index))
        return folder

    @contextlib.contextmanager
    def _without_vlm(self) -> Iterator[None]:
        """The VLM is no diffusers or transformers model (diffusers would warn it cannot be saved): it
        stays out of the saved folder, which records it as absent."""
        vlm = self.vlm
        if vlm is None:
            yield
            return
        self.register_modules(vlm=None)
        try:
            yield
        finally:
            self.register_modules(vlm=vlm)

    def enable_cpu_offload(self, enabled: bool = True) -> None:
        """Keep components on the CPU and move each to the accelerator only while it runs.

        Works without accelerate hooks; diffusers' `enable_model_cpu_offload` is also available.
        """
        self.offload = enabled

    @contextlib.contextmanager
    def _on(self, module: torch.nn.Module, device: torch.device) -> Iterator[torch.nn.Module]:
        if not self.offload or device.type == "cpu":
            yield module
            return
        module.to(device)
        try:
            yield module
        finally:
            module.to("cpu")
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
        """UMT5 states [B, L, text_dim], zero past each prompt's length (as WanPipeline does)."""
        length = self.config_idc.text_length
        tokens = self.tokenizer(
            list(prompts), padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
            return_attention_mask=True, return_tensors="pt",
        )
        with self._on(self.text_encoder, device) as encoder:
            enc_device = next(encoder.parameters()).device
            states = encoder(tokens.input_ids.to(enc_device), tokens.attention_mask.to(enc_device)).last_hidden_state
        mask = tokens.attention_mask.to(states.device, states.dtype)[..., None]
        return (states * mask).to(device=device, dtype=self.transformer.dtype)

    def _latent_stats(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.vae.config
        mean = torch.tensor(c.latents_mean, device=device).view(1, c.z_dim, 1, 1, 1)
        std = torch.tensor(c.latents_std, device=device).view(1, c.z_dim, 1, 1, 1)
        return mean, std

    @torch.no_grad()
    def encode_video(self, video: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Pixels [B, 3, F, H, W] in [-1, 1] -> normalised latents [B, C, F', H/8, W/8] (posterior mode)."""
        with self._on(self.vae, device) as vae:
            latents = vae.encode(video.to(vae.device, vae.dtype)).latent_dist.mode()
        mean, std = self._latent_stats(latents.device)
        return ((latents - mean) / std).to(device)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Normalised latents -> pixels [B, F, H, W, 3] in [0, 1]."""
        mean, std = self._latent_stats(latents.device)
        with self._on(self.vae, device) as vae:
            video = vae.decode((latents * std + mean).to(vae.device, vae.dtype)).sample
        return ((video.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).cpu()

    def prepare_references(self, refs: Sequence, height: int, width: int) -> tuple[torch.Tensor, list[Image.Image]]:
        """Paths, PIL images or uint8 arrays [H, W, 3|4] -> pixels [N, 3, 1, H, W] in [-1, 1] (fitted on white)."""
        images = [
            load_image(r) if isinstance(r, (str, Path)) else Image.fromarray(r) if isinstance(r, np.ndarray) else r
            for r in refs
        ]
        fitted = [fit_on_canvas(img, height, width) for img in images]
        return torch.stack([image_to_tensor(img) for img in fitted])[:, :, None], images

    @property
    def uses_vlm(self) -> bool:
        """Whether the passes read VLM tokens: a VLM component and a model with a VLM connector."""
        return self.vlm is not None and self.transformer.adapter.vlm_connector is not None

    @torch.no_grad()
    def encode_subject_inputs(self, refs: Sequence, prompt: str, height: int, width: int, device: torch.device) -> dict:
        """The frozen encoders' part of the subject streams, once per call.

        Returns `subjects`, the reference latents [1, N, C, 1, h, w], and, when the passes read VLM
        tokens (`uses_vlm`), the VLM states of the two passes that see the references, padded
        together: `vlm_states` [2, L, D_vlm] and `vlm_mask` [2, L], row 0 for v_ref (the references
        with the empty prompt), row 1 for v_ref_txt (the references with `prompt`). Otherwise the
        two are None.
        """
        pixels, images = self.prepare_references(refs, *self.config_idc.ref_canvas(height, width))
        inputs = {"subjects": self.encode_video(pixels, device)[None], "vlm_states": None, "vlm_mask": None}
        if self.uses_vlm:
            out = self.vlm.encode(["", prompt], [images, images])
            inputs.update(vlm_states=out.states.to(device), vlm_mask=out.mask.to(device))
        return inputs

    @staticmethod
    def subject_streams(transformer: IDCrafterTransformer, inputs: dict) -> tuple[SubjectStream, SubjectStream | None]:
        """(v_ref_txt's stream, v_ref's stream) from `encode_subject_inputs`; v_ref's is None when it
        is the same stream (no VLM tokens). Not under no_grad: RL trains through it.

        Both passes share the references, so one call encodes them as a batch of two whose VLM
        tokens (row 0: empty prompt, row 1: the prompt) are padded to one length.
        """
        subjects = inputs["subjects"].to(transformer.dtype)
        if inputs["vlm_states"] is None:
            return transformer.encode_subjects(subjects), None
        pair = transformer.encode_subjects(torch.cat([subjects, subjects]), None, inputs["vlm_states"], inputs["vlm_mask"])
        return pair.select([1]), pair.select([0])

    @torch.no_grad()
    def encode_guidance_streams(
        self, refs: Sequence, prompt: str, height: int, width: int, device: torch.device
    ) -> tuple[SubjectStream, SubjectStream | None]:
        """(v_ref_txt's stream, v_ref's stream or None when it is the same), once per call."""
        inputs = self.encode_subject_inputs(refs, prompt, height, width, device)
        with self._on(self.transformer, device) as transformer:
            return self.subject_streams(transformer, inputs)

    @torch.no_grad()
    def encode_subjects(self, refs: Sequence, prompt: str, height: int, width: int, device: torch.device) -> SubjectStream:
        """References (+ VLM states of prompt and references) -> the stream of v_ref_txt, the pass
        that sees both (`encode_guidance_streams` gives v_ref's as well)."""
        return self.encode_guidance_streams(refs, prompt, height, width, device)[0]

    @torch.no_grad()
    def encode_text_stream(self, prompt: str, height: int, width: int, device: torch.device) -> SubjectStream | None:
        """Without references, the stream of the pass that conditions on the prompt: VLM(prompt, no
        images) beside one masked placeholder subject, which is what training gives a sample whose
        subjects were dropped. None when the passes read no VLM tokens."""
        if not self.uses_vlm:
            return None
        out = self.vlm.encode([prompt], [[]])
        rh, rw = self.config_idc.ref_canvas(height, width)
        s = self.vae_scale_spatial
        with self._on(self.transformer, device) as transformer:
            placeholder = torch.zeros(1, 1, self.vae.config.z_dim, 1, rh // s, rw // s, device=device,
                                      dtype=transformer.dtype)
            absent = torch.zeros(1, 1, dtype=torch.bool, device=device)
            return transformer.encode_subjects(placeholder, absent, out.states.to(device), out.mask.to(device))

    # ------------------------------------------------------------------ sampling
    def check_inputs(self, prompt: str, refs: Sequence, height: int, width: int, num_frames: int, strength: float) -> None:
        cfg = self.config_idc
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt is empty")
        if len(refs) > cfg.max_subjects:
            raise ValueError(f"{len(refs)} reference images, this model supports at most {cfg.max_subjects}")
        if height % 16 or width % 16 or height <= 0 or width <= 0:
            raise ValueError(f"size {height}x{width}: height and width must be positive multiples of 16")
        if num_frames < 1 or (num_frames - 1) % self.vae_scale_temporal:
            raise ValueError(f"num_frames {num_frames} must be {self.vae_scale_temporal}n+1")
        # past the rotary range the transformer fails deep inside; say so here (InputError is a ValueError)
        limits = VideoLimits.from_configs(self.transformer.wan_config, dict(self.vae.config))
        limits.check(height, width, num_frames, 1, names=("size", "num_frames", "steps"))
        if not 0 < strength <= 1:
            raise ValueError(f"strength {strength} must be in (0, 1]")

    def guided_velocity(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        negative: torch.Tensor,
        stream: SubjectStream | None,
        s_img: float,
        s_txt: float,
        batched: SubjectStream | None,
        ref_stream: SubjectStream | None = None,
        text_stream: SubjectStream | None = None,
    ) -> torch.Tensor:
        """The three-pass guided velocity v_u + s_img (v_ref - v_u) + s_txt (v_ref_txt - v_ref).

        latents [B, C, F, h, w]; t: scalar or [B] timesteps (sigma * 1000); text / negative
        [1 or B, L, D]; `stream`: v_ref_txt's stream with B rows; `ref_stream`: v_ref's (references
        and the VLM tokens of the empty prompt), None when it is `stream` (no VLM tokens). v_uncond
        reads no stream. `batched` is the passes laid out as one batch (`guidance_stream` of the
        same streams), or None to run them one by one. Without references (`stream` None) it is
        classifier-free guidance on the text, whose text pass reads `text_stream` (VLM tokens of the
        prompt alone, `encode_text_stream`) when given. Not under no_grad: RL post-training
        differentiates through it.
        """
        b = latents.shape[0]
        timestep = t.to(latents.device).float().reshape(-1).expand(b)
        text, negative = text.expand(b, -1, -1), negative.expand(b, -1, -1)

        def model(name, x, ts, txt, **kw):
            # Each pass its own cache context: diffusers' caches (`transformer.enable_cache`) keep
            # state per context, and the passes see different conditions.
            with self.transformer.cache_context(name):
                out = self.transformer(x, ts, txt, return_dict=False, **kw)[0]
            return to_velocity(self.config_idc, out, x, ts / 1000.0)

        if stream is None:  # no references: ordinary classifier-free guidance on the text
            if s_txt == 1.0:
                return model("cond", latents, timestep, text, subject_stream=text_stream)
            if text_stream is not None:
                v_neg = model("uncond", latents, timestep, negative)
                return v_neg + s_txt * (model("cond", latents, timestep, text, subject_stream=text_stream) - v_neg)
            pair = model("cfg", latents.repeat(2, 1, 1, 1, 1), timestep.repeat(2), torch.cat([negative, text]))
            v_neg, v_txt = pair.chunk(2)
            return v_neg + s_txt * (v_txt - v_neg)
        if s_img == 1.0 and s_txt == 1.0:  # guidance off: one conditional pass
            return model("cond", latents, timestep, text, subject_stream=stream)
        if batched is not None:
            v = model("guided", latents.repeat(3, 1, 1, 1, 1), timestep.repeat(3), torch.cat([negative, negative, text]),
                      subject_stream=batched)
            v_uncond, v_ref, v_ref_txt = v.chunk(3)
        else:
            v_uncond = model("uncond", latents, timestep, negative)
            v_ref = model("ref", latents, timestep, negative, subject_stream=stream if ref_stream is None else ref_stream)
            v_ref_txt = model("cond", latents, timestep, text, subject_stream=stream)
        return v_uncond + s_img * (v_ref - v_uncond) + s_txt * (v_ref_txt - v_ref)

    @staticmethod
    def guidance_stream(
        stream: SubjectStream | None, batched: bool = True, ref_stream: SubjectStream | None = None
    ) -> SubjectStream | None:
        """Rows [uncond x B, ref x B, ref_txt x B] of the batched passes: the uncond rows see no
        subject and no VLM token, the ref rows `ref_stream` (None: `stream`), the ref_txt rows `stream`."""
        if stream is None or not batched:
            return None
        b = stream.batch_size
        rows = torch.arange(3 * b) < b
        if ref_stream is None:
            return stream.select(list(range(b)) * 3).drop_rows(rows)
        return concat_streams([ref_stream, ref_stream, stream]).drop_rows(rows)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        refs: Sequence = (),
        negative_prompt: str = "",
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        guidance_image: float | None = None,
        guidance_text: float | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        video: str | Path | np.ndarray | None = None,
        strength: float = 1.0,
        batched_guidance: bool = True,
        subject_stream: SubjectStream | None = None,
        ref_subject_stream: SubjectStream | None = None,
        recompute_subjects_each_step: bool = False,
        output_type: str = "np",
        callback: Callable[[int, torch.Tensor], None] | None = None,
        device: torch.device | str | None = None,
    ) -> IDCrafterPipelineOutput:
        """Generate one video.

        Args:
            prompt: text prompt; negative_prompt: text of the unconditional passes.
            refs: reference images (paths or PIL), one per subject.
            height, width, num_frames: output size (multiples of 16; 4n+1 frames).
            num_inference_steps, guidance_image, guidance_text: default to the model config.
            generator / seed: the initial noise (seed builds a CPU generator).
            video, strength: editing mode: the input video (path or uint8 [F, H, W, 3]) is noised
                to `strength` (1.0 = pure noise) and denoised with the new subjects / prompt.
            batched_guidance: run the three passes as one batch of 3 (faster) or one by one
                (less memory); the results are the same.
            subject_stream: a precomputed stream of v_ref_txt (skips encoding the references);
                ref_subject_stream: v_ref's stream to go with it (default: the same stream, which
                is right for models without VLM tokens; see `encode_guidance_streams`).
            recompute_subjects_each_step: re-encode the subjects at every step (benchmarks and
                tests only; the result is identical, only slower).
            output_type: "np", "pil" or "latent".
        """
        cfg = self.config_idc
        height, width = height or cfg.height, width or cfg.width
        num_frames = num_frames or cfg.num_frames
        steps = num_inference_steps or cfg.num_inference_steps
        s_img = cfg.guidance_image if guidance_image is None else guidance_image
        s_txt = cfg.guidance_text if guidance_text is None else guidance_text
        self.check_inputs(prompt, refs, height, width, num_frames, strength)
        device = torch.device(device) if device is not None else self.transformer.device
        if generator is None:
            generator = torch.Generator().manual_seed(0 if seed is None else seed)

        text = self.encode_prompt([prompt], device)
        negative = self.encode_prompt([negative_prompt], device)
        stream, ref_stream, text_stream = subject_stream, ref_subject_stream, None
        if stream is None and len(refs) > 0:
            stream, ref_stream = self.encode_guidance_streams(refs, prompt, height, width, device)
        elif stream is None:
            text_stream = self.encode_text_stream(prompt, height, width, device)

        latent_shape = (
            1, self.vae.config.z_dim, (num_frames - 1) // self.vae_scale_temporal + 1,
            height // self.vae_scale_spatial, width // self.vae_scale_spatial,
        )
        noise = torch.randn(latent_shape, generator=generator, dtype=torch.float32).to(device)
        # sigma_t = shift(linspace(1, 1/steps)) then 0: the same schedule as `idcrafter.flow.sigma_schedule`
        # (RL samples on it). Plain set_timesteps(steps) would shift the spacing twice.
        self.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), device=device)
        timesteps = self.scheduler.timesteps
        if video is not None:
            # Editing: start from the input video noised to `strength`.
            frames = read_video(video, num_frames) if isinstance(video, (str, Path)) else np.asarray(video)[:num_frames]
            if len(frames) < num_frames:
                raise ValueError(f"input video has {len(frames)} frames, {num_frames} needed")
            pixels = torch.stack([image_to_tensor(fit_on_canvas(Image.fromarray(f), height, width)) for f in frames], dim=1)
            clean = self.encode_video(pixels[None], device).float()
            start = min(int(round(steps * (1 - strength))), steps - 1)
            timesteps = timesteps[start:]
            self.scheduler.set_begin_index(start)
            latents = self.scheduler.scale_noise(clean, timesteps[:1], noise)
        else:
            self.scheduler.set_begin_index(0)
            latents = noise

        three = self.guidance_stream(stream, batched_guidance, ref_stream)  # once per call, not per step
        with self._on(self.transformer, device) as transformer:
            dtype = transformer.dtype
            for i, t in enumerate(self.progress_bar(timesteps)):
                if recompute_subjects_each_step and len(refs) > 0:
                    stream, ref_stream = self.encode_guidance_streams(refs, prompt, height, width, device)
                    three = self.guidance_stream(stream, batched_guidance, ref_stream)
                v = self.guided_velocity(latents.to(dtype), t, text, negative, stream, s_img, s_txt, three,
                                         ref_stream=ref_stream, text_stream=text_stream)
                latents = self.scheduler.step(v.float(), t, latents, return_dict=False)[0]
                if callback is not None:
                    callback(i, latents)

        if output_type == "latent":
            frames = latents
        else:
            frames = self.decode_latents(latents, device).numpy()
            if output_type == "pil":
                frames = [[Image.fromarray((f * 255).round().astype(np.uint8)) for f in video_frames] for video_frames in frames]
        self.maybe_free_model_hooks()  # as diffusers' pipelines end: resets stateful caches, re-arms offload hooks
        return IDCrafterPipelineOutput(frames=frames)
