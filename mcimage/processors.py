"""Attention processors for FLUX's double and single blocks.

`MCFluxAttnProcessor` is diffusers' `FluxAttnProcessor` (diffusers 0.42, `transformer_flux.py`)
with two additions, each off unless asked for:
- DAM (One-for-All): queries divided by a per-token temperature that is exactly 1 at
  initialisation (`idcrafter.core.temperature`);
- IDAR capture (MultiCrafter): inside `capture_ref_shares(...)`, the ref-restricted share of the
  target queries is recorded for the region loss (`idcrafter.core.attention.ref_attention_share`).

The kernel call is the stock one: diffusers' `dispatch_attention_fn` with the backend and
context-parallel config that `set_attention_backend` / `enable_parallelism` set (through
`idcrafter.core.attention.dispatch_attention`, which keeps a masked call on a backend that takes
masks; docs/design.md 3.7).

In both block types the attention sees the joint sequence [text; target; references], which is
what a `TokenLayout` built with `TokenLayout.concat(order=("text", "target", "refs"))` describes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from idcrafter.core.attention import dispatch_attention, ref_attention_share
from idcrafter.core.layout import TokenLayout
from idcrafter.core.temperature import DynamicTemperature, apply_temperature

__all__ = ["MCFluxAttnProcessor", "ShareCapture", "capture_ref_shares", "install_processors"]


@dataclass
class ShareCapture:
    """What the processors record during one forward: one [B, N, L_target] share per layer."""

    layout: TokenLayout
    chunk_size: int = 256
    shares: dict[str, torch.Tensor] = field(default_factory=dict)


class MCFluxAttnProcessor(nn.Module):
    """FLUX joint attention with optional DAM temperature and IDAR share capture.

    Args:
        dim: inner dimension of the attention (heads * head_dim).
        heads: number of heads.
        dam: add a `DynamicTemperature` (trainable) to this layer.
        dam_per_head: one temperature per head instead of per token.
        capture: this layer reports its ref share when a `ShareCapture` is active.
    """

    # Set by diffusers' `ModelMixin.set_attention_backend` / context parallelism (as on FluxAttnProcessor);
    # None is diffusers' active backend.
    _attention_backend = None
    _parallel_config = None

    def __init__(self, dim: int, heads: int, dam: bool = False, dam_per_head: bool = False, capture: bool = False):
        super().__init__()
        self.temperature = DynamicTemperature(dim, heads, per_head=dam_per_head) if dam else None
        self.capture = capture
        self.name = ""
        self.active: ShareCapture | None = None

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        share_capture: ShareCapture | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """share_capture: the capture of this forward, passed through FLUX's joint_attention_kwargs so
        that gradient checkpointing's recomputation in the backward computes the same shares as the
        forward did (an attribute set by a context manager would be gone by then)."""
        # --- from diffusers 0.42 FluxAttnProcessor.__call__ (unfused projections) ---
        if getattr(attn, "fused_projections", False):
            raise ValueError(f"{self.name}: fused QKV projections are not supported; call unfuse_qkv_projections()")
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            query = torch.cat([attn.add_q_proj(encoder_hidden_states), query], dim=1)
            key_txt, value_txt = attn.add_k_proj(encoder_hidden_states), attn.add_v_proj(encoder_hidden_states)
        # DAM reads W_q f, the projected queries of the whole joint sequence.
        tau = self.temperature(query) if self.temperature is not None else None

        txt_len = encoder_hidden_states.shape[1] if joint else 0
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if joint:
            query = torch.cat(
                [attn.norm_added_q(query[:, :txt_len]), attn.norm_q(query[:, txt_len:])], dim=1
            )
            key = torch.cat([attn.norm_added_k(key_txt.unflatten(-1, (-1, attn.head_dim))), key], dim=1)
            value = torch.cat([value_txt.unflatten(-1, (-1, attn.head_dim)), value], dim=1)
        else:
            query = attn.norm_q(query)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if tau is not None:
            query = apply_temperature(query, tau)

        active = share_capture if share_capture is not None else self.active
        if self.capture and active is not None:
            self._record(query.transpose(1, 2), key.transpose(1, 2), active)  # [B, H, L, D]
        out = dispatch_attention(
            query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
            parallel_config=self._parallel_config,
        ).flatten(2, 3).to(query.dtype)  # diffusers' layout: [B, L, H, D]

        if encoder_hidden_states is not None:
            encoder_out, out = out.split_with_sizes([txt_len, out.shape[1] - txt_len], dim=1)
            out = attn.to_out[1](attn.to_out[0](out.contiguous()))
            return out, attn.to_add_out(encoder_out.contiguous())
        return out

    def _record(self, q: torch.Tensor, k: torch.Tensor, active: ShareCapture) -> None:
        layout = active.layout
        if layout.total != q.shape[2]:
            raise ValueError(f"{self.name}: layout total {layout.total} != sequence length {q.shape[2]}")
        start, end = layout.target
        # Temperature is already inside q (queries were divided by tau above).
        active.shares[self.name] = ref_attention_share(
            q[:, :, start:end], k, layout.ref_ranges(), chunk_size=active.chunk_size
        )


def _blocks(transformer) -> Iterator[tuple[str, nn.Module, bool]]:
    for i, block in enumerate(transformer.transformer_blocks):
        yield f"transformer_blocks.{i}", block, True
    for i, block in enumerate(transformer.single_transformer_blocks):
        yield f"single_transformer_blocks.{i}", block, False


def install_processors(
    transformer,
    dam: bool = False,
    dam_per_head: bool = False,
    dam_blocks: str | Sequence[str] = "all",
    capture_blocks: str | Sequence[str] = "double",
) -> dict[str, MCFluxAttnProcessor]:
    """Put an `MCFluxAttnProcessor` on every attention of a `FluxTransformer2DModel`.

    Args:
        dam / dam_per_head: add DAM temperatures; `dam_blocks` = "all", "double", "single" or a
            list of block names (e.g. "transformer_blocks.0").
        capture_blocks: which blocks report IDAR shares: "double" (default, MultiCrafter),
            "single", "all", "none" or a list of block names.

    Returns:
        {block name: processor}. The processors are submodules of the attention modules, so DAM
        weights appear in `transformer.state_dict()` and train with it.
    """

    def selected(spec, name: str, double: bool) -> bool:
        if isinstance(spec, str):
            return {"all": True, "none": False, "double": double, "single": not double}[spec]
        return name in set(spec)

    for spec in (dam_blocks, capture_blocks):
        if isinstance(spec, str) and spec not in ("all", "none", "double", "single"):
            raise ValueError(f"install_processors: unknown block selection {spec!r}")
    processors = {}
    for name, block, double in _blocks(transformer):
        attn = block.attn
        proc = MCFluxAttnProcessor(
            attn.inner_dim,
            attn.heads,
            dam=dam and selected(dam_blocks, name, double),
            dam_per_head=dam_per_head,
            capture=selected(capture_blocks, name, double),
        )
        proc.name = name
        p = next(attn.parameters())
        # Under diffusers' empty-weights loading the parameters are on "meta" and are filled from the
        # checkpoint; the DAM's non-persistent buffer is not in it, so it must stay where it is.
        attn.set_processor(proc.to(dtype=p.dtype) if p.is_meta else proc.to(device=p.device, dtype=p.dtype))
        processors[name] = proc
    return processors


@contextlib.contextmanager
def capture_ref_shares(transformer, layout: TokenLayout, chunk_size: int = 256) -> Iterator[ShareCapture]:
    """Record ref shares of the capturing layers during the forwards run inside the block."""
    capture = ShareCapture(layout=layout, chunk_size=chunk_size)
    procs = [b.attn.processor for _, b, _ in _blocks(transformer) if isinstance(b.attn.processor, MCFluxAttnProcessor)]
    if not any(p.capture for p in procs):
        raise ValueError("capture_ref_shares: no attention layer captures shares; call install_processors first")
    for p in procs:
        p.active = capture
    try:
        yield capture
    finally:
        for p in procs:
            p.active = None
