"""IDCrafterTransformer: a stock diffusers `WanTransformer3DModel` plus the ID-Crafter adapter.

No stock forward is copied. The adapter reaches the DiT in two places:
- a forward hook on `condition_embedder` swaps the projected text states for a `SubjectContext`
  (text + the subject stream), which the stock forward hands to every block's `attn2`;
- `attn2` of every block gets a `SubjectCrossAttnProcessor`: the stock processor on the text,
  plus stage 3 in the first K blocks.
Called without subjects, the hook is inactive and the stock model runs untouched.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from safetensors.torch import load_file, save_file
from torch import nn

from idcrafter.core.moe_lora import MoELoRAConfig, inject_moe_lora, load_moe_lora, save_moe_lora
from idcrafter.flow.matching import velocity_from_sample
from idcrafter.utils.cli import InputError
from idcrafter.utils.io import atomic_write_dir
from idcrafter.video.attention import (
    CrossModalAttention,
    LayerKV,
    SubjectContext,
    SubjectCrossAttnProcessor,
    SubjectStream,
    SubjectTower,
)
from idcrafter.video.config import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    IDCrafterConfig,
    base_signature,
    check_adapter_fits,
    read_adapter_config,
)
from idcrafter.video.subject_encoder import SubjectEncoder
from idcrafter.video.vlm import VLMConnector

LORA_SUBFOLDER = "lora"
# Linear layers of every Wan block that the `new-modules+lora` policy adapts.
WAN_LORA_TARGETS = (
    r"blocks\.\d+\.attn1\.(to_q|to_k|to_v|to_out\.0)",
    r"blocks\.\d+\.attn2\.(to_q|to_k|to_v|to_out\.0)",
    r"blocks\.\d+\.ffn\.net\.(0\.proj|2)",
)


def to_velocity(config: IDCrafterConfig, output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The model output as a velocity: as is for "velocity" models, (z_t - x0) / sigma for "sample" ones.

    sample: z_t [B, C, F, H, W]; sigma: [B] (timestep / 1000).
    """
    if config.prediction == "velocity":
        return output
    return velocity_from_sample(sample, output, sigma).to(output.dtype)


class IDCrafterAdapter(nn.Module):
    """All trainable ID-Crafter weights: subject encoder, subject tower, stage 3, VLM connector."""

    def __init__(self, config: IDCrafterConfig, dim: int, heads: int, num_blocks: int):
        super().__init__()
        self.subject_encoder = SubjectEncoder(config.latent_channels, dim, config.max_subjects, config.subject_patch)
        tower_layers = num_blocks if config.uses_tower else 0
        self.subject_tower = SubjectTower(dim, heads, tower_layers, intra=config.hierarchy != "no-intra",
                                          inter=config.hierarchy != "no-inter")
        stage3 = num_blocks if config.uses_stage3 else 0
        self.cross_modal_attn = nn.ModuleList([CrossModalAttention(dim, heads) for _ in range(stage3)])
        self.vlm_connector = VLMConnector(config.vlm_dim, dim) if config.use_vlm else None


class IDCrafterTransformer(nn.Module):
    """Wan 2.1 DiT with hierarchical identity-preserving attention in its first K blocks.

    Call it like the stock model (`hidden_states` [B, C, F, H, W], `timestep` [B],
    `encoder_hidden_states` [B, L_txt, text_dim], `return_dict`), plus optionally:
        subjects: reference latents [B, N, C, h, w] (or [B, N, C, 1, h, w]);
        subject_mask: [B, N] bool, False for padded subjects (default: all present);
        vlm_states: [B, L_v, vlm_dim] VLM hidden states, vlm_mask [B, L_v];
        subject_stream: a precomputed `encode_subjects(...)` result (reuse across steps);
        attention_capture: a dict that receives the stage-3 ref shares [B, N, L_video] per block.
    """

    _no_split_modules = ["WanTransformerBlock"]

    def __init__(self, wan: WanTransformer3DModel, config: IDCrafterConfig):
        super().__init__()
        if wan.config.image_dim is not None or wan.config.added_kv_proj_dim is not None:
            raise ValueError("IDCrafterTransformer wraps Wan 2.1 text-to-video models (no image embedding)")
        self.wan = wan
        self.config = config
        depth = wan.config.num_layers
        self.num_blocks = min(config.num_blocks, depth)
        dim = wan.config.num_attention_heads * wan.config.attention_head_dim
        self.adapter = IDCrafterAdapter(config, dim, wan.config.num_attention_heads, self.num_blocks)
        self.adapter.to(dtype=next(wan.parameters()).dtype, device=next(wan.parameters()).device)
        for layer, block in enumerate(wan.blocks):
            stage3 = self.adapter.cross_modal_attn[layer] if layer < len(self.adapter.cross_modal_attn) else None
            plain = not config.uses_stage3 and layer < self.num_blocks  # plain, no-cross: subjects as text keys
            block.attn2.set_processor(SubjectCrossAttnProcessor(WanAttnProcessor(), stage3, layer, plain_keys=plain))
        self.lora_config: MoELoRAConfig | None = None
        # The VLM folder the connector was trained with; save_adapter records it so inference and
        # RL find the VLM without being told (`idcrafter.video.infer.check_vlm`).
        self.vlm_folder: str | None = None
        self._pending: SubjectStream | None = None
        self._active = False
        wan.condition_embedder.register_forward_hook(self._attach_subjects)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_wan(cls, wan: WanTransformer3DModel, config: IDCrafterConfig | None = None) -> IDCrafterTransformer:
        return cls(wan, config or IDCrafterConfig(wan=dict(wan.config)))

    @classmethod
    def from_config(cls, config: IDCrafterConfig, seed: int | None = None) -> IDCrafterTransformer:
        """A randomly initialised base model of `config.wan` (tests, toy models, benchmarks)."""
        if not config.wan:
            raise ValueError("IDCrafterTransformer.from_config: the config has no `wan` model config")
        if seed is not None:
            torch.manual_seed(seed)
        return cls(WanTransformer3DModel(**config.wan), config)

    def add_lora(self, rank: int = 64, alpha: float | None = None, targets=WAN_LORA_TARGETS) -> list[str]:
        """Plain LoRA (B = 0 at first) on the base blocks' attention and FFN projections."""
        self.lora_config = MoELoRAConfig(rank=rank, alpha=alpha or float(rank), num_experts=1, target_modules=tuple(targets))
        names = inject_moe_lora(self.wan, self.lora_config)
        for module in self.wan.modules():  # new layers follow the base model's device and dtype
            if hasattr(module, "lora_A"):
                module.to(device=self.device, dtype=self.dtype)
        return names

    def add_vlm_connector(self, vlm_dim: int) -> VLMConnector:
        """Switch on the VLM encoder for a model built without it (a fresh, trainable connector).

        Training with a VLM starts here from a preset or from an adapter trained without one; an
        adapter that has a connector keeps its own. Initialised from the global RNG.
        """
        if self.adapter.vlm_connector is not None:
            raise ValueError("add_vlm_connector: this model already has a VLM connector")
        dim = self.wan.config.num_attention_heads * self.wan.config.attention_head_dim
        self.config = dataclasses.replace(self.config, use_vlm=True, vlm_dim=int(vlm_dim))
        self.adapter.vlm_connector = VLMConnector(int(vlm_dim), dim).to(device=self.device, dtype=self.dtype)
        return self.adapter.vlm_connector

    def trainable_parameters(self, policy: str) -> list[nn.Parameter]:
        """Set requires_grad for a policy and return the trainable parameters.

        new-modules: the adapter only; new-modules+lora: adapter + LoRA (call add_lora first);
        lora: LoRA only, so disabling it gives back the starting model exactly (RL's reference
        policy); full: adapter + every base weight.
        """
        if policy not in ("new-modules", "new-modules+lora", "lora", "full"):
            raise ValueError(f"unknown trainable policy {policy!r}; use new-modules, new-modules+lora, lora or full")
        if "lora" in policy and self.lora_config is None:
            raise ValueError(f"policy {policy} needs add_lora() first")
        self.wan.requires_grad_(policy == "full")
        if "lora" in policy:
            for name, p in self.wan.named_parameters():
                p.requires_grad_("lora_" in name)
        self.adapter.requires_grad_(policy != "lora")
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.wan.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.wan.parameters()).device

    def enable_gradient_checkpointing(self) -> None:
        self.wan.enable_gradient_checkpointing()
        self.adapter.subject_tower.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.wan.disable_gradient_checkpointing()
        self.adapter.subject_tower.gradient_checkpointing = False

    # ------------------------------------------------------------------ subject stream
    def encode_subjects(
        self,
        subjects: torch.Tensor | None,
        subject_mask: torch.Tensor | None = None,
        vlm_states: torch.Tensor | None = None,
        vlm_mask: torch.Tensor | None = None,
    ) -> SubjectStream:
        """Stages 1-2 and the stage-3 keys/values of every adapted layer, once per generation.

        Independent of the timestep and the noisy latent, so one stream serves every denoising
        step and guidance pass.
        """
        if subjects is None:
            raise ValueError("encode_subjects: no subjects given")
        feats = self.adapter.subject_encoder(subjects)  # [B, N, T, D]
        b, n, t, _ = feats.shape
        if subject_mask is None:
            subject_mask = torch.ones(b, n, dtype=torch.bool, device=feats.device)
        if subject_mask.shape != (b, n):
            raise ValueError(f"subject_mask must be [B, N] = [{b}, {n}], got {tuple(subject_mask.shape)}")
        subject_mask = subject_mask.bool()
        vlm = None
        if vlm_states is not None:
            if self.adapter.vlm_connector is None:
                raise ValueError("vlm_states given but this model was built without the VLM (use_vlm=False)")
            vlm = self.adapter.vlm_connector(vlm_states.to(self.dtype), vlm_mask)
        ranges = [(k * t, (k + 1) * t) for k in range(n)]
        if self.config.uses_tower:
            per_layer = self.adapter.subject_tower(feats, subject_mask)
        else:  # stage3 and plain ablations: every layer reads the encoded references
            per_layer = [feats] * self.num_blocks
        if not self.config.uses_stage3:  # plain, no-cross: the tokens themselves become extra text keys
            keep = subject_mask.repeat_interleave(t, dim=1)
            tokens = [LayerKV(f.flatten(1, 2), None, keep) for f in per_layer]
            return SubjectStream(kv=tokens, ref_ranges=ranges, subject_mask=subject_mask)
        kv = [attn.kv(f, subject_mask, vlm, vlm_mask) for attn, f in zip(self.adapter.cross_modal_attn, per_layer)]
        return SubjectStream(kv=kv, ref_ranges=ranges, subject_mask=subject_mask)

    def _attach_subjects(self, module, args, output):
        if not self._active:
            return output
        temb, timestep_proj, text, image = output
        return temb, timestep_proj, SubjectContext(text=text, stream=self._pending), image

    @contextmanager
    def _subjects_active(self, stream: SubjectStream | None) -> Iterator[None]:
        self._pending, self._active = stream, True
        try:
            yield
        finally:
            self._pending, self._active = None, False

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict | None = None,
        *,
        subjects: torch.Tensor | None = None,
        subject_mask: torch.Tensor | None = None,
        vlm_states: torch.Tensor | None = None,
        vlm_mask: torch.Tensor | None = None,
        subject_stream: SubjectStream | None = None,
        attention_capture: dict | None = None,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        if subject_stream is None and (subjects is not None or vlm_states is not None):
            if subjects is None:
                raise ValueError("vlm_states need subjects: the VLM tokens sit beside the subject tokens")
            subject_stream = self.encode_subjects(subjects, subject_mask, vlm_states, vlm_mask)
        if subject_stream is None:
            return self.wan(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image, return_dict, attention_kwargs)
        if subject_stream.batch_size != hidden_states.shape[0]:
            raise ValueError(
                f"subject stream has batch {subject_stream.batch_size}, hidden_states {hidden_states.shape[0]}"
            )
        if attention_capture is not None:
            subject_stream = SubjectStream(subject_stream.kv, subject_stream.ref_ranges, subject_stream.subject_mask, attention_capture)
        with self._subjects_active(subject_stream):
            return self.wan(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image, return_dict, attention_kwargs)

    # ------------------------------------------------------------------ adapter files
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous() for k, v in self.adapter.state_dict().items()}

    def _base_signature(self) -> dict:
        return base_signature(self.wan.config)

    def save_adapter(
        self, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None, include_base: bool = False
    ) -> Path:
        """Write the adapter (safetensors + config) atomically.

        Base weights are not included unless `include_base` (after full fine-tuning): then the
        transformer is saved in diffusers format under `folder/transformer`, and loading the
        adapter onto any base uses it in place of the base's transformer. A model with the VLM
        encoder records the VLM folder it was trained with (`vlm_folder`, an absolute path).
        """
        folder = Path(folder)
        state = state_dict if state_dict is not None else self.adapter_state_dict()
        with atomic_write_dir(folder) as tmp:
            save_file({k: v.cpu() for k, v in state.items()}, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            meta = {"config": self.config.to_dict(), "base": self._base_signature(), "num_blocks": self.num_blocks}
            if self.config.use_vlm and self.vlm_folder:
                meta["vlm_folder"] = self.vlm_folder
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2))
            if self.lora_config is not None:
                save_moe_lora(self.wan, tmp / LORA_SUBFOLDER, self.lora_config)
            if include_base:
                if self.lora_config is not None:
                    raise ValueError("include_base with LoRA layers: save the merged base separately")
                self.wan.save_pretrained(tmp / "transformer")
        return folder

    read_adapter_config = staticmethod(read_adapter_config)

    def load_adapter(self, folder: str | Path) -> None:
        """Load adapter weights saved by `save_adapter`; a mismatch with the base model fails clearly."""
        folder = Path(folder)
        trained, meta = self.read_adapter_config(folder)
        check_adapter_fits(meta, self.wan.config, folder)
        if trained.use_vlm and self.adapter.vlm_connector is None:
            # An adapter trained with the VLM encoder brings its connector, also onto a model built
            # from a preset without one (the built-in tiny model of scripts/infer.py).
            self.add_vlm_connector(trained.vlm_dim)
        if (folder / "transformer").is_dir():  # fully fine-tuned: the base weights travel with the adapter
            tuned = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=self.dtype)
            self.wan.load_state_dict(tuned.state_dict())
        state = load_file(str(folder / ADAPTER_WEIGHTS))
        expected = self.adapter.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise InputError(
                f"adapter {folder} does not match this model: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
            )
        for key, tensor in state.items():
            if tensor.shape != expected[key].shape:
                raise InputError(
                    f"adapter {folder}: {key} has shape {list(tensor.shape)} in the file but {list(expected[key].shape)} in the model"
                )
        self.adapter.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
        recorded = meta.get("vlm_folder")
        self.vlm_folder = recorded if self.config.use_vlm and isinstance(recorded, str) else None
        if (folder / LORA_SUBFOLDER).is_dir():
            self.lora_config = load_moe_lora(self.wan, folder / LORA_SUBFOLDER)

    @classmethod
    def from_pretrained(cls, base: str | Path, adapter: str | Path | None = None, subfolder: str | None = "transformer", torch_dtype=None) -> IDCrafterTransformer:
        """Stock Wan transformer from a diffusers folder (+ our adapter folder when given).

        An adapter that carries its own fine-tuned transformer (`adapter/transformer`) replaces the base's.
        """
        if adapter is not None and (Path(adapter) / "transformer").is_dir():
            base, subfolder = adapter, "transformer"
        wan = WanTransformer3DModel.from_pretrained(base, subfolder=subfolder, torch_dtype=torch_dtype)
        if adapter is None:
            return cls.from_wan(wan)
        config, _ = cls.read_adapter_config(adapter)
        model = cls(wan, config)
        model.load_adapter(adapter)
        return model
