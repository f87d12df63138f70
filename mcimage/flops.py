"""Analytic FLOPs of one MultiCrafter / One-for-All transformer forward (`MCImageTransformer`, batch 1).

The stock FLUX matmuls (diffusers' `FluxTransformer2DModel`) over the joint sequence [text;
target; references], plus what mcimage adds: the DAM temperature MLPs (One-for-All Sec. 3.4), the
(MoE-)LoRA layers (MultiCrafter Sec. 3.3; every expert runs densely) and, when IDAR captures shares
(MultiCrafter Sec. 3.2), the target queries against the reference keys. Conventions and the
training-step rule are those of `idcrafter.core.flops` (docs/design.md 11): 2 FLOPs per multiply-add,
matmuls only; norms, activations, RoPE, softmax, the sinusoidal time features and One-for-All's
Var. 1 category vector (an addition) are elementwise and not counted. torch's `FlopCounterMode`
counts the same set, and on the tiny presets it gives exactly this count (tests/test_image_flops.py).

Pure functions on a FLUX config dict and an `MCImageConfig`-like object; no torch at import.

    flops = forward_flops(MCImageConfig.from_preset("multicrafter"), target=4096, text=512, refs=2 * 1024,
                          subjects=2)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from idcrafter.core.flops import attention_flops, linear_flops, moe_lora_flops, training_step_flops
from idcrafter.core.lora_config import module_matches

__all__ = ["FluxShape", "LinearCall", "block_names", "flux_linears", "forward_flops", "idar_share_flops",
           "selected_blocks", "training_step_flops"]

# diffusers' `Timesteps(num_channels=256)` feeds FLUX's time and guidance embedders.
TIME_CHANNELS = 256


@dataclass(frozen=True)
class FluxShape:
    """What the count needs of a `FluxTransformer2DModel` config (diffusers' argument names)."""

    dim: int
    heads: int
    double_layers: int
    single_layers: int
    in_channels: int
    out_channels: int
    patch: int
    text_dim: int
    pooled_dim: int
    guidance_embeds: bool

    @classmethod
    def from_config(cls, flux: Mapping[str, Any]) -> FluxShape:
        heads = int(flux["num_attention_heads"])
        in_channels = int(flux["in_channels"])
        return cls(dim=heads * int(flux["attention_head_dim"]), heads=heads, double_layers=int(flux["num_layers"]),
                   single_layers=int(flux["num_single_layers"]), in_channels=in_channels,
                   out_channels=int(flux.get("out_channels") or in_channels), patch=int(flux.get("patch_size", 1)),
                   text_dim=int(flux["joint_attention_dim"]), pooled_dim=int(flux["pooled_projection_dim"]),
                   guidance_embeds=bool(flux.get("guidance_embeds", False)))

    @property
    def mlp(self) -> int:
        """Hidden width of the feed-forwards and of the single blocks' MLP branch (ratio 4)."""
        return 4 * self.dim


@dataclass(frozen=True)
class LinearCall:
    """One `nn.Linear` call of a forward: its qualified module name, input rows and widths."""

    name: str
    rows: int
    d_in: int
    d_out: int

    @property
    def flops(self) -> int:
        return linear_flops(self.rows, self.d_in, self.d_out)


def block_names(shape: FluxShape) -> list[tuple[str, bool]]:
    """(block name, is double) in model order, named as `install_processors` names them."""
    return ([(f"transformer_blocks.{i}", True) for i in range(shape.double_layers)]
            + [(f"single_transformer_blocks.{i}", False) for i in range(shape.single_layers)])


def selected_blocks(spec: str | Sequence[str], shape: FluxShape) -> list[str]:
    """The blocks a DAM / capture selection names ("all", "none", "double", "single" or a list),
    by `install_processors`' rule (mcimage/processors.py)."""
    if isinstance(spec, str):
        pick = {"all": lambda d: True, "none": lambda d: False, "double": lambda d: d, "single": lambda d: not d}
        if spec not in pick:
            raise ValueError(f"unknown block selection {spec!r}")
        return [name for name, double in block_names(shape) if pick[spec](double)]
    wanted = set(spec)
    return [name for name, _ in block_names(shape) if name in wanted]


def _dam_linears(prefix: str, shape: FluxShape, rows: int, per_head: bool) -> Iterator[LinearCall]:
    """`DynamicTemperature`'s MLP on the projected queries of the whole joint sequence."""
    hidden = max(32, shape.dim // 4)  # DynamicTemperature's default hidden width
    yield LinearCall(f"{prefix}.attn.processor.temperature.mlp.0", rows, shape.dim, hidden)
    yield LinearCall(f"{prefix}.attn.processor.temperature.mlp.2", rows, hidden, shape.heads if per_head else 1)


def flux_linears(shape: FluxShape, image: int, text: int, dam_blocks: Sequence[str] = (),
                 dam_per_head: bool = False) -> list[LinearCall]:
    """Every linear layer call of one forward (batch 1) on `image` tokens (target + references) and
    `text` tokens, with DAM in `dam_blocks`. The conditioning embedders and AdaLN modulations run
    on one row (the time / guidance / pooled-text embedding)."""
    d, joint = shape.dim, image + text
    calls = [LinearCall("x_embedder", image, shape.in_channels, d),
             LinearCall("context_embedder", text, shape.text_dim, d)]
    embedders = ["timestep_embedder"] + (["guidance_embedder"] if shape.guidance_embeds else [])
    for name in embedders:
        calls += [LinearCall(f"time_text_embed.{name}.linear_1", 1, TIME_CHANNELS, d),
                  LinearCall(f"time_text_embed.{name}.linear_2", 1, d, d)]
    calls += [LinearCall("time_text_embed.text_embedder.linear_1", 1, shape.pooled_dim, d),
              LinearCall("time_text_embed.text_embedder.linear_2", 1, d, d)]
    dam = set(dam_blocks)
    for prefix, double in block_names(shape):
        if double:
            calls += [LinearCall(f"{prefix}.norm1.linear", 1, d, 6 * d),
                      LinearCall(f"{prefix}.norm1_context.linear", 1, d, 6 * d)]
            calls += [LinearCall(f"{prefix}.attn.{p}", image, d, d) for p in ("to_q", "to_k", "to_v", "to_out.0")]
            calls += [LinearCall(f"{prefix}.attn.{p}", text, d, d)
                      for p in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")]
            for ff, rows in (("ff", image), ("ff_context", text)):
                calls += [LinearCall(f"{prefix}.{ff}.net.0.proj", rows, d, shape.mlp),
                          LinearCall(f"{prefix}.{ff}.net.2", rows, shape.mlp, d)]
        else:  # the single block runs on [text; image] as one sequence; its attention has no to_out
            calls += [LinearCall(f"{prefix}.norm.linear", 1, d, 3 * d),
                      LinearCall(f"{prefix}.proj_mlp", joint, d, shape.mlp)]
            calls += [LinearCall(f"{prefix}.attn.{p}", joint, d, d) for p in ("to_q", "to_k", "to_v")]
            calls += [LinearCall(f"{prefix}.proj_out", joint, d + shape.mlp, d)]
        if prefix in dam:
            calls += list(_dam_linears(prefix, shape, joint, dam_per_head))
    calls += [LinearCall("norm_out.linear", 1, d, 2 * d),
              LinearCall("proj_out", image, d, shape.patch**2 * shape.out_channels)]
    return calls


def idar_share_flops(shape: FluxShape, target: int, refs: int, subjects: int) -> int:
    """One capturing layer's ref-restricted share (idcrafter/core/attention.py `ref_attention_share`):
    the target queries against the reference keys, then the probabilities summed per subject (a
    product with the [R, N] one-hot membership, per head)."""
    return linear_flops(target, shape.dim, refs) + linear_flops(shape.heads * target, refs, subjects)


def forward_flops(config, target: int, text: int, refs: int = 0, subjects: int = 0, capture: bool = False,
                  flux: Mapping[str, Any] | None = None) -> int:
    """FLOPs of one `MCImageTransformer` forward of one sample.

    Args:
        config: an `MCImageConfig` (its FLUX architecture, DAM blocks, adapter and IDAR capture).
        target, text: target-image tokens (packed 2x2 latents) and text tokens.
        refs: reference tokens, summed over the `subjects` references.
        capture: the forward records IDAR shares (`attention_capture` given; needs a reference).
        flux: the FLUX config to count (default `config.flux`).
    """
    shape = FluxShape.from_config(config.flux if flux is None else flux)
    image, joint = target + refs, target + refs + text
    dam = selected_blocks(config.dam_blocks, shape) if config.dam else []
    calls = flux_linears(shape, image, text, dam, config.dam_per_head)
    flops = sum(call.flops for call in calls)
    flops += (shape.double_layers + shape.single_layers) * attention_flops(joint, joint, shape.dim)
    adapter = config.adapter_config()
    if adapter is not None:
        flops += sum(moe_lora_flops(c.rows, c.d_in, c.d_out, adapter.rank, adapter.num_experts)
                     for c in calls if module_matches(c.name, adapter.target_modules))
    if capture and subjects:
        flops += len(selected_blocks(config.capture_blocks, shape)) * idar_share_flops(shape, target, refs, subjects)
    return flops
