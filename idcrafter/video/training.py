"""ID-Crafter as a `TrainingSpec` for the generic DeepSpeed trainer (`idcrafter.train.trainer`).

Loss (docs/design.md 6): z_t = (1 - t) z_0 + t eps with logit-normal t and the Wan shift, target
v = eps - z_0, L = mean ||v_theta - v||^2 + lambda * L_attn, where L_attn is the IDAR region loss
on the stage-3 shares of the first K blocks, for samples that carry subject masks.

With a VLM (`VideoModelArgs.vlm`, ID-Crafter Sec. 3.2 and App. A), the frozen Qwen2.5-VL reads each
sample's prompt and reference images (or its states come from the feature cache), the trainable
connector maps them to the DiT width, and the tokens join the subject keys of stage 3. Which input
the VLM reads follows the condition dropout: see `VideoTrainingSpec.vlm_conditions`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from idcrafter.core.regularization import idar_loss, masks_to_token_assignment
from idcrafter.flow import add_noise, flow_loss, flow_target, sample_timesteps
from idcrafter.utils.errors import ConfigError, FileFormatError
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
    hierarchy: str | None = None  # override for ablations (IDCrafterConfig.hierarchy)
    stage3_projections: str | None = None  # override (IDCrafterConfig.stage3_projections)
    stage3_init: str | None = None  # override for a fresh "attn2" stage 3 (IDCrafterConfig.stage3_init)
    # Qwen2.5-VL folder: train the VLM connector (use_vlm). The VLM itself stays frozen.
    vlm: str | None = None


def stage3_layout(config: IDCrafterConfig) -> tuple:
    """What a fresh adapter's attention looks like: the hierarchy, the stage-3 form and, for the
    "attn2" form, its initialisation (two configs with equal layouts need no new adapter)."""
    init = config.stage3_init if config.uses_stage3 and config.stage3_projections == "attn2" else None
    return config.hierarchy, config.stage3_projections, init


# Which VLM input each dropout case reads, and the cache keys of its states ("" = `vlm_states`).
VLM_INPUTS = {"full": "", "ref": "ref_", "text": "text_"}


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
        self.start_config = self.config  # what the model is built as, before a VLM connector joins
        if model_args.vlm is not None:
            from idcrafter.video.infer import vlm_hidden_size

            size = vlm_hidden_size(model_args.vlm)
            if self.config.use_vlm and self.config.vlm_dim != size:
                raise ConfigError(f"--vlm {model_args.vlm}: hidden size {size}, but the adapter's VLM connector reads "
                                  f"{self.config.vlm_dim} (it was trained with another VLM)")
            self.config = dataclasses.replace(self.config, use_vlm=True, vlm_dim=size)
        self.vlm_encoder = None  # loaded on first use: a run from a complete feature cache never needs it
        self._by_id: dict | None = None
        wan = self.config.wan
        if model_args.base is not None:
            import json

            wan = json.loads((Path(model_args.base) / "transformer" / "config.json").read_text())
        self.hidden_size = wan["num_attention_heads"] * wan["attention_head_dim"]
        self.wan = wan
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
            pipe = IDCrafterPipeline.from_components(build_components(self.start_config, seed=self.m.init_seed))
            if self.m.adapter is not None:
                pipe.transformer.load_adapter(self.m.adapter)
        model = pipe.transformer
        current = model.idcrafter_config
        wanted = dataclasses.replace(current, hierarchy=self.m.hierarchy or current.hierarchy,
                                     stage3_projections=self.m.stage3_projections or current.stage3_projections,
                                     stage3_init=self.m.stage3_init or current.stage3_init)
        if stage3_layout(wanted) != stage3_layout(current):
            model.replace_adapter(wanted)
        if self.m.vlm is not None:
            if model.adapter.vlm_connector is None:
                # Seeded apart from the global RNG, so every rank starts from the same connector.
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.m.init_seed)
                    model.add_vlm_connector(self.config.vlm_dim)
            from idcrafter.video.infer import vlm_identity

            model.vlm_folder = vlm_identity(self.m.vlm)  # recorded in the exported adapter
        self.config = model.idcrafter_config
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
        """The manifest's samples, validated (cached); the manifest validation's one-line error naming the first bad line, or
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
        encoders = {"vae": base, "text_encoder": base}
        extra = {}
        if self.m.vlm is not None:  # absent without a VLM, so caches built before VLM training still open
            from idcrafter.video.infer import vlm_identity
            from idcrafter.video.vlm import DEFAULT_MAX_IMAGE_SIDE, INSTRUCTION

            encoders["vlm"] = vlm_identity(self.m.vlm)
            extra["vlm_input"] = {"instruction": INSTRUCTION, "max_image_side": DEFAULT_MAX_IMAGE_SIDE}
        return cache_fingerprint(encoders, self.num_frames, Bucket(self.height, self.width), tuple(self.ref_size),
                                 text_length=self.config.text_length, fps=self.d.fps, **extra)

    def build_cache(self, folder: str | Path, device: torch.device, progress: bool = True) -> dict[str, int]:
        """Encode every sample once (VAE latents, reference latents, UMT5 states, and with a VLM the
        states of its three dropout inputs, see `vlm_conditions`) into a FeatureCache."""
        from idcrafter.data.buckets import Bucket
        from idcrafter.data.cache import FeatureCache, build_cache
        from idcrafter.data.dataset import VideoDataset, collate
        from idcrafter.data.manifest import load_manifest

        samples, errors = load_manifest(self.d.data)
        if errors:
            raise FileFormatError(f"--data {self.d.data}: {len(errors)} bad lines (line {errors[0].line}: {errors[0].message})")
        dataset = VideoDataset(samples, num_frames=self.num_frames, fps=self.d.fps, buckets=[Bucket(self.height, self.width)],
                               ref_size=self.ref_size, max_subjects=self.config.max_subjects)

        def encode(item: dict) -> dict[str, torch.Tensor]:
            batch = collate([item])
            cond = self.prepare(batch, device)
            n = int(batch["subject_mask"][0].sum())
            tensors = {"latents": cond["latents"][0].cpu(), "ref_latents": cond["ref_latents"][0, :n].cpu(),
                       "text_states": cond["text"][0].float().cpu()}
            if self.config.use_vlm:
                # One VLM call per input, as training makes for a batch of one: cached and computed
                # states are then the same numbers.
                images = self.reference_images([item["id"]])[0]
                inputs = {"full": (item["prompt"], images), "ref": ("", images), "text": (item["prompt"], [])}
                for kind, (prompt, refs) in inputs.items():
                    out = self.vlm().encode([prompt], [refs])
                    tensors[f"vlm_{VLM_INPUTS[kind]}states"] = out.states[0].cpu()
                    tensors[f"vlm_{VLM_INPUTS[kind]}mask"] = out.mask[0].cpu()
            return tensors

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
        if self.config.use_vlm:
            if "vlm_states" in batch:  # from the feature cache: every dropout input is there
                conditions["vlm_cached"] = {kind: (batch[f"vlm_{key}states"].to(device), batch[f"vlm_{key}mask"].to(device))
                                            for kind, key in VLM_INPUTS.items()}
            else:  # the VLM runs in `loss`, on only the input each row's dropout leaves
                conditions["vlm_inputs"] = (list(batch["prompts"]), self.reference_images(batch["ids"]))
        if self.m.attn_loss_weight > 0 and batch.get("masks") is not None and bool(batch["has_masks"].any()):
            f, h, w = latents.shape[2:]
            p = pipe.transformer.config.patch_size
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
        vlm_states, vlm_mask = self.vlm_conditions(conditions, drop_text, drop_subjects)
        capture = {} if "assignment" in conditions else None
        z_t = add_noise(z0, noise, t).to(dtype)
        pred = model(
            z_t, t * 1000, text.to(dtype), return_dict=False,
            subjects=conditions["ref_latents"].to(dtype), subject_mask=subject_mask,
            vlm_states=vlm_states, vlm_mask=vlm_mask, attention_capture=capture,
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

    # ------------------------------------------------------------------ VLM
    def vlm(self):
        """The frozen Qwen2.5-VL, loaded on first use on this rank (bf16 on a GPU, float32 on a CPU)."""
        if self.m.vlm is None:
            raise ConfigError("this model was trained with the VLM encoder: give the VLM folder (--vlm)")
        if self.vlm_encoder is None:
            from idcrafter.video.vlm import VLMSemanticEncoder

            device = getattr(self, "device", torch.device("cpu"))
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            self.vlm_encoder = VLMSemanticEncoder.from_pretrained(self.m.vlm, device=device, dtype=dtype)
        return self.vlm_encoder

    def reference_images(self, ids: list[str]) -> list[list]:
        """Each sample's reference images as the VLM reads them at inference (whole files, RGB)."""
        from idcrafter.utils.media import load_rgb

        if self._by_id is None:
            self._by_id = {s.id: s for s in self.load_samples()}
        return [[load_rgb(s.image) for s in self._by_id[i].subjects] for i in ids]

    def vlm_conditions(self, conditions: dict, drop_text: torch.Tensor, drop_subjects: torch.Tensor
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """VLM states [B, L, D_vlm] and mask [B, L] of what each row's condition dropout leaves.

        The VLM never sees a dropped condition, and each case is the input of one sampling pass
        (`IDCrafterPipeline.guided_velocity`), so guidance runs on passes training has seen:
            prompt and subjects kept:  VLM(prompt, references)       v_ref_txt
            prompt dropped:            VLM("", references)           v_ref (empty prompt, as UMT5 gets)
            subjects dropped:          VLM(prompt, no images)        the text pass of a call without references
            both dropped:              no VLM token (mask all False) v_uncond
        With no subject and no VLM token, stage 3 has no key and adds nothing: v_uncond is the base
        model on the empty (at inference: negative) prompt, as for a model without the VLM. A VLM call on an empty chat
        would carry no information and would cost a call. (None, None) without the VLM encoder.
        """
        if not self.config.use_vlm:
            return None, None
        # (prompt dropped, subjects dropped) -> the input the VLM reads
        which = {(False, False): "full", (True, False): "ref", (False, True): "text", (True, True): None}
        kinds = [which[(t, s)] for t, s in zip(drop_text.tolist(), drop_subjects.tolist())]
        rows: list[torch.Tensor | None] = [None] * len(kinds)
        if "vlm_cached" in conditions:
            for i, kind in enumerate(kinds):
                if kind is not None:
                    states, mask = conditions["vlm_cached"][kind]
                    rows[i] = states[i][mask[i]]
        else:
            prompts, images = conditions["vlm_inputs"]
            todo = [i for i, kind in enumerate(kinds) if kind is not None]
            if todo:
                out = self.vlm().encode(["" if kinds[i] == "ref" else prompts[i] for i in todo],
                                        [[] if kinds[i] == "text" else images[i] for i in todo])
                for i, states in zip(todo, out.unpadded()):
                    rows[i] = states
        device = conditions["latents"].device
        found = [r for r in rows if r is not None]
        dtype = found[0].dtype if found else torch.float32
        # At least one (masked) position, so the connector always runs and always has a gradient.
        length = max([1] + [r.shape[0] for r in found])
        states = torch.zeros(len(rows), length, self.config.vlm_dim, dtype=dtype, device=device)
        mask = torch.zeros(len(rows), length, dtype=torch.bool, device=device)
        for i, r in enumerate(rows):
            if r is not None:
                states[i, : r.shape[0]] = r.to(device)
                mask[i, : r.shape[0]] = True
        return states, mask

    # ------------------------------------------------------------------ validation
    def validation_items(self, path: str, limit: int) -> list:
        """The first `limit` samples of the held-out manifest `path` (InputError naming
        --validation-data for a bad manifest or too many subjects)."""
        from idcrafter.data.manifest import read_samples

        return read_samples(path, "--validation-data", self.config.max_subjects)[:limit]

    @torch.no_grad()
    def validation_samples(self, model: IDCrafterTransformer, items: list, steps: int | None, seed: int
                           ) -> list[np.ndarray]:
        """Each item (a manifest sample: prompt and reference images) generated by the pipeline
        around `model`, the training transformer itself, at the training size and clip length:
        uint8 [T, H, W, 3] per item. Item i draws its noise from seed + i; `steps` None: the
        preset's. The same call on the exported adapter (`IDCrafterPipeline`) gives the same frames.
        With the VLM connector the pipeline reads VLM tokens as at inference."""
        pipe = self.pipe
        if model is not pipe.transformer:
            raise ValueError("validation samples need the pipeline's own transformer (the engine's module)")
        if self.config.use_vlm and pipe.vlm is None:
            pipe.register_modules(vlm=self.vlm())
        pipe.set_progress_bar_config(disable=True)
        out = []
        for i, item in enumerate(items):
            frames = pipe(item.prompt, [s.image for s in item.subjects], height=self.height, width=self.width,
                          num_frames=self.num_frames, num_inference_steps=steps,
                          generator=torch.Generator().manual_seed(seed + i), output_type="np").frames[0]
            out.append((np.clip(frames, 0, 1) * 255).round().astype(np.uint8))
        return out

    def work(self, conditions: dict, checkpointing: bool) -> tuple[int, int]:
        """(video tokens, analytic training FLOPs) of one micro-batch (idcrafter/video/flops.py).

        Every subject slot counts: the tower runs over all N slots of the batch, padding included.
        """
        from idcrafter.video import flops

        latents, refs = conditions["latents"], conditions["ref_latents"]  # [B, C, f, h, w], [B, N, C, 1, h', w']
        shape = flops.WanShape.from_config(self.wan)
        idc = flops.IDCrafterShape.from_config(dataclasses.replace(self.config, wan=self.wan))
        tokens = latents[0, 0].numel() // (shape.patch[0] * shape.patch[1] * shape.patch[2])
        ref_tokens = refs.shape[-2] * refs.shape[-1] // idc.subject_patch**2
        count = flops.count_flops(shape, idc, tokens, conditions["text"].shape[1], refs.shape[1], ref_tokens)
        batch = latents.shape[0]
        return batch * tokens, batch * flops.training_step_flops(count.full_forward, checkpointing)

    # ------------------------------------------------------------------ files
    def export(self, model: IDCrafterTransformer, folder: Path) -> None:
        """The adapter; with the `full` policy also the fine-tuned base transformer (folder/transformer)."""
        model.save_adapter(folder, include_base=self.policy == "full")

    def describe(self) -> dict:
        info = {"preset": self.config.preset, "num_frames": self.num_frames, "size": [self.height, self.width]}
        if self.m.vlm is not None:
            info["vlm"] = self.m.vlm
        return info
