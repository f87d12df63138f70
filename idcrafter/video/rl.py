"""ID-Crafter as an `RLSpec` (idcrafter.rl.trainer): rollouts of the guided video policy.

The policy's velocity is the pipeline's three-pass guided velocity, so RL optimises the sampler
users run. Text, negative prompt and the subject stream are encoded once per group; in the
update the stream is recomputed with grad when the adapter trains (`--trainable new-modules`, the
default, ID-Crafter App. A.2, or `new-modules+lora`) and reused without grad when only a LoRA
trains (`--trainable lora`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from idcrafter.core.moe_lora import moe_lora_disabled
from idcrafter.rl.trainer import load_prompt_samples, reference_arrays
from idcrafter.video.training import VideoDataArgs, VideoModelArgs, VideoTrainingSpec


@dataclass
class PromptItem:
    """One (prompt, subjects) of the RL data: reference paths and categories from a manifest line."""

    id: str
    prompt: str
    refs: tuple[Path, ...]
    categories: tuple[str, ...]


@dataclass
class VideoCondition:
    text: torch.Tensor  # [1, L, D]
    negative: torch.Tensor  # [1, L, D]
    stream: object  # SubjectStream with one row (v_ref_txt's), or None
    ref_stream: object = None  # v_ref's: references + VLM tokens of the empty prompt; None: `stream`


class VideoRLSpec:
    """Loading, prompt data, conditioning, guided velocity, decoding and export for video RL."""

    def __init__(self, model_args: VideoModelArgs, data: str, eval_data: str | None = None, policy: str = "lora",
                 guidance_image: float | None = None, guidance_text: float | None = None, negative_prompt: str = "",
                 vlm: str | None = None):
        self.sft = VideoTrainingSpec(model_args, VideoDataArgs(data=data), policy=policy)
        self.config = self.sft.config
        self.hidden_size = self.sft.hidden_size
        self.flow_shift = self.config.flow_shift
        self.data, self.eval_data = data, eval_data
        self.policy = policy
        self.s_img = self.config.guidance_image if guidance_image is None else guidance_image
        self.s_txt = self.config.guidance_text if guidance_text is None else guidance_text
        self.negative_prompt = negative_prompt
        self.vlm = vlm

    # ------------------------------------------------------------------ model
    def build_model(self, device: torch.device, dtype: torch.dtype):
        model = self.sft.build_model(device, dtype)
        self.pipe = self.sft.pipe
        if self.vlm is not None:  # frozen, like the text encoder
            from idcrafter.video.vlm import VLMSemanticEncoder

            self.pipe.register_modules(vlm=VLMSemanticEncoder.from_pretrained(self.vlm, device=device, dtype=dtype))
            model.vlm_folder = str(Path(self.vlm).resolve())  # the exported adapter records the VLM it ran with
        self.config = model.idcrafter_config
        self.flow_shift = self.config.flow_shift
        self.device = device
        return model

    def trainable_parameters(self, model, policy: str):
        return model.trainable_parameters(policy)

    @contextlib.contextmanager
    def reference(self, model):
        """The starting policy when RL trains a fresh LoRA only: that LoRA off. The trainer uses a
        frozen copy of the starting weights instead in every other case."""
        with moe_lora_disabled(model):
            yield

    # ------------------------------------------------------------------ data
    def build_items(self, which: str) -> list[PromptItem]:
        path = self.data if which == "train" else self.eval_data
        if path is None:
            return []
        return [PromptItem(s.id, s.prompt, tuple(x.image for x in s.subjects), tuple(x.category for x in s.subjects))
                for s in load_prompt_samples(path, self.config.max_subjects)]

    def reward_inputs(self, item: PromptItem) -> tuple[str, list[np.ndarray], dict]:
        return item.prompt, reference_arrays(item.refs), {"categories": list(item.categories), "id": item.id}

    # ------------------------------------------------------------------ conditioning and policy
    def condition(self, model, item: PromptItem, device: torch.device) -> VideoCondition:
        """Text, negative prompt and the subject streams (with a VLM, v_ref's VLM tokens read the
        references with the empty prompt, v_ref_txt's the prompt too: `IDCrafterPipeline`), once per
        group. The streams carry grad when grad is on and the adapter trains."""
        pipe, cfg = self.pipe, self.config
        with torch.no_grad():
            text = pipe.encode_prompt([item.prompt], device)
            negative = pipe.encode_prompt([self.negative_prompt], device)
            inputs = pipe.encode_subject_inputs(list(item.refs), item.prompt, cfg.height, cfg.width, device) if item.refs else None
        stream = ref_stream = None
        if inputs is not None:
            grad = torch.is_grad_enabled() and any(p.requires_grad for p in model.adapter.parameters())
            with torch.set_grad_enabled(grad):
                stream, ref_stream = pipe.subject_streams(model, inputs)
        return VideoCondition(text, negative, stream, ref_stream)

    def velocity(self, model, cond: VideoCondition):
        """The guided velocity of `model`, which is the pipeline's transformer (the engine's module)."""
        pipe = self.pipe
        if model is not pipe.transformer:
            raise ValueError("the policy model must be the pipeline's transformer")
        dtype = model.dtype
        text, negative = cond.text.to(dtype), cond.negative.to(dtype)
        layouts: dict[int, tuple] = {}  # batch size -> (stream, guidance stream): laid out once, not per step

        def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            b = x.shape[0]
            if b not in layouts:
                stream = None if cond.stream is None else cond.stream.select([0] * b)
                ref = None if cond.ref_stream is None else cond.ref_stream.select([0] * b)
                layouts[b] = (stream, ref, pipe.guidance_stream(stream, True, ref))
            stream, ref, batched = layouts[b]
            v = pipe.guided_velocity(x.to(dtype), sigma * 1000.0, text, negative, stream, self.s_img, self.s_txt, batched,
                                     ref_stream=ref)
            return v.float()

        return velocity

    def latent_shape(self) -> tuple[int, int, int, int, int]:
        """[1, C, f, h, w] of one sample's latents."""
        cfg, pipe = self.config, self.pipe
        return (1, pipe.vae.config.z_dim, (cfg.num_frames - 1) // pipe.vae_scale_temporal + 1,
                cfg.height // pipe.vae_scale_spatial, cfg.width // pipe.vae_scale_spatial)

    def initial_noise(self, item: PromptItem, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(self.latent_shape(), generator=generator)

    def forward_work(self, cond: VideoCondition, checkpointing: bool) -> tuple[int, int, int]:
        """(video tokens of one transformer row, its analytic FLOPs reading the cached stream, the
        FLOPs of computing the condition's streams, as training when they carry grad)
        (idcrafter/video/flops.py). Every subject slot counts, as in SFT's `work`; with VLM tokens
        the two streams of the guidance passes are encoded as a batch of two."""
        from idcrafter.core.flops import training_step_flops
        from idcrafter.video import flops

        shape = flops.WanShape.from_config(self.sft.wan)
        idc = flops.IDCrafterShape.from_config(dataclasses.replace(self.config, wan=self.sft.wan))
        _, _, f, h, w = self.latent_shape()
        tokens = f * h * w // (shape.patch[0] * shape.patch[1] * shape.patch[2])
        stream = cond.stream
        subjects = 0 if stream is None else stream.subject_mask.shape[1]
        ref_tokens = 0 if stream is None else stream.ref_ranges[0][1] - stream.ref_ranges[0][0]
        count = flops.count_flops(shape, idc, tokens, cond.text.shape[1], subjects, ref_tokens)
        encoded = count.stream * (1 if cond.ref_stream is None else 2)
        if stream is not None and stream.kv and stream.kv[0].k.requires_grad:
            encoded = training_step_flops(encoded, checkpointing)
        return tokens, count.cached_forward, encoded

    def decode(self, latents: torch.Tensor) -> list[np.ndarray]:
        frames = self.pipe.decode_latents(latents.float(), self.device)  # [B, F, H, W, 3] in [0, 1]
        return [(f * 255).round().clamp(0, 255).to(torch.uint8).numpy() for f in frames]

    # ------------------------------------------------------------------ files
    def export(self, model, folder: Path) -> None:
        model.save_adapter(folder, include_base=self.policy == "full")

    def describe(self) -> dict:
        return {"preset": self.config.preset, "policy": self.policy, "guidance": [self.s_img, self.s_txt]}

