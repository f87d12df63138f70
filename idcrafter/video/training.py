"""ID-Crafter as a `TrainingSpec` for the generic DeepSpeed trainer (`idcrafter.train.trainer`).

Loss (DESIGN 6): z_t = (1 - t) z_0 + t eps with logit-normal t and the Wan shift, target
v = eps - z_0, L = mean ||v_theta - v||^2 + lambda * L_attn, where L_attn is the IDAR region loss
on the stage-3 shares of the first K blocks, for samples that carry subject masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from idcrafter.core.regularization import idar_loss, masks_to_token_assignment
from idcrafter.flow import add_noise, flow_loss, flow_target, sample_timesteps
from idcrafter.utils.cli import InputError
from idcrafter.video.config import IDCrafterConfig
from idcrafter.video.transformer import IDCrafterTransformer, to_velocity


@dataclass
class VideoDataArgs:
    data: str
    num_frames: int | None = None
    fps: int = 16
    height: int | None = None
    width: int | None = None
    ref_size: tuple[int, int] | None = None
    cache: str | None = None


@dataclass
class VideoModelArgs:
    preset: str = "tiny"
    base: str | None = None
    adapter: str | None = None
    lora_rank: int = 64
    attn_loss_weight: float = 0.0
    timestep_mean: float = 0.0
    timestep_std: float = 1.0
    init_seed: int = 0
    # Condition dropout trains the passes that guidance needs: no subjects (v_uncond) and the
    # negative/empty prompt (v_uncond, v_ref).
    drop_subjects: float = 0.1
    drop_text: float = 0.1
    hierarchy: str | None = None  # override for ablations: full, stage3, plain


class VideoTrainingSpec:
    """Loading, data, conditioning and loss of ID-Crafter training."""

    def __init__(self, model_args: VideoModelArgs, data_args: VideoDataArgs, policy: str = "new-modules",
                 samples: list | None = None):
        """`samples`: the manifest's samples when the caller has read them already (`read_samples`)."""
        self.m = model_args
        self.d = data_args
        self.policy = policy
        self.samples = samples
        if model_args.adapter is not None:
            self.config, _ = IDCrafterTransformer.read_adapter_config(model_args.adapter)
        else:
            self.config = IDCrafterConfig.from_preset(model_args.preset)
        wan = self.config.wan
        if model_args.base is not None:
            import json

            wan = json.loads((Path(model_args.base) / "transformer" / "config.json").read_text())
        self.hidden_size = wan["num_attention_heads"] * wan["attention_head_dim"]
        self.num_frames = data_args.num_frames or self.config.num_frames
        self.height = data_args.height or self.config.height
        self.width = data_args.width or self.config.width
        self.ref_size = data_args.ref_size or self.config.ref_canvas(self.height, self.width)

    # ------------------------------------------------------------------ model
    def build_model(self, device: torch.device, dtype: torch.dtype) -> IDCrafterTransformer:
        """Frozen VAE + text encoder (kept here) and the trainable IDCrafterTransformer (returned)."""
        from idcrafter.video.pipeline import IDCrafterPipeline
        from idcrafter.video.presets import build_components

        if self.m.base is not None:
            pipe = IDCrafterPipeline.from_pretrained(self.m.base, adapter=self.m.adapter, torch_dtype=dtype)
        else:
            pipe = IDCrafterPipeline.from_components(build_components(self.config, seed=self.m.init_seed))
            if self.m.adapter is not None:
                pipe.transformer.load_adapter(self.m.adapter)
        model = pipe.transformer
        if self.m.hierarchy and self.m.hierarchy != model.config.hierarchy:
            import dataclasses

            config = dataclasses.replace(model.config, hierarchy=self.m.hierarchy)
            model = IDCrafterTransformer(model.wan, config)  # a fresh adapter of the other kind
            pipe.register_modules(transformer=model)
        self.config = model.config
        if "lora" in self.policy and model.lora_config is None:
            model.add_lora(rank=self.m.lora_rank)
        pipe.text_encoder.to(device).requires_grad_(False)
        pipe.vae.to(device).requires_grad_(False)
        model.to(device=device, dtype=dtype)
        self.pipe = pipe  # the encoders live on; the transformer goes to DeepSpeed
        self.device = device
        self.empty_text = pipe.encode_prompt([""], device)  # what a dropped prompt becomes
        return model

    def trainable_parameters(self, model: IDCrafterTransformer, policy: str) -> list[nn.Parameter]:
        return model.trainable_parameters(policy)

    # ------------------------------------------------------------------ data
    def load_samples(self) -> list:
        """The manifest's samples, validated (cached); InputError naming the first bad line, or
        for a manifest without samples. Scripts call it before DeepSpeed starts."""
        if self.samples is None:
            from idcrafter.data.manifest import read_samples

            self.samples = read_samples(self.d.data)
        return self.samples

    def build_data(self, rank: int, world_size: int, seed: int, batch_size: int):
        from idcrafter.data.buckets import Bucket
        from idcrafter.data.dataset import BucketBatchSampler, VideoDataset, collate

        samples = self.load_samples()
        cache = None
        if self.d.cache:
            from idcrafter.data.cache import FeatureCache

            cache = FeatureCache(self.d.cache, fingerprint=self.cache_fingerprint())
        dataset = VideoDataset(
            samples, num_frames=self.num_frames, fps=self.d.fps, buckets=[Bucket(self.height, self.width)],
            ref_size=self.ref_size, max_subjects=self.config.max_subjects, cache=cache, seed=seed,
        )
        sampler = BucketBatchSampler(dataset, batch_size, num_replicas=world_size, rank=rank, seed=seed, drop_last=True)
        self.dataset = dataset
        return dataset, sampler, collate

    def cache_fingerprint(self) -> str:
        """What cached encodings depend on: the encoders, clip length, bucket and reference size."""
        from idcrafter.data.buckets import Bucket
        from idcrafter.data.cache import cache_fingerprint

        base = str(Path(self.m.base).resolve()) if self.m.base else f"random:{self.config.preset}:{self.m.init_seed}"
        return cache_fingerprint({"vae": base, "text_encoder": base}, self.num_frames, Bucket(self.height, self.width),
                                 tuple(self.ref_size), text_length=self.config.text_length, fps=self.d.fps)

    def build_cache(self, folder: str | Path, device: torch.device, progress: bool = True) -> dict[str, int]:
        """Encode every sample once (VAE latents, reference latents, UMT5 states) into a FeatureCache."""
        from idcrafter.data.buckets import Bucket
        from idcrafter.data.cache import FeatureCache, build_cache
        from idcrafter.data.dataset import VideoDataset, collate
        from idcrafter.data.manifest import load_manifest

        samples, errors = load_manifest(self.d.data)
        if errors:
            raise InputError(f"--data {self.d.data}: {len(errors)} bad lines (line {errors[0].line}: {errors[0].message})")
        dataset = VideoDataset(samples, num_frames=self.num_frames, fps=self.d.fps, buckets=[Bucket(self.height, self.width)],
                               ref_size=self.ref_size, max_subjects=self.config.max_subjects)

        def encode(item: dict) -> dict[str, torch.Tensor]:
            batch = collate([item])
            cond = self.prepare(batch, device)
            n = int(batch["subject_mask"][0].sum())
            return {"latents": cond["latents"][0].cpu(), "ref_latents": cond["ref_latents"][0, :n].cpu(),
                    "text_states": cond["text"][0].float().cpu()}

        with FeatureCache(folder, fingerprint=self.cache_fingerprint()) as cache:
            return build_cache(dataset, encode, cache, progress=progress)

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def prepare(self, batch: dict, device: torch.device) -> dict:
        """Frozen encoders: latents [B, C, f, h, w], reference latents [B, N, C, 1, h', w'], text states."""
        pipe = self.pipe
        if "latents" in batch:
            latents = batch["latents"].to(device)
        else:
            latents = pipe.encode_video(batch["video"].to(device), device)
        if "ref_latents" in batch:
            ref_latents = batch["ref_latents"].to(device)
        else:
            refs = batch["refs"]  # [B, N, 3, h, w]
            b, n = refs.shape[:2]
            ref_latents = pipe.encode_video(refs.flatten(0, 1)[:, :, None].to(device), device).unflatten(0, (b, n))
        text = batch["text_states"].to(device) if "text_states" in batch else pipe.encode_prompt(batch["prompts"], device)
        conditions = {"latents": latents, "ref_latents": ref_latents, "text": text,
                      "subject_mask": batch["subject_mask"].to(device)}
        if self.m.attn_loss_weight > 0 and batch.get("masks") is not None and bool(batch["has_masks"].any()):
            f, h, w = latents.shape[2:]
            p = pipe.transformer.wan.config.patch_size
            grid = (f // p[0], h // p[1], w // p[2])
            assignment = masks_to_token_assignment(batch["masks"].to(device), grid)
            assignment[~batch["has_masks"].to(device)] = -1  # samples without masks take no IDAR loss
            conditions["assignment"] = assignment
        return conditions

    def loss(self, model, conditions: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        z0 = conditions["latents"]
        b = z0.shape[0]
        t = sample_timesteps(b, generator, self.m.timestep_mean, self.m.timestep_std, self.config.flow_shift, z0.device)
        noise = torch.randn(z0.shape, generator=generator).to(z0)
        dtype = next(p for p in model.parameters()).dtype
        text, subject_mask = conditions["text"], conditions["subject_mask"]
        drop_text = (torch.rand(b, generator=generator) < self.m.drop_text).to(z0.device)
        drop_subjects = (torch.rand(b, generator=generator) < self.m.drop_subjects).to(z0.device)
        text = torch.where(drop_text[:, None, None], self.empty_text.to(text), text)
        subject_mask = subject_mask & ~drop_subjects[:, None]
        capture = {} if "assignment" in conditions else None
        z_t = add_noise(z0, noise, t).to(dtype)
        pred = model(
            z_t, t * 1000, text.to(dtype), return_dict=False,
            subjects=conditions["ref_latents"].to(dtype), subject_mask=subject_mask,
            attention_capture=capture,
        )[0]
        pred = to_velocity(self.config, pred, z_t, t)
        loss = flow_loss(pred, flow_target(z0, noise))
        metrics = {"loss_flow": loss.detach()}
        if capture:
            assignment = conditions["assignment"].masked_fill(drop_subjects[:, None], -1)
            l_attn, leak = idar_loss(list(capture.values()), assignment)
            metrics.update(loss_attn=l_attn.detach(), leakage=leak)
            loss = loss + self.m.attn_loss_weight * l_attn
        return loss, metrics

    # ------------------------------------------------------------------ files
    def export(self, model: IDCrafterTransformer, folder: Path) -> None:
        """The adapter; with the `full` policy also the fine-tuned base transformer (folder/transformer)."""
        model.save_adapter(folder, include_base=self.policy == "full")

    def describe(self) -> dict:
        return {"preset": self.config.preset, "num_frames": self.num_frames, "size": [self.height, self.width]}
