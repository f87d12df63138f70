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
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import get_module_execution_device, randn_tensor
from PIL import Image
from transformers import AutoTokenizer, UMT5EncoderModel

from idcrafter.utils.errors import FileFormatError
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
from idcrafter.video.guidance import GuidanceInterval, as_interval
from idcrafter.video.transformer import IDCrafterTransformer, to_velocity

# The module `save_pretrained` writes into a pipeline folder (model_index.json names it).
PIPELINE_MODULE = "idcrafter_pipeline"
_COMPONENTS = ("tokenizer", "text_encoder", "vae", "transformer", "scheduler", "vlm")
_MODEL_OPTIONS = ("variant", "use_safetensors", "low_cpu_mem_usage")
OUTPUT_TYPES = ("np", "pil", "pt", "latent")


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



def repeat_rows(streams: Sequence[SubjectStream], times: int) -> SubjectStream:
    """One stream per prompt (one row each) -> one batch where every prompt's row comes `times` times
    in a row (diffusers' num_videos_per_prompt order). Streams of different prompts may differ in key
    length (VLM tokens): `concat_streams` pads them."""
    if all(s is streams[0] for s in streams):
        return streams[0].select([0] * (len(streams) * times))
    return concat_streams([s for s in streams for _ in range(times)])


def references_per_prompt(refs: Sequence, batch_size: int) -> list[list]:
    """`refs` as one reference list per prompt: a list of images (paths, PIL, uint8 arrays) is shared by
    every prompt (the same list object B times); a list of B lists gives each prompt its own, all of one
    length (the subject streams of a batch have one layout). ValueError otherwise."""
    refs = list(refs)
    if not refs or not all(isinstance(r, (list, tuple)) for r in refs):
        if any(isinstance(r, (list, tuple)) for r in refs):
            raise ValueError("refs: give a list of images (shared by the prompts) or one list of images per prompt")
        return [refs] * batch_size
    if len(refs) != batch_size:
        raise ValueError(f"refs: {len(refs)} reference lists for {batch_size} prompts")
    if len({len(r) for r in refs}) > 1:
        raise ValueError(f"refs: the per-prompt reference lists must have one length, got {[len(r) for r in refs]}")
    return [list(r) for r in refs]


@dataclass
class IDCrafterPipelineOutput(BaseOutput):
    """frames, one video per row: np.ndarray [B, F, H, W, 3] in [0, 1] ("np"), torch [B, F, 3, H, W] in
    [0, 1] ("pt", diffusers' VideoProcessor layout), lists of PIL frames ("pil"), or the latents
    [B, C, F', h, w] ("latent")."""

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

    Calling. `__call__` follows diffusers' `WanPipeline.__call__` (prompt lists,
    num_videos_per_prompt, generator lists, latents, prompt_embeds, output_type, return_dict,
    callback_on_step_end, attention_kwargs, progress bar) and adds references, three-pass guidance
    and editing. Offload is diffusers' own: `enable_model_cpu_offload()` /
    `enable_sequential_cpu_offload()`; the subject encoding, which runs outside the transformer's
    forward, is placed where the hooks put the forward (`_onloaded`).
    """

    # The order diffusers' model offload chains the hooks in: each model's forward offloads the one
    # before it. The VAE also runs before the transformer (references, editing) and is offloaded by
    # hand then (`_offload_now`). The VLM is no nn.Module: it stays where it was put.
    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    _optional_components = ["vlm"]

    def __init__(self, tokenizer, text_encoder, vae, transformer: IDCrafterTransformer, scheduler, vlm=None):
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler, vlm=vlm
        )
        self.vae_scale_temporal, self.vae_scale_spatial = vae_scale_factors(vae.config)
        self._guidance_image = self._guidance_text = self._attention_kwargs = self._guidance_interval = None
        self._num_timesteps, self._current_timestep, self._interrupt = None, None, False

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
        (revision=, custom_pipeline=, token=, ...) is a ConfigError; anything else unknown a TypeError.
        """
        what = f"{cls.__name__}.from_pretrained"
        folder = local_model_folder(pretrained_model_name_or_path, what, kwargs)
        components = {k: kwargs.pop(k) for k in _COMPONENTS if k in kwargs}
        options = {k: kwargs.pop(k) for k in _MODEL_OPTIONS if k in kwargs}
        for ignored in ("local_files_only", "trust_remote_code"):  # offline always; no code runs from the folder
            kwargs.pop(ignored, None)
        if kwargs:
            raise TypeError(f"{what}: unknown option(s) {', '.join(sorted(kwargs))}")
        torch_dtype = torch_dtype or torch.float32
        if not (folder / "transformer").is_dir() and "transformer" not in components:
            raise FileFormatError(f"{what}: {folder} is not a Wan diffusers folder (no transformer/ subfolder)")
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
            raise ValueError("IDCrafterPipeline.save_pretrained: push_to_hub= is not supported (folders only)")
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

    # ------------------------------------------------------------------ offload
    @contextlib.contextmanager
    def _onloaded(self, module: torch.nn.Module, part: torch.nn.Module | None = None) -> Iterator[None]:
        """Run code that reads `module`'s weights outside its forward (the transformer's
        `encode_subjects`) where diffusers' offload hooks would run its forward.

        Model offload (`enable_model_cpu_offload`: accelerate's CpuOffload hook on the module): the
        hook's pre_forward moves the whole module to the execution device and offloads the model
        before it in `model_cpu_offload_seq`, as diffusers' `apply_forward_hook` does for a VAE's
        encode. Sequential offload (weights on the meta device, one AlignDevicesHook per submodule):
        the weights of `part`'s submodules (default: all of `module`) are loaded for the duration and
        put back after. Without hooks nothing moves.
        """
        hook = getattr(module, "_hf_hook", None)
        if hook is None:
            yield
            return
        from accelerate.hooks import CpuOffload
        from accelerate.utils import align_module_device, has_offloaded_params

        if isinstance(hook, CpuOffload):
            hook.pre_forward(module)
            yield
            return
        with contextlib.ExitStack() as stack:
            for sub in (part or module).modules():
                if has_offloaded_params(sub):
                    stack.enter_context(align_module_device(sub))
            yield

    def _offload_now(self, module: torch.nn.Module) -> None:
        """Under model offload, move `module` back to the CPU now. The VAE runs out of the
        text_encoder->transformer->vae order for the references; the chain would keep it on the
        accelerator through the whole denoising loop."""
        for hook in getattr(self, "_all_hooks", []):
            if getattr(hook, "model", None) is module:
                hook.offload()

    # ------------------------------------------------------------------ conditioning
    def component_timer(self):
        """A `ComponentTimer` (idcrafter/utils/timing.py) of this pipeline's parts: the transformer
        (denoising forwards and the subject stream), the VAE (encoding references and input videos,
        decoding), the text encoder and the VLM. Use as `with timer: pipe(..., callback_on_step_end=
        timer.on_step_end)`, then `timer.summary()`."""
        from idcrafter.utils.timing import ComponentTimer

        return ComponentTimer([
            ("transformer", self.transformer, "forward"), ("transformer", self.transformer, "encode_subjects"),
            ("vae", self, "encode_video"), ("vae", self, "decode_latents"),
            ("text_encoder", self, "encode_prompt"), ("vlm", self.vlm, "encode"),
        ])

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str], device: torch.device | None = None) -> torch.Tensor:
        """UMT5 states [B, L, text_dim], zero past each prompt's length (as WanPipeline does), on
        `device` (default: the execution device) in the transformer's dtype."""
        device = device or self._execution_device
        length = self.config_idc.text_length
        tokens = self.tokenizer(
            list(prompts), padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
            return_attention_mask=True, return_tensors="pt",
        )
        enc_device = get_module_execution_device(self.text_encoder)  # offload hooks move the weights there
        states = self.text_encoder(tokens.input_ids.to(enc_device), tokens.attention_mask.to(enc_device)).last_hidden_state
        mask = tokens.attention_mask.to(states.device, states.dtype)[..., None]
        return (states * mask).to(device=device, dtype=self.transformer.dtype)

    def _latent_stats(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.vae.config
        mean = torch.tensor(c.latents_mean, device=device).view(1, c.z_dim, 1, 1, 1)
        std = torch.tensor(c.latents_std, device=device).view(1, c.z_dim, 1, 1, 1)
        return mean, std

    @torch.no_grad()
    def encode_video(self, video: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """Pixels [B, 3, F, H, W] in [-1, 1] -> normalised latents [B, C, F', H/8, W/8] (posterior mode)
        on `device` (default: the execution device)."""
        device = device or self._execution_device
        latents = self.vae.encode(video.to(get_module_execution_device(self.vae), self.vae.dtype)).latent_dist.mode()
        mean, std = self._latent_stats(latents.device)
        return ((latents - mean) / std).to(device)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """Normalised latents -> pixels [B, F, H, W, 3] in [0, 1] on the CPU (float32). The VAE runs on its
        execution device (`device` is kept for callers; the offload hooks decide)."""
        vae_device = get_module_execution_device(self.vae)
        latents = latents.to(vae_device)
        mean, std = self._latent_stats(vae_device)
        video = self.vae.decode((latents * std + mean).to(self.vae.dtype)).sample
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
    def encode_subject_inputs(
        self, refs: Sequence, prompt: str, height: int, width: int, device: torch.device | None = None
    ) -> dict:
        """The frozen encoders' part of the subject streams, once per call.

        Returns `subjects`, the reference latents [1, N, C, 1, h, w], and, when the passes read VLM
        tokens (`uses_vlm`), the VLM states of the two passes that see the references, padded
        together: `vlm_states` [2, L, D_vlm] and `vlm_mask` [2, L], row 0 for v_ref (the references
        with the empty prompt), row 1 for v_ref_txt (the references with `prompt`). Otherwise the
        two are None.
        """
        device = device or self._execution_device
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
        self, refs: Sequence, prompt: str, height: int, width: int, device: torch.device | None = None
    ) -> tuple[SubjectStream, SubjectStream | None]:
        """(v_ref_txt's stream, v_ref's stream or None when it is the same), once per call. Under
        offload the subject encoding runs where the transformer's forward would (`_onloaded`)."""
        device = device or self._execution_device
        inputs = self.encode_subject_inputs(refs, prompt, height, width, device)
        self._offload_now(self.vae)
        with self._onloaded(self.transformer, self.transformer.adapter):
            return self.subject_streams(self.transformer, inputs)

    @torch.no_grad()
    def encode_subjects(
        self, refs: Sequence, prompt: str, height: int, width: int, device: torch.device | None = None
    ) -> SubjectStream:
        """References (+ VLM states of prompt and references) -> the stream of v_ref_txt, the pass
        that sees both (`encode_guidance_streams` gives v_ref's as well)."""
        return self.encode_guidance_streams(refs, prompt, height, width, device)[0]

    @torch.no_grad()
    def encode_text_stream(
        self, prompt: str, height: int, width: int, device: torch.device | None = None
    ) -> SubjectStream | None:
        """Without references, the stream of the pass that conditions on the prompt: VLM(prompt, no
        images) beside one masked placeholder subject, which is what training gives a sample whose
        subjects were dropped. None when the passes read no VLM tokens."""
        if not self.uses_vlm:
            return None
        device = device or self._execution_device
        out = self.vlm.encode([prompt], [[]])
        rh, rw = self.config_idc.ref_canvas(height, width)
        s = self.vae_scale_spatial
        transformer = self.transformer
        placeholder = torch.zeros(1, 1, self.vae.config.z_dim, 1, rh // s, rw // s, device=device, dtype=transformer.dtype)
        absent = torch.zeros(1, 1, dtype=torch.bool, device=device)
        with self._onloaded(transformer, transformer.adapter):
            return transformer.encode_subjects(placeholder, absent, out.states.to(device), out.mask.to(device))

    @torch.no_grad()
    def encode_batch_streams(
        self,
        refs: Sequence[Sequence],
        prompts: Sequence[str],
        videos_per_prompt: int,
        height: int,
        width: int,
        device: torch.device | None = None,
    ) -> tuple[SubjectStream | None, SubjectStream | None, SubjectStream | None]:
        """(stream, ref_stream, text_stream) of a batch, each with B * videos_per_prompt rows (every
        prompt's row repeated videos_per_prompt times, the order of diffusers' num_videos_per_prompt)
        or None. `refs`: one reference list per prompt (the same list object for shared references,
        which without VLM tokens are encoded once); `prompts`: the B prompts (what the VLM reads).
        With references: v_ref_txt's and v_ref's streams (`encode_guidance_streams`); without, the
        text pass's (`encode_text_stream`)."""
        if len(refs[0]) > 0:
            if not self.uses_vlm and all(r is refs[0] for r in refs):  # the stream does not depend on the prompt
                pairs = [self.encode_guidance_streams(refs[0], "", height, width, device)] * len(refs)
            else:
                pairs = [self.encode_guidance_streams(r, p, height, width, device) for r, p in zip(refs, prompts)]
            stream = repeat_rows([s for s, _ in pairs], videos_per_prompt)
            ref_stream = None if pairs[0][1] is None else repeat_rows([r for _, r in pairs], videos_per_prompt)
            return stream, ref_stream, None
        if not self.uses_vlm:
            return None, None, None
        texts = [self.encode_text_stream(p, height, width, device) for p in prompts]
        return None, None, repeat_rows(texts, videos_per_prompt)

    # ------------------------------------------------------------------ sampling
    def check_inputs(
        self,
        prompt: str | list[str] | None,
        refs: Sequence,
        height: int,
        width: int,
        num_frames: int,
        strength: float,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        num_videos_per_prompt: int = 1,
        output_type: str = "np",
        callback_on_step_end_tensor_inputs: Sequence[str] | None = None,
    ) -> None:
        """ValueError on bad input: diffusers' checks of WanPipeline (prompt xor prompt_embeds, types,
        callback tensor names) and ours (references, size, frames, rotary range, strength)."""
        cfg = self.config_idc
        if prompt is None and prompt_embeds is None:
            raise ValueError("provide either `prompt` or `prompt_embeds`")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("give either `prompt` or `prompt_embeds`, not both")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("give either `negative_prompt` or `negative_prompt_embeds`, not both")
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
                raise ValueError(f"`prompt` must be a str or a non-empty list of str, got {type(prompt).__name__}")
            if not all(p.strip() for p in prompts):
                raise ValueError("prompt is empty")
            batch = len(prompts)
        else:
            if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.ndim != 3:
                raise ValueError("`prompt_embeds` must be a tensor [B, L, D]")
            if self.uses_vlm:
                raise ValueError("this model reads the prompt's VLM tokens: pass `prompt`, not `prompt_embeds`")
            batch = prompt_embeds.shape[0]
        if isinstance(negative_prompt, list):
            if len(negative_prompt) != batch or not all(isinstance(p, str) for p in negative_prompt):
                raise ValueError(f"`negative_prompt` must be a str or a list of {batch} str (one per prompt)")
        elif negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError(f"`negative_prompt` must be a str or a list of str, got {type(negative_prompt).__name__}")
        if negative_prompt_embeds is not None and (
            not isinstance(negative_prompt_embeds, torch.Tensor) or negative_prompt_embeds.ndim != 3
            or negative_prompt_embeds.shape[0] not in (1, batch)
        ):
            raise ValueError(f"`negative_prompt_embeds` must be a tensor [1 or {batch}, L, D]")
        if not isinstance(num_videos_per_prompt, int) or num_videos_per_prompt < 1:
            raise ValueError(f"num_videos_per_prompt {num_videos_per_prompt!r} must be a positive integer")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type {output_type!r} must be one of {', '.join(OUTPUT_TYPES)}")
        unknown = [k for k in callback_on_step_end_tensor_inputs or () if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` has to be in {self._callback_tensor_inputs}, "
                             f"but found {unknown}")
        count = len(references_per_prompt(refs, batch)[0])
        if count > cfg.max_subjects:
            raise ValueError(f"{count} reference images, this model supports at most {cfg.max_subjects}")
        if height % 16 or width % 16 or height <= 0 or width <= 0:
            raise ValueError(f"size {height}x{width}: height and width must be positive multiples of 16")
        if num_frames < 1 or (num_frames - 1) % self.vae_scale_temporal:
            raise ValueError(f"num_frames {num_frames} must be {self.vae_scale_temporal}n+1")
        # past the rotary range the transformer fails deep inside; say so here (ConfigError is a ValueError)
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
        attention_kwargs: dict | None = None,
        cache_info: dict | None = None,
        return_conditional: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The three-pass guided velocity v_u + s_img (v_ref - v_u) + s_txt (v_ref_txt - v_ref).

        latents [B, C, F, h, w]; t: scalar or [B] timesteps (sigma * 1000); text / negative
        [1 or B, L, D]; `stream`: v_ref_txt's stream with B rows; `ref_stream`: v_ref's (references
        and the VLM tokens of the empty prompt), None when it is `stream` (no VLM tokens). v_uncond
        reads no stream. `batched` is the passes laid out as one batch (`guidance_stream` of the
        same streams), or None to run them one by one. Without references (`stream` None) it is
        classifier-free guidance on the text, whose text pass reads `text_stream` (VLM tokens of the
        prompt alone, `encode_text_stream`) when given. `attention_kwargs` go to every transformer
        call (diffusers': {"scale": s} scales LoRA layers); `cache_info` (step_index, sigma,
        num_inference_steps) to every pass's `cache_context`, as diffusers' pipelines give them.
        `return_conditional`: return (v, v_cond), v_cond the conditional pass (v_ref_txt; without
        references the text pass), which `interval_velocity` subtracts to get the guidance term. Not
        under no_grad: RL post-training differentiates through it.
        """
        b = latents.shape[0]
        timestep = t.to(latents.device).float().reshape(-1).expand(b)
        text, negative = text.expand(b, -1, -1), negative.expand(b, -1, -1)

        def model(name, x, ts, txt, **kw):
            # Each pass its own cache context: diffusers' caches (`transformer.enable_cache`) keep
            # state per context, and the passes see different conditions.
            with self.transformer.cache_context(name, **(cache_info or {})):
                out = self.transformer(x, ts, txt, return_dict=False, attention_kwargs=attention_kwargs, **kw)[0]
            return to_velocity(self.config_idc, out, x, ts / 1000.0)

        if stream is None:  # no references: ordinary classifier-free guidance on the text
            if s_txt == 1.0:
                v = v_cond = model("cond", latents, timestep, text, subject_stream=text_stream)
            elif text_stream is not None:
                v_neg = model("uncond", latents, timestep, negative)
                v_cond = model("cond", latents, timestep, text, subject_stream=text_stream)
                v = v_neg + s_txt * (v_cond - v_neg)
            else:
                pair = model("cfg", latents.repeat(2, 1, 1, 1, 1), timestep.repeat(2), torch.cat([negative, text]))
                v_neg, v_cond = pair.chunk(2)
                v = v_neg + s_txt * (v_cond - v_neg)
        elif s_img == 1.0 and s_txt == 1.0:  # guidance off: one conditional pass
            v = v_cond = model("cond", latents, timestep, text, subject_stream=stream)
        else:
            if batched is not None:
                out = model("guided", latents.repeat(3, 1, 1, 1, 1), timestep.repeat(3),
                            torch.cat([negative, negative, text]), subject_stream=batched)
                v_uncond, v_ref, v_cond = out.chunk(3)
            else:
                v_uncond = model("uncond", latents, timestep, negative)
                v_ref = model("ref", latents, timestep, negative,
                              subject_stream=stream if ref_stream is None else ref_stream)
                v_cond = model("cond", latents, timestep, text, subject_stream=stream)
            v = v_uncond + s_img * (v_ref - v_uncond) + s_txt * (v_cond - v_ref)
        return (v, v_cond) if return_conditional else v

    def interval_velocity(
        self,
        interval: GuidanceInterval,
        sigma: float,
        guidance: torch.Tensor | None,
        latents: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        negative: torch.Tensor,
        stream: SubjectStream | None,
        s_img: float,
        s_txt: float,
        batched: SubjectStream | None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One step of guidance limited to `interval` (`idcrafter.video.guidance`): (velocity, guidance term).

        Inside the interval, `guided_velocity` with every pass, and the new guidance term
        g = v - v_ref_txt [B, C, F, h, w]; outside, the conditional pass alone plus `guidance`, the g
        of the last step inside (None before any: no guidance, as Kynkaenniemi et al. 2024 have it
        outside their interval), which is returned unchanged. kwargs go to `guided_velocity`.
        """
        if interval.covers(sigma):
            v, v_cond = self.guided_velocity(latents, t, text, negative, stream, s_img, s_txt, batched,
                                             return_conditional=True, **kwargs)
            return v, v - v_cond
        v_cond = self.guided_velocity(latents, t, text, negative, stream, 1.0, 1.0, None, **kwargs)
        return (v_cond if guidance is None else v_cond + guidance), guidance

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

    # diffusers' pipeline state, read through the properties below (as WanPipeline has them)
    @property
    def guidance_image(self) -> float:
        """s_img of the running (or last) call."""
        return self._guidance_image

    @property
    def guidance_text(self) -> float:
        """s_txt of the running (or last) call."""
        return self._guidance_text

    @property
    def guidance_interval(self) -> GuidanceInterval | None:
        """The guidance interval of the running (or last) call; None: guidance at every step."""
        return self._guidance_interval

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_image != 1.0 or self._guidance_text != 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def current_timestep(self) -> torch.Tensor | None:
        return self._current_timestep

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` (from a callback) to skip the remaining steps."""
        return self._interrupt

    @property
    def attention_kwargs(self) -> dict | None:
        return self._attention_kwargs

    def prepare_latents(
        self,
        batch_size: int,
        height: int,
        width: int,
        num_frames: int,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The initial noise [batch_size, C, F', h, w] float32 on `device`: `latents` when given, else drawn
        with diffusers' `randn_tensor` (a CPU generator draws on the CPU, so a seed gives the same noise on
        every device; a list of generators draws one row each)."""
        shape = (
            batch_size, self.vae.config.z_dim, (num_frames - 1) // self.vae_scale_temporal + 1,
            height // self.vae_scale_spatial, width // self.vae_scale_spatial,
        )
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents have shape {tuple(latents.shape)}, {shape} expected")
            return latents.to(device=device, dtype=torch.float32)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"{len(generator)} generators for a batch of {batch_size} videos (one per video)")
        return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)

    def _text_states(
        self,
        prompts: list[str] | None,
        negative_prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        videos_per_prompt: int,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds, negative_prompt_embeds), each [B * videos_per_prompt, L, D]: given embeddings are
        used as they are (no text encoder), missing ones encoded; every prompt's row repeated
        videos_per_prompt times in a row."""
        dtype = self.transformer.dtype
        if prompt_embeds is None:
            prompt_embeds = self.encode_prompt(prompts, device)
        b = prompt_embeds.shape[0]
        if negative_prompt_embeds is None:
            negative = negative_prompt if negative_prompt is not None else ""
            negatives = [negative] * b if isinstance(negative, str) else negative
            # one string for every prompt: encoded once
            negative_prompt_embeds = self.encode_prompt(negatives[:1] if len(set(negatives)) == 1 else negatives, device)
        negative_prompt_embeds = negative_prompt_embeds.to(device, dtype).expand(b, -1, -1)
        prompt_embeds = prompt_embeds.to(device, dtype)
        return (prompt_embeds.repeat_interleave(videos_per_prompt, 0),
                negative_prompt_embeds.repeat_interleave(videos_per_prompt, 0))

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        refs: Sequence = (),
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        guidance_image: float | None = None,
        guidance_text: float | None = None,
        guidance_interval: GuidanceInterval | Sequence[float] | str | None = None,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        video: str | Path | np.ndarray | None = None,
        strength: float = 1.0,
        batched_guidance: bool = True,
        subject_stream: SubjectStream | None = None,
        ref_subject_stream: SubjectStream | None = None,
        recompute_subjects_each_step: bool = False,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> IDCrafterPipelineOutput | tuple:
        """Generate B * num_videos_per_prompt videos, with the calling conventions of diffusers'
        `WanPipeline.__call__` (docs/design.md 4).

        Args:
            prompt: a prompt or a list of B prompts (or pass `prompt_embeds`).
            refs: reference images (paths, PIL or uint8 arrays), one per subject, shared by every
                prompt; or a list of B such lists, one per prompt (all of one length).
            negative_prompt: text of the unconditional passes, one or one per prompt (default "").
            height, width, num_frames: output size (multiples of 16; 4n+1 frames).
            num_inference_steps, guidance_image, guidance_text: default to the model config.
            guidance_interval: (low, high), a `GuidanceInterval` or "low,high": the unconditional and
                image-only passes run only at steps with low <= sigma <= high; the other steps run
                the conditional pass and add the guidance term of the last step that ran them
                (`idcrafter.video.guidance`). None (default): every step runs every pass.
            num_videos_per_prompt: videos per prompt; a prompt's videos are consecutive rows.
            generator: a torch.Generator or a list, one per video (B * num_videos_per_prompt), for
                the initial noise; None draws nondeterministic noise, as in diffusers.
            latents: the initial noise [B * num_videos_per_prompt, C, F', h, w] (generator unused);
                in editing mode the noise the input video is mixed with.
            prompt_embeds / negative_prompt_embeds: text-encoder states [B, L, D] (negative: [1 or
                B, L, D]) used in place of encoding `prompt` / `negative_prompt`.
            video, strength: editing mode: the input video (path or uint8 [F, H, W, 3]) is noised
                to `strength` (1.0 = pure noise) and denoised with the new subjects / prompt.
            batched_guidance: run the three passes as one batch of 3 (faster) or one by one
                (less memory); the results are the same.
            subject_stream: a precomputed stream of v_ref_txt (skips encoding the references), one
                row or one per video; ref_subject_stream: v_ref's stream to go with it (default: the
                same stream, right for models without VLM tokens; see `encode_guidance_streams`).
            recompute_subjects_each_step: re-encode the subjects at every step (benchmarks and
                tests only; the result is identical, only slower).
            output_type: "np", "pil", "pt" or "latent" (see `IDCrafterPipelineOutput`).
            return_dict: False returns the tuple (frames,).
            attention_kwargs: passed to every transformer call (diffusers': {"scale": s} for LoRA).
            callback_on_step_end: called after every step as f(pipe, step, timestep, callback_kwargs)
                with the tensors named in `callback_on_step_end_tensor_inputs` (from
                `_callback_tensor_inputs`); the dict it returns may replace them (latents,
                prompt_embeds, negative_prompt_embeds). diffusers' PipelineCallback objects work.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        cfg = self.config_idc
        height, width = height or cfg.height, width or cfg.width
        num_frames = num_frames or cfg.num_frames
        steps = num_inference_steps or cfg.num_inference_steps
        s_img = cfg.guidance_image if guidance_image is None else guidance_image
        s_txt = cfg.guidance_text if guidance_text is None else guidance_text
        interval = as_interval(guidance_interval)
        self.check_inputs(prompt, refs, height, width, num_frames, strength, negative_prompt, prompt_embeds,
                          negative_prompt_embeds, num_videos_per_prompt, output_type, callback_on_step_end_tensor_inputs)
        self._guidance_image, self._guidance_text = s_img, s_txt
        self._guidance_interval = interval
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device  # under offload, from the hooks

        prompts = None if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        videos = batch * num_videos_per_prompt
        prompt_refs = references_per_prompt(refs, batch)
        text, negative = self._text_states(prompts, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                           num_videos_per_prompt, device)
        vlm_prompts = prompts or [""] * batch  # prompt_embeds only without VLM tokens (check_inputs)

        def streams():
            return self.encode_batch_streams(prompt_refs, vlm_prompts, num_videos_per_prompt, height, width, device)

        if subject_stream is not None:
            stream, ref_stream, text_stream = (
                None if s is None else s if s.batch_size == videos else s.select([0] * videos)
                for s in (subject_stream, ref_subject_stream, None)
            )
        else:
            stream, ref_stream, text_stream = streams()

        noise = self.prepare_latents(videos, height, width, num_frames, device, generator, latents)
        # sigma_t = shift(linspace(1, 1/steps)) then 0: the same schedule as `idcrafter.flow.sigma_schedule`
        # (RL samples on it). Plain set_timesteps(steps) would shift the spacing twice.
        self.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), device=device)
        timesteps = self.scheduler.timesteps
        start = 0
        if video is not None:
            # Editing: start from the input video noised to `strength`.
            frames = read_video(video, num_frames) if isinstance(video, (str, Path)) else np.asarray(video)[:num_frames]
            if len(frames) < num_frames:
                raise ValueError(f"input video has {len(frames)} frames, {num_frames} needed")
            pixels = torch.stack([image_to_tensor(fit_on_canvas(Image.fromarray(f), height, width)) for f in frames], dim=1)
            clean = self.encode_video(pixels[None], device).float()
            self._offload_now(self.vae)
            start = min(int(round(steps * (1 - strength))), steps - 1)
            timesteps = timesteps[start:]
            self.scheduler.set_begin_index(start)
            latents = self.scheduler.scale_noise(clean.expand_as(noise), timesteps[:1], noise)
        else:
            self.scheduler.set_begin_index(0)
            latents = noise

        three = self.guidance_stream(stream, batched_guidance, ref_stream)  # once per call, not per step
        dtype = self.transformer.dtype
        self._num_timesteps = len(timesteps)
        guidance = None  # the guidance term of the last step inside `interval` (interval_velocity)
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                if recompute_subjects_each_step and stream is not None and subject_stream is None:
                    stream, ref_stream, _ = streams()
                    three = self.guidance_stream(stream, batched_guidance, ref_stream)
                sigma = float(self.scheduler.sigmas[start + i])
                cache_info = {"step_index": start + i, "sigma": sigma, "num_inference_steps": steps}
                passes = dict(ref_stream=ref_stream, text_stream=text_stream, attention_kwargs=attention_kwargs,
                              cache_info=cache_info)
                if interval is None:
                    v = self.guided_velocity(latents.to(dtype), t, text, negative, stream, s_img, s_txt, three, **passes)
                else:
                    v, guidance = self.interval_velocity(interval, sigma, guidance, latents.to(dtype), t, text, negative,
                                                         stream, s_img, s_txt, three, **passes)
                latents = self.scheduler.step(v.float(), t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    tensors = {"latents": latents, "prompt_embeds": text, "negative_prompt_embeds": negative}
                    outputs = callback_on_step_end(self, i, t, {k: tensors[k] for k in callback_on_step_end_tensor_inputs})
                    latents = outputs.pop("latents", latents)
                    text = outputs.pop("prompt_embeds", text)
                    negative = outputs.pop("negative_prompt_embeds", negative)
                progress_bar.update()
        self._current_timestep = None

        if output_type == "latent":
            frames = latents
        else:
            pixels = self.decode_latents(latents)  # [B, F, H, W, 3]
            if output_type == "pt":
                frames = pixels.permute(0, 1, 4, 2, 3)
            elif output_type == "np":
                frames = pixels.numpy()
            else:
                frames = [[Image.fromarray((f * 255).round().astype(np.uint8)) for f in clip] for clip in pixels.numpy()]
        self.maybe_free_model_hooks()  # as diffusers' pipelines end: resets stateful caches, re-arms offload hooks
        if not return_dict:
            return (frames,)
        return IDCrafterPipelineOutput(frames=frames)
