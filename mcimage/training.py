"""MultiCrafter / One-for-All as a `TrainingSpec` for the generic DeepSpeed trainer (`idcrafter.train.trainer`).

Loss (docs/design.md 6): z_t = (1 - t) z_0 + t eps on packed FLUX latents, logit-normal t with the
scheduler's shift, target v = eps - z_0, L = mean ||v_theta - v||^2 + lambda L_attn, where L_attn is
the IDAR region loss on the ref-restricted shares of the chosen (double) blocks for samples with masks.

The progressive recipe is a sequence of runs: `stage="single"` (single-subject samples only), then
`stage="multi"` (samples with two or more subjects) with lambda = 0.3, started from the first run's
adapter (MultiCrafter supp. Sec. B). One-for-All trains on single-subject pairs of any category, each
reference keeping its true category, so each category's position block (eq. 2) learns the
references that category shows (Sec. 3.2), with the pairs resampled by category
(`config.category_weights`, 2:2:2:1 in App. H). `config.category_binding = "random"` (a random
category per step, whatever the reference shows) is kept as an ablation only.

FLUX shares one set of position ids across a batch. Batches are therefore drawn from one subject
count; samples that still need different ids (other categories or descriptors) run as separate
forwards within one step, their losses averaged with weights proportional to their sample counts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from idcrafter.core.positions import DescriptorSpan, canonical_category, descriptor_token_indices
from idcrafter.core.regularization import idar_loss, masks_to_token_assignment
from idcrafter.flow import add_noise, flow_loss, flow_target, sample_timesteps
from idcrafter.utils.errors import ConfigError, FileFormatError
from mcimage.config import PRESETS, MCImageConfig, check_categories
from mcimage.transformer import MCImageTransformer, pack_latents

__all__ = ["ImageDataArgs", "ImageModelArgs", "ImageTrainingSpec", "STAGES", "scheduler_shift"]

STAGES = ("all", "single", "multi")


def scheduler_shift(scheduler_config: Any, image_seq_len: int) -> float:
    """The flow shift the pipeline's scheduler applies at this target length.

    FLUX's dynamic shifting maps sigma to e^mu / (e^mu + 1/sigma - 1), the static shift formula
    with s = e^mu, mu linear in the token count (diffusers' `calculate_shift`); otherwise s is the
    scheduler's static `shift`. Training t and RL sigma schedules use the same s.
    """
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    get = scheduler_config.get
    if get("use_dynamic_shifting", False):
        mu = calculate_shift(image_seq_len, get("base_image_seq_len", 256), get("max_image_seq_len", 4096),
                             get("base_shift", 0.5), get("max_shift", 1.15))
        return float(math.exp(mu))
    return float(get("shift", 1.0))


def equal_forwards(groups: list[tuple[tuple, list[int]]], device: torch.device) -> list[tuple[tuple, list[int], float]]:
    """The forwards of one micro-batch, as many on every rank: [(key, rows, weight)].

    FLUX shares one set of position ids per forward, so samples with other ids (categories,
    descriptors) run as separate forwards; under ZeRO-3 every forward gathers parameters with a
    collective, and ranks running different numbers of forwards would wait for each other forever.
    Each rank therefore splits its largest groups (the loss is a sample-count-weighted mean, so a
    split changes nothing) until it has as many as the rank with most; a rank with fewer samples
    than that (some failed to decode) adds forwards of weight 0, which still take part in backward.
    """
    import torch.distributed as dist

    target = len(groups)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        count = torch.tensor([target], device=device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        target = int(count.item())
    out = [(key, rows, 1.0) for key, rows in groups]
    while len(out) < target:
        largest = max(range(len(out)), key=lambda k: len(out[k][1]))
        key, rows, weight = out[largest]
        if len(rows) < 2:  # every group is one sample: repeat one at weight 0
            out.append((out[0][0], out[0][1], 0.0))
            continue
        half = len(rows) // 2
        out[largest:largest + 1] = [(key, rows[:half], weight), (key, rows[half:], weight)]
    return out


@dataclass
class ImageDataArgs:
    data: str
    height: int = 512
    width: int = 512
    ref_size: tuple[int, int] | None = None  # canvas of the references (default: the target size)
    stage: str = "all"  # all, single (one subject) or multi (two or more)


@dataclass
class ImageModelArgs:
    preset: str = "tiny-multicrafter"
    base: str | None = None  # FLUX diffusers folder; None: the preset's random components
    adapter: str | None = None  # start from this adapter (its config wins over the preset)
    init_seed: int = 0
    # lambda of IDAR; > 0 turns share capture on. None: the preset's idar_lambda (MultiCrafter supp.
    # Sec. B: 0.3) when IDAR is on and samples have several subjects, else 0.
    attn_loss_weight: float | None = None
    timestep_mean: float = 0.0
    timestep_std: float = 1.0
    guidance: float | None = None  # distilled-guidance value fed in training (default: the preset's)
    overrides: dict[str, Any] = field(default_factory=dict)  # MCImageConfig fields (ablations)
    # MoE-LoRA only: also export a diffusers LoRA with the experts merged at these gates (approximate;
    # `MCImageTransformer.save_adapter`). A plain LoRA is always exported in diffusers' format too.
    merged_lora_routing: tuple[float, ...] | None = None


class ImageTrainingSpec:
    """Loading, data, conditioning and loss of MultiCrafter / One-for-All training."""

    def __init__(self, model_args: ImageModelArgs, data_args: ImageDataArgs, policy: str = "adapter"):
        self.m, self.d, self.policy = model_args, data_args, policy
        if data_args.stage not in STAGES:
            raise ConfigError(f"--stage {data_args.stage!r}: use one of {', '.join(STAGES)}")
        if model_args.adapter is not None:
            try:
                config = MCImageTransformer.read_adapter_config(model_args.adapter)
            except ValueError as err:
                raise FileFormatError(f"--adapter {model_args.adapter}: {err}") from None
        elif model_args.preset in PRESETS:
            config = MCImageConfig.from_preset(model_args.preset)
        else:
            raise ConfigError(f"--preset {model_args.preset!r} is unknown; known presets: {', '.join(sorted(PRESETS))}")
        overrides = dict(model_args.overrides)
        if model_args.attn_loss_weight is None:
            idar = overrides.get("idar", config.idar)
            lam = overrides.get("idar_lambda", config.idar_lambda)
            model_args.attn_loss_weight = float(lam) if idar and data_args.stage != "single" else 0.0
        if model_args.attn_loss_weight > 0:
            overrides.setdefault("idar", True)
        if overrides:
            try:
                config = dataclasses.replace(config, **overrides)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"config overrides {overrides}: {err}") from None
        self.config = config
        routing = model_args.merged_lora_routing
        if routing is not None and (config.adapter != "moe_lora" or len(routing) != config.num_experts):
            raise ConfigError(f"--merged-lora-routing: {len(routing)} gates, but the adapter is {config.adapter!r}"
                              + (f" with {config.num_experts} experts" if config.adapter == "moe_lora" else "")
                              + " (it merges the experts of a MoE-LoRA, one gate each)")
        if model_args.attn_loss_weight > 0 and not config.idar:
            raise ConfigError("--attn-loss-weight > 0 needs IDAR share capture (config idar=True)")
        flux = config.flux
        if model_args.base is not None:
            import json

            path = Path(model_args.base) / "transformer" / "config.json"
            if not path.is_file():
                raise FileFormatError(f"--base {model_args.base}: not a FLUX diffusers folder (no transformer/config.json)")
            try:
                flux = json.loads(path.read_text())
                flux["num_attention_heads"] * flux["attention_head_dim"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise FileFormatError(f"--base {model_args.base}: {path} is not a FLUX transformer config ({err})") from None
        self.hidden_size = flux["num_attention_heads"] * flux["attention_head_dim"]
        self.height, self.width = data_args.height, data_args.width
        self.ref_size = tuple(data_args.ref_size or config.ref_size or (self.height, self.width))

    # ------------------------------------------------------------------ model
    def build_model(self, device: torch.device, dtype: torch.dtype) -> MCImageTransformer:
        """Frozen VAE + text encoders (kept in `self.pipe`) and the trainable MCImageTransformer (returned)."""
        from mcimage.pipeline import MCImagePipeline
        from mcimage.presets import build_tiny_components

        # FluxPipeline warns about every truncated caption; in training that is one line per step.
        logging.getLogger("diffusers.pipelines.flux.pipeline_flux").setLevel(logging.ERROR)
        try:
            if self.m.base is not None:
                pipe = MCImagePipeline.from_pretrained(self.m.base, adapter=self.m.adapter, config=self.config,
                                                       torch_dtype=dtype)
            else:
                pipe = MCImagePipeline.from_components(build_tiny_components(self.config, seed=self.m.init_seed))
                if self.m.adapter is not None:
                    pipe.transformer.load_adapter(self.m.adapter)
        except (ValueError, OSError, KeyError) as err:
            what = f"--base {self.m.base}" if self.m.base is not None else f"--adapter {self.m.adapter}"
            raise FileFormatError(f"{what}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
        model = pipe.transformer
        loaded = model.mc_config
        if self.m.base is not None:  # the loaded transformer's architecture is the one that counts
            self.config = dataclasses.replace(self.config, flux=loaded.flux)
        if loaded != self.config:
            # A loaded adapter (--adapter, BASE/mcimage_adapter, or a BASE saved with its adapter) brings its
            # own config; of the request only the IDAR capture settings apply (stage 2 turns IDAR on for a
            # stage-1 adapter).
            fixed = sorted(k for k in self.m.overrides if k not in model.CAPTURE_FIELDS
                           and getattr(loaded, k) != getattr(self.config, k))
            if fixed:
                raise ConfigError(f"--set {', '.join(fixed)}: the loaded adapter fixes these (its config has "
                                  f"{', '.join(f'{k}={getattr(loaded, k)!r}' for k in fixed)})")
            capture = {k: getattr(self.config, k) for k in model.CAPTURE_FIELDS} if self.m.attn_loss_weight > 0 else {}
            self.config = dataclasses.replace(loaded, **capture)
            model.set_capture_config(self.config)
        for name in ("text_encoder", "text_encoder_2", "vae"):
            getattr(pipe, name).to(device).requires_grad_(False)
        model.to(device=device, dtype=dtype)
        self.pipe, self.device = pipe, device
        mult = pipe.vae_scale_factor * 2
        for what, (h, w) in (("size", (self.height, self.width)), ("reference size", self.ref_size)):
            if h % mult or w % mult:
                raise ConfigError(f"{what} {h}x{w}: height and width must be multiples of {mult} for this model")
        target_len = (self.height // mult) * (self.width // mult)
        self.shift = scheduler_shift(pipe.scheduler.config, target_len)
        return model

    def trainable_parameters(self, model: MCImageTransformer, policy: str) -> list[nn.Parameter]:
        try:
            return list(model.trainable_parameters(policy).values())
        except ValueError as err:
            raise ConfigError(f"--trainable {policy}: {err}") from None

    # ------------------------------------------------------------------ data
    def load_samples(self) -> list:
        from idcrafter.data.manifest import read_samples

        samples = read_samples(self.d.data)
        videos = [s.id for s in samples if s.is_video]
        if videos:
            raise FileFormatError(f"--data {self.d.data}: {len(videos)} samples are videos (first: {videos[0]}); "
                                  "the image branch trains on image samples")
        if self.d.stage == "single":
            samples = [s for s in samples if len(s.subjects) == 1]
        elif self.d.stage == "multi":
            samples = [s for s in samples if len(s.subjects) >= 2]
        if not samples:
            raise FileFormatError(f"--data {self.d.data}: no samples for stage {self.d.stage!r}")
        too_many = [s.id for s in samples if len(s.subjects) > self.config.max_subjects]
        if too_many:
            raise FileFormatError(f"--data {self.d.data}: {len(too_many)} samples have more than "
                                  f"{self.config.max_subjects} subjects (first: {too_many[0]})")
        cfg = self.config
        if cfg.uses_categories and cfg.category_binding == "true":
            for s in samples:  # category ids need one known, distinct category per reference
                try:
                    check_categories(cfg, len(s.subjects), [x.category for x in s.subjects])
                except ValueError as err:
                    raise FileFormatError(f"--data {self.d.data}: line {s.line} ({s.id}): {err}") from None
        if cfg.category_binding == "random":
            drawable = sum(w > 0 for w in cfg.category_weights.values())
            most = max(len(s.subjects) for s in samples)
            if most > drawable:
                raise ConfigError(f"category_binding random draws from {drawable} categories but samples have up to "
                                  f"{most} subjects")
        self.sample_weights(samples)  # its problems too are reported before DeepSpeed starts
        return samples

    def sample_weights(self, samples: list) -> list[float] | None:
        """Resampling weights, one per sample, that draw the categories in the ratio of
        `config.category_weights` (a sample of category c: w_c / n_c); None without weights.

        Applies to single-subject pairs (One-for-All's training data) with true categories; a
        category of the data that the weights leave out is an error (say 0 to leave it out)."""
        cfg = self.config
        if not cfg.category_weights or cfg.category_binding == "random":
            return None
        multi = [s for s in samples if len(s.subjects) != 1]
        if multi:
            raise ConfigError(f"--data {self.d.data}: category resampling is for single-subject pairs and "
                              f"{len(multi)} samples have several subjects (first: line {multi[0].line}); use "
                              "--stage single or --category-weights none")
        cats = [canonical_category(s.subjects[0].category) for s in samples]
        missing = sorted(set(cats) - set(cfg.category_weights))
        if missing:
            raise ConfigError(f"--category-weights has no weight for {', '.join(missing)} (categories of the data)")
        counts = {c: cats.count(c) for c in set(cats)}
        return [cfg.category_weights[c] / counts[c] for c in cats]

    def build_data(self, rank: int, world_size: int, seed: int, batch_size: int):
        from idcrafter.data.buckets import Bucket
        from idcrafter.data.dataset import BucketBatchSampler, VideoDataset, collate

        samples = self.load_samples()
        dataset = VideoDataset(samples, num_frames=1, buckets=[Bucket(self.height, self.width)],
                               ref_size=self.ref_size, max_subjects=self.config.max_subjects, seed=seed)
        # Batches of one subject count (and, with true categories, one category tuple) share their
        # position ids: one forward per step, not one per kind of sample.
        by_category = self.config.uses_categories and self.config.category_binding == "true"
        keys = [None if key is None else (*key, len(s.subjects),
                                          tuple(canonical_category(x.category) for x in s.subjects) if by_category else ())
                for key, s in zip(dataset.bucket_ids(), samples)]
        sampler = BucketBatchSampler(keys, batch_size, num_replicas=world_size, rank=rank, seed=seed, drop_last=True,
                                     weights=self.sample_weights(samples))
        self.dataset = dataset
        return dataset, sampler, collate

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, tuple[int, int]]:
        """pixels [B, 3, H, W] in [-1, 1] -> packed latents [B, L, C] (FLUX scaling and shift) and their grid."""
        vae = self.pipe.vae
        z = vae.encode(pixels.to(device=self.device, dtype=vae.dtype)).latent_dist.mode()
        z = (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
        return pack_latents(z.to(dtype))

    def descriptor_tokens(self, prompt: str, descriptors: list, categories: list[str]) -> dict[str, list[int]]:
        """{category: T5 token indices} of the subjects' descriptors found in the prompt (CCPA)."""
        spans = []
        for text, category in zip(descriptors, categories):
            if not text:
                continue
            start = prompt.find(text)
            if start < 0:  # the manifest check refuses such samples (idcrafter.data.manifest)
                raise ValueError(f"descriptor {text!r} is not in the prompt {prompt!r}")
            spans.append(DescriptorSpan(category, start, start + len(text), text))
        if not spans:
            return {}
        encoded = self.pipe.tokenizer_2(prompt, padding="max_length", max_length=self.config.text_length,
                                        truncation=True, return_offsets_mapping=True)
        try:
            return descriptor_token_indices(spans, encoded["offset_mapping"])
        except ValueError:
            return {}  # truncated away: train this sample without descriptor positions

    @torch.no_grad()
    def prepare(self, batch: dict, device: torch.device) -> dict:
        """Frozen encoders: packed target and reference latents, T5 + CLIP states, IDAR assignment."""
        dtype = next(self.pipe.transformer.parameters()).dtype
        latents, target_hw = self.encode_images(batch["video"][:, :, 0].to(device), dtype)
        refs = batch["refs"]  # [B, N, 3, rh, rw]
        b, n = refs.shape[:2]
        ref_tokens, ref_hw = self.encode_images(refs.flatten(0, 1).to(device), dtype)
        text, pooled, _ = self.pipe.encode_prompt(prompt=batch["prompts"], prompt_2=None, device=device,
                                                  max_sequence_length=self.config.text_length)
        cond = {"latents": latents, "target_hw": target_hw, "ref_latents": ref_tokens.unflatten(0, (b, n)),
                "ref_hw": ref_hw, "counts": batch["subject_mask"].sum(1).tolist(), "text": text.to(dtype),
                "pooled": pooled.to(dtype), "categories": batch["categories"], "descriptors": batch["descriptors"],
                "prompts": batch["prompts"]}
        if self.m.attn_loss_weight > 0 and batch.get("masks") is not None and bool(batch["has_masks"].any()):
            assignment = masks_to_token_assignment(batch["masks"][:, :, 0].to(device), target_hw)
            assignment[~batch["has_masks"].to(device)] = -1  # samples without masks take no IDAR loss
            cond["assignment"] = assignment
        return cond

    def sample_categories(self, cond: dict, generator: torch.Generator) -> list[tuple[str, ...] | None]:
        """Per sample: the categories its references use (None with UNO ids).

        Random categories are drawn once per subject count in the batch (distinct within a sample),
        so samples with the same count share ids and run in one forward.
        """
        cfg = self.config
        drawn: dict[int, tuple[str, ...]] = {}
        out = []
        for count, cats in zip(cond["counts"], cond["categories"]):
            if cfg.category_binding == "random":  # the ablation: a random category, whatever the reference shows
                if count not in drawn:
                    names = list(cfg.category_weights)
                    probs = torch.tensor([cfg.category_weights[n] for n in names], dtype=torch.float64)
                    pick = torch.multinomial(probs, count, replacement=False, generator=generator).tolist()
                    drawn[count] = tuple(names[i] for i in pick)
                out.append(drawn[count])
            elif cfg.uses_categories:
                out.append(tuple(canonical_category(c) for c in cats[:count]))
            else:
                out.append(None)
        return out

    def loss(self, model, cond: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        z0 = cond["latents"]
        b = z0.shape[0]
        t = sample_timesteps(b, generator, self.m.timestep_mean, self.m.timestep_std, self.shift, z0.device)
        noise = torch.randn(z0.shape, generator=generator).to(z0)
        z_t = add_noise(z0.float(), noise.float(), t).to(z0.dtype)  # at the exact t the model is told
        target = flow_target(z0, noise)
        categories = self.sample_categories(cond, generator)
        guidance = None
        if self.config.flux.get("guidance_embeds"):
            value = self.config.guidance_scale if self.m.guidance is None else self.m.guidance
            guidance = torch.full((b,), float(value), device=z0.device)

        groups: dict[tuple, list[int]] = {}
        for i in range(b):
            descriptors = {}
            if self.config.ccpa and categories[i]:
                descriptors = self.descriptor_tokens(cond["prompts"][i], cond["descriptors"][i], list(categories[i]))
            key = (cond["counts"][i], categories[i], tuple(sorted((c, tuple(v)) for c, v in descriptors.items())))
            groups.setdefault(key, []).append(i)

        loss_flow = z0.new_zeros((), dtype=torch.float32)
        loss_attn, leak, attn_weight = z0.new_zeros((), dtype=torch.float32), 0.0, 0.0
        forwards = equal_forwards(list(groups.items()), z0.device)
        for (n, cats, descriptors), rows, weight in forwards:
            idx = torch.tensor(rows, device=z0.device)
            share = weight * len(rows) / b
            # One subject has nothing to leak to (its share is 1): no capture, no IDAR term.
            capture = {} if "assignment" in cond and n > 1 else None
            pred = model(
                z_t[idx], cond["ref_latents"][idx, :n] if n else None, cond["text"][idx], cond["pooled"][idx], t[idx],
                None if guidance is None else guidance[idx], target_hw=cond["target_hw"],
                ref_hws=[cond["ref_hw"]] * n if n else None, categories=list(cats) if cats else None,
                descriptor_tokens=dict(descriptors) or None, attention_capture=capture,
            )
            loss_flow = loss_flow + share * flow_loss(pred, target[idx])
            if capture:
                assignment = cond["assignment"][idx]
                if bool((assignment >= 0).any()):
                    l_attn, l_leak = idar_loss(list(capture.values()), assignment)
                    loss_attn = loss_attn + share * l_attn
                    leak += share * float(l_leak)
                    attn_weight += share
        loss = loss_flow
        metrics = {"loss_flow": loss_flow.detach(), "forwards": float(len(forwards))}
        if "assignment" in cond:
            # Every rank logs the same keys; a step without multi-subject samples reports 0 for both.
            loss = loss + self.m.attn_loss_weight * loss_attn
            metrics.update(loss_attn=loss_attn.detach(), leakage=leak / max(attn_weight, 1e-9))
        if self.config.adapter == "moe_lora" and self.config.load_balance_weight > 0:
            from idcrafter.core.moe_lora import load_balancing_loss

            balance = load_balancing_loss(model)
            loss = loss + self.config.load_balance_weight * balance
            metrics["loss_balance"] = balance.detach()
        return loss, metrics

    def work(self, conditions: dict, checkpointing: bool) -> tuple[int, int]:
        """(target-image tokens, analytic training FLOPs) of one micro-batch (mcimage/flops.py).

        Each sample counts with the references its forward takes (its own subject count) and, as
        in `loss`, with IDAR shares when the batch has masks and it has two or more subjects. The
        rare weight-0 forwards `equal_forwards` adds to keep ranks in step are not counted.
        """
        from mcimage import flops

        latents, refs = conditions["latents"], conditions["ref_latents"]  # [B, L_t, C], [B, N, L_r, C]
        target, ref_tokens, text = latents.shape[1], refs.shape[2], conditions["text"].shape[1]
        capture = "assignment" in conditions
        total = sum(flops.training_step_flops(
            flops.forward_flops(self.config, target, text, n * ref_tokens, n, capture=capture and n > 1), checkpointing)
            for n in (int(c) for c in conditions["counts"]))
        return latents.shape[0] * target, total

    # ------------------------------------------------------------------ validation
    def validation_items(self, path: str, limit: int) -> list:
        """The first `limit` samples of the held-out manifest `path`: image samples whose references
        the model can place (a category each for category position ids). Otherwise FileFormatError
        (a video sample) or ConfigError (categories the model cannot place), naming --validation-data;
        a bad manifest is read_samples' InputError (a boundary check)."""
        from idcrafter.data.manifest import read_samples

        items = read_samples(path, "--validation-data", self.config.max_subjects)[:limit]
        for s in items:
            if s.is_video:
                raise FileFormatError(f"--validation-data {path}: line {s.line} ({s.id}) is a video; the image branch "
                                 "samples images")
            try:
                check_categories(self.config, len(s.subjects), self.validation_categories(s))
            except ValueError as err:
                raise ConfigError(f"--validation-data {path}: line {s.line} ({s.id}): {err}") from None
        return items

    def validation_categories(self, sample) -> list[str] | None:
        """The categories the pipeline gets for a sample's references: the manifest's with category
        position ids, none with UNO ids."""
        return [s.category for s in sample.subjects] if self.config.uses_categories else None

    @torch.no_grad()
    def validation_samples(self, model: MCImageTransformer, items: list, steps: int | None, seed: int
                           ) -> list[np.ndarray]:
        """Each item (a manifest sample) generated by the pipeline around `model`, the training
        transformer itself, at the training size and reference canvas: uint8 [H, W, 3] per item.
        Item i draws its noise from seed + i; `steps` None: the preset's; the training guidance;
        with CCPA the descriptors' tokens as training places them. The same call on the exported
        adapter (`MCImagePipeline`) gives the same pixels."""
        pipe = self.pipe
        if model is not pipe.transformer:
            raise ValueError("validation samples need the pipeline's own transformer (the engine's module)")
        pipe.set_progress_bar_config(disable=True)
        out = []
        for i, item in enumerate(items):
            categories = self.validation_categories(item)
            descriptors = None
            if self.config.ccpa and categories:
                descriptors = self.descriptor_tokens(item.prompt, [s.descriptor for s in item.subjects],
                                                     [canonical_category(c) for c in categories]) or None
            image = pipe(item.prompt, [s.image for s in item.subjects], categories, height=self.height,
                         width=self.width, num_inference_steps=steps, guidance_scale=self.m.guidance,
                         generator=torch.Generator().manual_seed(seed + i), output_type="np",
                         ref_size=self.ref_size, descriptor_tokens=descriptors).images[0]
            out.append((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
        return out

    # ------------------------------------------------------------------ files
    def export(self, model: MCImageTransformer, folder: Path) -> None:
        """The adapter (with a plain LoRA, or `merged_lora_routing`, also in diffusers' LoRA format);
        with the `all` policy also a complete pipeline folder (folder/pipeline)."""
        model.save_adapter(folder, merged_routing=self.m.merged_lora_routing)
        if self.policy == "all":
            self.pipe.save_pretrained(folder / "pipeline")

    def describe(self) -> dict:
        return {"preset": self.config.preset, "stage": self.d.stage, "size": [self.height, self.width],
                "ref_size": list(self.ref_size), "attn_loss_weight": self.m.attn_loss_weight,
                "category_binding": self.config.category_binding, "category_weights": self.config.category_weights}

