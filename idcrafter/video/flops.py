"""Analytic FLOPs of a Wan / ID-Crafter transformer forward, denoising step and training step.

Counts the matrix multiplications (2 FLOPs per multiply-add): linear layers and the two
products of every attention (Q K^T and P V). Norms, activations, rotary embeddings and
softmax are a few percent of the elementwise work and are left out, as in the usual MFU
accounting (Megatron-LM, PaLM Appendix B). A training step is forward + backward = 3x the
forward's matmuls, plus one more forward of the checkpointed part with gradient checkpointing
(docs/design.md 11).

Video tokens: latent frames x latent rows x latent columns / patch volume (480x832x81 in Wan
2.1: 21 x 60 x 104 / (1 x 2 x 2) = 32,760). Reference tokens: one latent frame of the reference
canvas through the subject encoder's 2x2 patch (480x832: 30 x 52 = 1,560).

Stage 3 (ID-Crafter Sec. 3.2, "cross-modal attention") has two forms (`stage3_form`):
"own" = its own query and output projections of all video tokens in each of the K blocks;
"attn2" = it shares the text cross-attention's query and output projection, so it adds only
the attention over the subject keys (the method's floor). The subject keys/values have their own
projections in both; with the subject stream cached they are computed once per generation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The shared rules, re-exported: callers use them from here as before.
from idcrafter.core.flops import attention_flops as attention_flops
from idcrafter.core.flops import linear_flops as linear_flops
from idcrafter.core.flops import training_step_flops as training_step_flops

STAGE3_FORMS = ("own", "attn2")
# Wan 2.1 VAE: /4 in time, /8 in space; the subject encoder's patch is 2x2.
VAE_TEMPORAL, VAE_SPATIAL = 4, 8


def video_tokens(height: int, width: int, frames: int, patch: tuple[int, int, int] = (1, 2, 2)) -> int:
    """Transformer tokens of a (frames, height, width) video: latent (1 + (frames-1)/4, h/8, w/8) / patch."""
    latent = (1 + (frames - 1) // VAE_TEMPORAL, height // VAE_SPATIAL, width // VAE_SPATIAL)
    return (latent[0] // patch[0]) * (latent[1] // patch[1]) * (latent[2] // patch[2])


def reference_tokens(height: int, width: int, subject_patch: int = 2) -> int:
    """Subject-encoder tokens of one reference on a (height, width) canvas: one latent frame / patch^2."""
    return (height // VAE_SPATIAL // subject_patch) * (width // VAE_SPATIAL // subject_patch)


@dataclass(frozen=True)
class WanShape:
    """What the FLOP count needs of a Wan transformer config (diffusers' WanTransformer3DModel names)."""

    dim: int
    heads: int
    layers: int
    ffn: int
    text_dim: int
    in_channels: int
    out_channels: int
    freq_dim: int
    patch: tuple[int, int, int]

    @classmethod
    def from_config(cls, wan: Mapping[str, Any]) -> WanShape:
        heads = int(wan["num_attention_heads"])
        return cls(dim=heads * int(wan["attention_head_dim"]), heads=heads, layers=int(wan["num_layers"]),
                   ffn=int(wan["ffn_dim"]), text_dim=int(wan["text_dim"]), in_channels=int(wan["in_channels"]),
                   out_channels=int(wan["out_channels"]), freq_dim=int(wan["freq_dim"]),
                   patch=tuple(wan.get("patch_size", (1, 2, 2))))


def wan_block_flops(shape: WanShape, tokens: int, text_tokens: int) -> int:
    """One stock Wan block: self-attention, text cross-attention (its K/V on the text), FFN."""
    d, n, t = shape.dim, tokens, text_tokens
    self_attn = 4 * linear_flops(n, d, d) + attention_flops(n, n, d)
    cross = 2 * linear_flops(n, d, d) + 2 * linear_flops(t, d, d) + attention_flops(n, t, d)
    ffn = linear_flops(n, d, shape.ffn) + linear_flops(n, shape.ffn, d)
    return self_attn + cross + ffn


def wan_forward_flops(shape: WanShape, tokens: int, text_tokens: int) -> int:
    """A stock Wan forward of one sample: patch embedding, text and time embedders, blocks, head."""
    d = shape.dim
    patch_volume = shape.patch[0] * shape.patch[1] * shape.patch[2]
    embed = linear_flops(tokens, shape.in_channels * patch_volume, d)
    text = linear_flops(text_tokens, shape.text_dim, d) + linear_flops(text_tokens, d, d)
    time = linear_flops(1, shape.freq_dim, d) + linear_flops(1, d, d) + linear_flops(1, d, 6 * d)
    head = linear_flops(tokens, d, shape.out_channels * patch_volume)
    return embed + text + time + head + shape.layers * wan_block_flops(shape, tokens, text_tokens)


def tower_layer_flops(dim: int, subjects: int, ref_tokens: int, intra: bool = True, inter: bool = True) -> int:
    """One subject-tower layer (stages 1-2) on `subjects` x `ref_tokens` tokens.

    Stage 2's attention runs over all N*T keys with the subject's own keys masked, so it costs
    the full (N*T)^2 product (as `SubjectTowerLayer` computes it), plus the gate W_g.
    """
    nt = subjects * ref_tokens
    flops = 0
    if intra:
        flops += 4 * linear_flops(nt, dim, dim) + subjects * attention_flops(ref_tokens, ref_tokens, dim)
    if inter:
        flops += 5 * linear_flops(nt, dim, dim) + attention_flops(nt, nt, dim)
    return flops


@dataclass(frozen=True)
class IDCrafterShape:
    """The ID-Crafter side of the count: K adapted blocks, the hierarchy, stage 3's form."""

    blocks: int
    latent_channels: int = 16
    subject_patch: int = 2
    hierarchy: str = "full"
    stage3_form: str = "own"

    def __post_init__(self) -> None:
        if self.stage3_form not in STAGE3_FORMS:
            raise ValueError(f"stage3_form must be one of {', '.join(STAGE3_FORMS)}, got {self.stage3_form!r}")

    @classmethod
    def from_config(cls, config, stage3_form: str | None = None) -> IDCrafterShape:
        """From an `IDCrafterConfig`; the form defaults to the config's `stage3_projections` (when it has one)."""
        form = stage3_form or getattr(config, "stage3_projections", "own")
        return cls(blocks=min(config.num_blocks, int(config.wan["num_layers"])), latent_channels=config.latent_channels,
                   subject_patch=config.subject_patch, hierarchy=config.hierarchy, stage3_form=form)

    @property
    def tower(self) -> bool:
        return self.hierarchy in ("full", "no-intra", "no-inter", "no-cross")

    @property
    def stage3(self) -> bool:
        return self.hierarchy in ("full", "no-intra", "no-inter", "stage3")


def subject_stream_flops(shape: WanShape, idc: IDCrafterShape, subjects: int, ref_tokens: int) -> int:
    """The per-generation part: subject encoder, tower (stages 1-2), stage-3 keys/values of K blocks."""
    if subjects == 0:
        return 0
    d, nt = shape.dim, subjects * ref_tokens
    flops = linear_flops(nt, idc.latent_channels * idc.subject_patch**2, d)
    if idc.tower:
        flops += idc.blocks * tower_layer_flops(d, subjects, ref_tokens, idc.hierarchy != "no-intra",
                                                idc.hierarchy != "no-inter")
    if idc.stage3:
        flops += idc.blocks * 2 * linear_flops(nt, d, d)
    return flops


def stage3_step_flops(shape: WanShape, idc: IDCrafterShape, tokens: int, subjects: int, ref_tokens: int) -> int:
    """What the video tokens add per forward when reading a cached stream: stage 3 in K blocks
    (the query/output projections only in the "own" form), or, without stage 3 (`plain`,
    `no-cross`), the subject keys appended to attn2's text keys."""
    if subjects == 0:
        return 0
    d, keys = shape.dim, subjects * ref_tokens
    per_block = attention_flops(tokens, keys, d)
    if idc.stage3 and idc.stage3_form == "own":
        per_block += 2 * linear_flops(tokens, d, d)
    if not idc.stage3:  # the subject tokens pass attn2's key/value projections in every step
        per_block += 2 * linear_flops(keys, d, d)
    return idc.blocks * per_block


@dataclass(frozen=True)
class Flops:
    """FLOPs of one sample (per guidance pass for `step`): stock Wan and ID-Crafter."""

    stock_forward: int
    stream: int  # subject encoder + tower + stage-3 K/V, once per generation (or per training forward)
    stage3: int  # added to every forward that reads the stream

    @property
    def cached_forward(self) -> int:
        """One denoising pass with the subject stream cached."""
        return self.stock_forward + self.stage3

    @property
    def full_forward(self) -> int:
        """A forward that also computes the stream (training; an uncached step)."""
        return self.stock_forward + self.stage3 + self.stream

    @property
    def cached_ratio(self) -> float:
        return self.cached_forward / self.stock_forward

    @property
    def full_ratio(self) -> float:
        return self.full_forward / self.stock_forward


def count_flops(shape: WanShape, idc: IDCrafterShape, tokens: int, text_tokens: int, subjects: int,
                ref_tokens: int) -> Flops:
    return Flops(stock_forward=wan_forward_flops(shape, tokens, text_tokens),
                 stream=subject_stream_flops(shape, idc, subjects, ref_tokens),
                 stage3=stage3_step_flops(shape, idc, tokens, subjects, ref_tokens))


def generation_flops(flops: Flops, steps: int, passes: int = 3, subject_passes: int | None = None) -> int:
    """One generation: `steps` denoising steps of `passes` guidance passes (ID-Crafter's three:
    unconditional, image-only, image+text), `subject_passes` of which read the stream (all of them
    by default: the pipeline's null rows mask the subject keys but still compute them), plus the
    stream once."""
    subject_passes = passes if subject_passes is None else subject_passes
    per_step = passes * flops.stock_forward + subject_passes * flops.stage3
    return steps * per_step + flops.stream


def for_config(config, height: int | None = None, width: int | None = None, frames: int | None = None,
               subjects: int = 1, stage3_form: str | None = None, ref_size: int | None = None) -> Flops:
    """FLOPs of one sample of `config` (an `IDCrafterConfig`) at a resolution (default: the config's)."""
    height, width, frames = height or config.height, width or config.width, frames or config.num_frames
    shape = WanShape.from_config(config.wan)
    idc = IDCrafterShape.from_config(config, stage3_form)
    ref_h, ref_w = (ref_size, ref_size) if ref_size else config.ref_canvas(height, width)
    return count_flops(shape, idc, video_tokens(height, width, frames, shape.patch), config.text_length,
                       subjects, reference_tokens(ref_h, ref_w, idc.subject_patch))
