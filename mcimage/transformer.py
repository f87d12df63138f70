"""MultiCrafter / One-for-All transformer: a stock diffusers `FluxTransformer2DModel` with
reference tokens appended as clean context, method-specific position ids, our attention
processors (DAM, IDAR share capture) and an optional (MoE-)LoRA adapter.

The stock forward is not copied: the wrapper builds the joint image sequence [target; refs],
its `img_ids` / `txt_ids` (`idcrafter.core.positions`) and a `TokenLayout`, calls the stock
model, and keeps the target tokens' output. FLUX concatenates [text; image] inside its blocks,
so the attention sees [text; target; refs], the layout `install_processors` expects.

    cfg = MCImageConfig.from_preset("tiny-one-for-all")
    model = MCImageTransformer.from_config(cfg, seed=0)
    v = model(x_t, refs, text, pooled, t, guidance, target_hw=(8, 8), ref_hws=[(4, 4)] * 2,
              categories=["face", "upper"], descriptor_tokens={"face": [2, 3]})   # [B, L_t, C]

Timestep of the references: in this first version the reference tokens go through the same
AdaLN modulation as the target (FLUX modulates the whole image stream with one timestep
embedding), although they are clean latents. This is what FLUX.1-Kontext does with its
context image; a separate t = 0 modulation for references would need a copied block forward.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from idcrafter.core.layout import TokenLayout
from idcrafter.core.moe_lora import inject_moe_lora
from idcrafter.core.positions import (
    canonical_category,
    category_index,
    category_time_ids,
    condition_ids,
    target_ids,
    text_ids,
    uno_diagonal_ids,
)
from idcrafter.flow.matching import velocity_from_sample
from idcrafter.utils.cli import InputError
from idcrafter.utils.io import atomic_write
from mcimage.config import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_FORMAT,
    ADAPTER_FORMAT_VERSION,
    MCImageConfig,
    check_categories,
    read_adapter_config,
)
from mcimage.processors import MCFluxAttnProcessor, capture_ref_shares, install_processors

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "MCImageSequence",
    "MCImageTransformer",
    "build_sequence",
    "pack_latents",
    "unpack_latents",
]

ADAPTER_WEIGHTS_NAME = "mcimage_adapter.safetensors"
_POLICIES = ("adapter", "lora", "dam", "all", "none")


# --------------------------------------------------------------------------------------------
# Latent packing (2x2 patches), via diffusers' FluxPipeline static methods


def pack_latents(latents: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """VAE latents [B, C, H, W] -> packed tokens [B, (H/2)*(W/2), 4C] and their grid (H/2, W/2)."""
    from diffusers import FluxPipeline  # pulls in transformers; only when packing is used

    if latents.ndim != 4:
        raise ValueError(f"pack_latents: expected [B, C, H, W], got shape {tuple(latents.shape)}")
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"pack_latents: latent height and width must be even for 2x2 packing, got {h}x{w}")
    return FluxPipeline._pack_latents(latents, b, c, h, w), (h // 2, w // 2)


def unpack_latents(tokens: torch.Tensor, grid_hw: Sequence[int]) -> torch.Tensor:
    """Inverse of `pack_latents`: [B, h*w, 4C] on grid (h, w) -> [B, C, 2h, 2w]."""
    from diffusers import FluxPipeline

    h, w = (int(v) for v in grid_hw)
    if tokens.ndim != 3 or tokens.shape[1] != h * w or tokens.shape[2] % 4:
        raise ValueError(f"unpack_latents: tokens {tuple(tokens.shape)} do not fit grid {(h, w)} with 4C channels")
    # vae_scale_factor=1: the pipeline's pixel size is then the latent size 2h x 2w.
    return FluxPipeline._unpack_latents(tokens, 2 * h, 2 * w, 1)


# --------------------------------------------------------------------------------------------
# Sequence assembly: ids and layout (pure)


@dataclass(frozen=True)
class MCImageSequence:
    """What one forward feeds the stock model besides the activations.

    img_ids: [L_t + sum L_r, 3] rows (t, h, w) of [target; refs]; txt_ids: [L_txt, 3];
    layout: the joint [text; target; refs] sequence; categories: canonical category per
    reference (None for UNO ids without categories).
    """

    img_ids: torch.Tensor
    txt_ids: torch.Tensor
    layout: TokenLayout
    categories: tuple[str, ...] | None


def _grid_of(length: int, hw: Sequence[int] | None, what: str) -> tuple[int, int]:
    if hw is None:
        side = math.isqrt(length)
        if side * side != length:
            raise ValueError(f"{what}: {length} tokens are not a square grid; pass its (h, w)")
        return side, side
    h, w = (int(v) for v in hw)
    if h * w != length:
        raise ValueError(f"{what}: grid {(h, w)} has {h * w} tokens, the tensor has {length}")
    return h, w


def build_sequence(
    config: MCImageConfig,
    target_len: int,
    ref_lens: Sequence[int],
    text_len: int,
    target_hw: Sequence[int] | None = None,
    ref_hws: Sequence[Sequence[int]] | None = None,
    categories: Sequence[str] | None = None,
    descriptor_tokens: Mapping[str, Sequence[int]] | None = None,
) -> MCImageSequence:
    """Position ids and token layout for a target, N references and a prompt.

    Args:
        target_len, ref_lens, text_len: token counts of the packed target, each reference and
            the text. Grids default to squares when `target_hw` / `ref_hws` are None.
        categories: one category (name or alias) per reference. Required for condition ids
            (One-for-All: one reference per category); optional with UNO ids.
        descriptor_tokens: {category: text token indices} of item descriptors (from
            `tokenize_with_descriptors`); placed by CCPA, so `config.ccpa` must be on.

    Raises:
        ValueError: more references than `config.max_subjects` or than categories, unknown or
            repeated categories, descriptors without CCPA or naming a category with no reference.
    """
    n = len(ref_lens)
    if n > config.max_subjects:
        raise ValueError(f"{n} references but config.max_subjects is {config.max_subjects}")
    target_hw = _grid_of(target_len, target_hw, "target")
    if ref_hws is not None and len(ref_hws) != n:
        raise ValueError(f"ref_hws has {len(ref_hws)} entries for {n} references")
    hws = [_grid_of(length, None if ref_hws is None else ref_hws[k], f"reference {k}") for k, length in enumerate(ref_lens)]

    cats = check_categories(config, n, categories)

    base_offset = target_hw if config.condition_base_offset else None
    if config.position_ids == "condition":
        refs = [condition_ids(c, hw, base_offset=base_offset) for c, hw in zip(cats or (), hws)]
    elif config.position_ids == "temporal":  # One-for-All Var. 2: u = (c, 0, 0)
        refs = [category_time_ids(c, hw) for c, hw in zip(cats or (), hws)]
    elif config.position_ids == "index":  # One-for-All Var. 1: u = (0, 0, 0), categories by embedding
        refs = [target_ids(*hw) for hw in hws]
    else:
        refs = uno_diagonal_ids(target_hw, hws)
    img_ids = torch.cat([target_ids(*target_hw), *refs], dim=0)

    descriptors: list[tuple[int, ...]] = [() for _ in range(n)]
    if descriptor_tokens:
        if not config.ccpa:
            raise ValueError("descriptor_tokens given but config.ccpa is off; item descriptors are placed by CCPA")
        owners = {c: k for k, c in enumerate(cats or ())}
        for name, indices in descriptor_tokens.items():
            category = canonical_category(name)
            if category not in owners:
                have = ", ".join(cats) if cats else "none"
                raise ValueError(
                    f"descriptor markup names category {category!r} but no reference has that category "
                    f"(reference categories: {have})"
                )
            descriptors[owners[category]] = tuple(int(i) for i in indices)
        txt = text_ids(text_len, descriptor_tokens, ref_hws=dict(zip(cats, hws)), base_offset=base_offset)
    else:
        txt = torch.zeros(text_len, 3)

    layout = TokenLayout.concat(
        text_len=text_len,
        target_len=target_len,
        ref_lens=list(ref_lens),
        descriptors=descriptors if n else (),
        target_grid=target_hw,
    )
    return MCImageSequence(img_ids=img_ids, txt_ids=txt, layout=layout, categories=cats)


# --------------------------------------------------------------------------------------------
# The model


class MCImageTransformer(nn.Module):
    """A `FluxTransformer2DModel` with references as context tokens, DAM / IDAR processors and an adapter.

    Build with `from_flux(flux, config)` (wraps and modifies `flux` in place: processors are
    installed and adapters injected into it) or `from_config(config, seed)` (random weights).
    Every module it adds starts at zero contribution, so the wrapped model equals the base.
    """

    def __init__(self, flux: nn.Module, config: MCImageConfig):
        super().__init__()
        self.config = config
        self.flux = flux
        # Plain dict: the processors are already submodules of the attention layers.
        self.processors: dict[str, MCFluxAttnProcessor] = install_processors(
            flux,
            dam=config.dam,
            dam_per_head=config.dam_per_head,
            dam_blocks=config.dam_blocks,
            capture_blocks=config.capture_blocks,
        )
        adapter = config.adapter_config()
        self.adapter_modules: list[str] = inject_moe_lora(flux, adapter) if adapter is not None else []
        # One-for-All's Var. 1: the references share the target's positions and are told apart by a
        # learned vector per category added to their (packed latent) tokens; x_embedder is linear, so
        # this is an index embedding of the hidden states too. Zero at initialisation.
        self.category_embedding = None
        if config.position_ids == "index":
            from idcrafter.core.categories import CATEGORY_IDS

            rows = max(CATEGORY_IDS.values()) + 1
            self.category_embedding = nn.Parameter(torch.zeros(rows, flux.config.in_channels))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_flux(cls, flux: nn.Module, config: MCImageConfig) -> MCImageTransformer:
        return cls(flux, config)

    @classmethod
    def from_config(cls, config: MCImageConfig, seed: int = 0) -> MCImageTransformer:
        """Random base weights from `config.flux` and fresh adapters, reproducible from `seed`."""
        from diffusers import FluxTransformer2DModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(FluxTransformer2DModel(**config.flux), config)

    # ------------------------------------------------------------------ inputs
    @staticmethod
    def _split_refs(ref_latents, hidden_states: torch.Tensor) -> list[torch.Tensor]:
        if ref_latents is None:
            return []
        if isinstance(ref_latents, torch.Tensor):
            if ref_latents.ndim != 4:
                raise ValueError(f"ref_latents tensor must be [B, N, L_r, C], got shape {tuple(ref_latents.shape)}")
            refs = list(ref_latents.unbind(1))
        else:
            refs = list(ref_latents)
        b, _, c = hidden_states.shape
        for k, r in enumerate(refs):
            if r.ndim != 3 or r.shape[0] != b or r.shape[2] != c:
                raise ValueError(
                    f"reference {k} has shape {tuple(r.shape)}; expected [B={b}, L_r, C={c}] packed tokens"
                )
        return [r.to(hidden_states.dtype) for r in refs]

    def prepare(
        self,
        hidden_states: torch.Tensor,
        ref_latents,
        encoder_hidden_states: torch.Tensor,
        target_hw: Sequence[int] | None = None,
        ref_hws: Sequence[Sequence[int]] | None = None,
        categories: Sequence[str] | None = None,
        descriptor_tokens: Mapping[str, Sequence[int]] | None = None,
    ) -> MCImageSequence:
        """The ids and layout `forward` would use for these inputs (for losses and tests)."""
        refs = self._split_refs(ref_latents, hidden_states)
        return build_sequence(
            self.config,
            target_len=hidden_states.shape[1],
            ref_lens=[r.shape[1] for r in refs],
            text_len=encoder_hidden_states.shape[1],
            target_hw=target_hw,
            ref_hws=ref_hws,
            categories=categories,
            descriptor_tokens=descriptor_tokens,
        )

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        ref_latents: torch.Tensor | Sequence[torch.Tensor] | None,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        guidance: torch.Tensor | None = None,
        *,
        target_hw: Sequence[int] | None = None,
        ref_hws: Sequence[Sequence[int]] | None = None,
        categories: Sequence[str] | None = None,
        descriptor_tokens: Mapping[str, Sequence[int]] | None = None,
        attention_capture: dict[str, torch.Tensor] | None = None,
        joint_attention_kwargs: dict | None = None,
    ) -> torch.Tensor:
        """Predict the target tokens' velocity.

        Args:
            hidden_states: [B, L_t, C] packed noisy target latents on grid `target_hw`.
            ref_latents: [B, N, L_r, C] or a list of N [B, L_r_k, C] packed clean references
                (grids `ref_hws`), or None. Appended after the target; their outputs are dropped.
            encoder_hidden_states: [B, L_txt, D_txt] T5 states; pooled_projections: [B, D_pool].
            timestep: [B] in [0, 1] (FLUX scales by 1000 inside), shared by the references.
            guidance: [B] distilled guidance scale (guidance-embedding models), else None.
            categories, descriptor_tokens: see `build_sequence`.
            attention_capture: a dict that, when given, receives {block name: share [B, N, L_t]}
                from the IDAR layers (needs config.idar and at least one reference).

        Returns:
            [B, L_t, C_out] velocity of the target tokens (with config.prediction "sample" the
            model's clean-latent output x0 is returned as (x_t - x0) / t).
        """
        refs = self._split_refs(ref_latents, hidden_states)
        seq = self.prepare(
            hidden_states, refs, encoder_hidden_states, target_hw, ref_hws, categories, descriptor_tokens
        )
        if attention_capture is not None and not refs:
            raise ValueError("attention_capture needs at least one reference (shares are over reference tokens)")
        device = hidden_states.device
        if self.category_embedding is not None and refs:
            refs = [r + self.category_embedding[category_index(c)].to(r.dtype) for r, c in zip(refs, seq.categories)]
        x = torch.cat([hidden_states, *refs], dim=1) if refs else hidden_states
        capture = (
            capture_ref_shares(self.flux, seq.layout, chunk_size=self.config.share_chunk_size)
            if attention_capture is not None
            else contextlib.nullcontext()
        )
        with capture as cap:
            if cap is not None:  # also handed to the processors as an argument: see MCFluxAttnProcessor
                joint_attention_kwargs = {**(joint_attention_kwargs or {}), "share_capture": cap}
            out = self.flux(
                hidden_states=x,
                encoder_hidden_states=encoder_hidden_states,
                pooled_projections=pooled_projections,
                timestep=timestep,
                img_ids=seq.img_ids.to(device),
                txt_ids=seq.txt_ids.to(device),
                guidance=guidance,
                joint_attention_kwargs=joint_attention_kwargs,
                return_dict=False,
            )[0]
        if attention_capture is not None:
            attention_capture.update(cap.shares)
        out = out[:, : hidden_states.shape[1]]
        if self.config.prediction == "sample":  # the model predicts the clean latent
            # In float32: under bf16 a rounded t would not be the t the sampler steps with.
            v = velocity_from_sample(hidden_states.float(), out.float(), timestep.float())
            out = v.to(hidden_states.dtype)
        return out

    @property
    def dtype(self) -> torch.dtype:
        """The FLUX weights' dtype (DiffusionPipeline.to and the pipeline read it)."""
        return next(self.flux.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.flux.parameters()).device

    def enable_gradient_checkpointing(self) -> None:
        """Recompute FLUX block activations in the backward pass (diffusers' checkpointing)."""
        self.flux.enable_gradient_checkpointing()

    # ------------------------------------------------------------------ capture
    CAPTURE_FIELDS = ("idar", "idar_blocks", "idar_lambda", "share_chunk_size")

    def set_capture_config(self, config: MCImageConfig) -> None:
        """Adopt `config`, which may differ from the current one only in IDAR capture settings
        (no weights depend on them), and set each processor's capture flag accordingly."""
        import dataclasses

        changed = [f.name for f in dataclasses.fields(config)
                   if getattr(config, f.name) != getattr(self.config, f.name) and f.name not in self.CAPTURE_FIELDS]
        if changed:
            raise ValueError(f"set_capture_config: {changed} change the model's weights or ids; build a new model")
        spec = config.capture_blocks
        if not isinstance(spec, str):
            unknown = sorted(set(spec) - set(self.processors))
            if unknown:
                raise ValueError(f"set_capture_config: unknown block names {unknown[:5]}; blocks are named like "
                                 "'transformer_blocks.0' and 'single_transformer_blocks.0'")
        for name, proc in self.processors.items():
            double = name.startswith("transformer_blocks.")
            proc.capture = (spec in ("all", "double") and double) or (spec in ("all", "single") and not double) \
                if isinstance(spec, str) else name in set(spec)
        self.config = config

    # ------------------------------------------------------------------ parameters
    def _added_parameters(self, kind: str) -> dict[str, nn.Parameter]:
        """Parameters mcimage added to `flux`, named as in `flux.named_parameters()`, and the
        wrapper's own (`category_embedding`, One-for-All's Var. 1) under kind "adapter"."""
        out = {}
        for name, p in self.flux.named_parameters():
            is_lora = ".lora_" in name
            is_dam = ".processor.temperature." in name
            if (kind in ("lora", "adapter") and is_lora) or (kind in ("dam", "adapter") and is_dam):
                out[name] = p
        if kind == "adapter" and self.category_embedding is not None:
            out["category_embedding"] = self.category_embedding
        return out

    def trainable_parameters(self, policy: str = "adapter") -> dict[str, nn.Parameter]:
        """Select what trains and freeze the rest: {name: parameter} of the trainable set.

        policy: "adapter" (LoRA / MoE-LoRA and DAM: everything mcimage added), "lora", "dam",
            "all" (full fine-tuning) or "none". Sets `requires_grad` on the whole model.
        """
        if policy not in _POLICIES:
            raise ValueError(f"trainable_parameters: unknown policy {policy!r}; use one of {_POLICIES}")
        if policy == "all":
            selected = dict(self.flux.named_parameters())
            if self.category_embedding is not None:
                selected["category_embedding"] = self.category_embedding
        elif policy == "none":
            selected = {}
        else:
            selected = self._added_parameters(policy)
            if not selected:
                raise ValueError(
                    f"trainable_parameters: policy {policy!r} selects nothing "
                    f"(adapter={self.config.adapter!r}, dam={self.config.dam})"
                )
        self.flux.requires_grad_(False)
        if self.category_embedding is not None:
            self.category_embedding.requires_grad_(False)
        for p in selected.values():
            p.requires_grad_(True)
        return selected

    # ------------------------------------------------------------------ adapter IO
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self._added_parameters("adapter").items()}

    def save_adapter(self, folder: str | os.PathLike) -> Path:
        """Write the added weights (safetensors) and the config (JSON, written last) to `folder`."""
        # A model without added weights (adapter "none", DAM off) still saves its config: the
        # position ids and IDAR settings are part of the model.
        tensors = {k: v.contiguous().cpu() for k, v in self.adapter_state_dict().items()}
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_write(folder / ADAPTER_WEIGHTS_NAME) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        payload = {"format": ADAPTER_FORMAT, "version": ADAPTER_FORMAT_VERSION, "config": self.config.to_dict()}
        with atomic_write(folder / ADAPTER_CONFIG_NAME) as tmp:
            tmp.write_text(json.dumps(payload, indent=2) + "\n")
        return folder

    read_adapter_config = staticmethod(read_adapter_config)

    def load_adapter(self, folder: str | os.PathLike) -> None:
        """Load weights written by `save_adapter`; names and shapes must match exactly."""
        path = Path(folder) / ADAPTER_WEIGHTS_NAME
        if not path.is_file():
            raise InputError(f"{path}: adapter weights not found")
        tensors = load_file(str(path))
        params = self._added_parameters("adapter")
        missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        if missing or unexpected:
            raise InputError(
                f"{path}: adapter does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for name, p in params.items():
            if tensors[name].shape != p.shape:
                raise InputError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, model has {tuple(p.shape)}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name].to(device=p.device, dtype=p.dtype))

    @classmethod
    def from_flux_and_adapter(cls, flux: nn.Module, folder: str | os.PathLike) -> MCImageTransformer:
        """Wrap `flux` with the config saved in `folder` and load its adapter weights."""
        model = cls(flux, cls.read_adapter_config(folder))
        model.load_adapter(folder)
        return model
