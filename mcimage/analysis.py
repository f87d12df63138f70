"""What the image models attend to and how they route: attention-bleeding maps and MoE-LoRA routing.

- `subject_attention_maps`: generate an image, re-noise it to time t, run one transformer forward
  with IDAR share capture and read, per subject, the share of attention its reference tokens get
  from every target token (docs/design.md 3.2), averaged over the captured blocks -> maps [N, h, w].
- `attention_figure`: reference thumbnails, the image and one overlay per subject (PNG).
- `routing_statistics` / `routing_change_figure`: mean MoE-LoRA gates [L, E] over one
  generation, and the routing-change heatmap |P_A - P_B| / (P_A + eps) between two prompts.

    pipe = MCImagePipeline.from_components(build_tiny_components(MCImageConfig.from_preset("tiny-multicrafter")))
    att = subject_attention_maps(pipe, "a dog and a cat", ["dog.png", "cat.png"], height=32, width=32)
    attention_figure(att.image, ["dog.png", "cat.png"], att.maps, "attention.png")
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from idcrafter.core.moe_lora import moe_lora_layers, record_routing, routing_change
from idcrafter.utils.io import atomic_write
from idcrafter.utils.media import load_image, to_rgb
from mcimage.pipeline import MCImagePipeline
from mcimage.transformer import MCImageTransformer

__all__ = [
    "RoutingStats",
    "SubjectAttention",
    "attention_figure",
    "capture_enabled",
    "routing_change_figure",
    "routing_statistics",
    "subject_attention_maps",
    "upsample_map",
]


# --------------------------------------------------------------------------------------------
# Attention maps


@dataclass
class SubjectAttention:
    """Result of `subject_attention_maps`.

    image: [H, W, 3] float32 in [0, 1], the generated image; maps: [N, h, w] float32, the
    ref-restricted share of subject k at each target token averaged over `blocks` (sums to 1
    over N at every token); block_maps: [len(blocks), N, h, w], the same per block; grid: (h, w)
    target token grid; t: the time the image was re-noised to.
    """

    image: np.ndarray
    maps: np.ndarray
    block_maps: np.ndarray
    blocks: tuple[str, ...]
    grid: tuple[int, int]
    t: float


def _select(spec: str | Sequence[str], names: Sequence[str]) -> list[str]:
    if isinstance(spec, str):
        rules = {"all": lambda n: True, "double": lambda n: n.startswith("transformer_blocks."),
                 "single": lambda n: n.startswith("single_transformer_blocks.")}
        if spec not in rules:
            raise ValueError(f"blocks must be 'all', 'double', 'single' or a list of block names, got {spec!r}")
        return [n for n in names if rules[spec](n)]
    unknown = sorted(set(spec) - set(names))
    if unknown:
        raise ValueError(f"blocks {unknown} are not attention blocks of this model (e.g. {names[0]!r})")
    return [n for n in names if n in set(spec)]


@contextlib.contextmanager
def capture_enabled(transformer: MCImageTransformer, blocks: str | Sequence[str] | None = None) -> Iterator[list[str]]:
    """Make the processors of `blocks` capture ref shares inside the block; restore them after.

    blocks: None keeps the layers that already capture (a model trained with IDAR) and falls back
    to the double blocks when none does; else "all", "double", "single" or a list of block names.
    Yields the names of the capturing blocks.
    """
    processors = transformer.processors
    previous = {name: p.capture for name, p in processors.items()}
    if blocks is None:
        chosen = [name for name, was in previous.items() if was] or _select("double", list(processors))
    else:
        chosen = _select(blocks, list(processors))
    if not chosen:
        raise ValueError(f"blocks {blocks!r} select no attention block of this model")
    for name, p in processors.items():
        p.capture = name in chosen
    try:
        yield chosen
    finally:
        for name, p in processors.items():
            p.capture = previous[name]


def _decode(pipe: MCImagePipeline, latents: torch.Tensor, height: int, width: int) -> np.ndarray:
    """Packed latents [B, L_t, C] -> images [B, H, W, 3] in [0, 1] (the pipeline's own decode)."""
    return pipe.decode_latents(latents, height, width, "np")


@torch.no_grad()
def subject_attention_maps(
    pipe: MCImagePipeline,
    prompt: str,
    refs: Sequence,
    categories: Sequence[str] | None = None,
    height: int = 512,
    width: int = 512,
    seed: int = 0,
    steps: int | None = None,
    t: float = 0.5,
    blocks: str | Sequence[str] | None = None,
    ref_size: tuple[int, int] | None = None,
    max_sequence_length: int = 512,
    descriptor_tokens=None,
) -> SubjectAttention:
    """Per-subject attention maps of a generated image (the papers' attention-bleeding picture).

    The image is generated with `pipe` (seed `seed`), its clean latents x0 are re-noised to time
    t with x_t = (1 - t) x0 + t eps (eps drawn from `seed + 1`), and one transformer forward at t
    records, for each captured block, share(i, k) = softmax restricted to the reference keys,
    summed over subject k's keys and averaged over heads ([1, N, L_t]). The maps are the mean
    over blocks, on the target token grid.

    Args:
        prompt: one prompt; refs: N >= 1 references (paths, PIL images or uint8 arrays).
        categories, ref_size, max_sequence_length, descriptor_tokens: as `MCImagePipeline.__call__`.
        t: re-noising time in (0, 1]; blocks: see `capture_enabled`.

    Returns:
        `SubjectAttention` with maps [N, h, w], h = height / 16, w = width / 16 for FLUX's VAE.
    """
    if not isinstance(prompt, str):
        raise ValueError("subject_attention_maps: prompt must be one string")
    refs = list(refs)
    if not refs:
        raise ValueError("subject_attention_maps: give at least one reference image (maps are per subject)")
    if not 0.0 < t <= 1.0:
        raise ValueError(f"subject_attention_maps: t must be in (0, 1], got {t}")
    cfg = pipe.mc_config
    out = pipe(
        prompt, refs, categories, height=height, width=width, num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed), output_type="latent", ref_size=ref_size,
        max_sequence_length=max_sequence_length,
        descriptor_tokens=descriptor_tokens,
    )
    x0 = out.images  # [1, L_t, C]
    image = _decode(pipe, x0, height, width)[0]

    device = pipe._execution_device  # the offload hooks' device when offloaded, as in the pipeline
    prompt_embeds, pooled, _ = pipe.encode_prompt(
        prompt=[prompt], prompt_2=None, device=device, max_sequence_length=max_sequence_length
    )
    dtype = prompt_embeds.dtype
    ref_h, ref_w = ref_size or cfg.ref_size or (height, width)  # the canvas the pipeline fitted them on
    ref_tokens, ref_hws = pipe.encode_references(refs, ref_h, ref_w, 1, device, dtype)
    mult = pipe.vae_scale_factor * 2
    grid = (height // mult, width // mult)

    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
    x_t = (1 - t) * x0.to(dtype) + t * eps
    timestep = torch.full((1,), float(t), device=device, dtype=dtype)
    guidance = torch.full((1,), float(cfg.guidance_scale), device=device) if cfg.flux.get("guidance_embeds") else None

    captured: dict[str, torch.Tensor] = {}
    with capture_enabled(pipe.transformer, blocks) as names:
        pipe.transformer(
            x_t, ref_tokens, prompt_embeds, pooled, timestep, guidance, target_hw=grid, ref_hws=ref_hws,
            categories=categories, descriptor_tokens=descriptor_tokens, attention_capture=captured,
        )
    per_block = torch.stack([captured[name][0].float() for name in names])  # [blocks, N, L_t]
    block_maps = per_block.unflatten(-1, grid).cpu().numpy()
    return SubjectAttention(
        image=image.astype(np.float32), maps=block_maps.mean(0), block_maps=block_maps,
        blocks=tuple(names), grid=grid, t=float(t),
    )


def upsample_map(token_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """[h, w] token map -> [height, width], each token's value over its whole patch (nearest).

    height and width must be multiples of h and w (they are for the pipeline's sizes).
    """
    h, w = token_map.shape
    if height % h or width % w:
        raise ValueError(f"upsample_map: image {height}x{width} is not a multiple of the token grid {h}x{w}")
    return np.repeat(np.repeat(token_map, height // h, axis=0), width // w, axis=1)


def _as_rgb_array(image, what: str) -> np.ndarray:
    """Path, PIL image, uint8 [H, W(, C)] or float [H, W, 3] in [0, 1] -> uint8 [H, W, 3]."""
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    if isinstance(image, Image.Image):
        return np.asarray(to_rgb(image))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"{what}: expected an image [H, W, 3], got shape {arr.shape}")
    return np.asarray(to_rgb(Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)))


def _save_figure(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def attention_figure(
    image,
    refs: Sequence,
    maps: np.ndarray,
    path: str | os.PathLike,
    titles: Sequence[str] | None = None,
    alpha: float = 0.55,
) -> np.ndarray:
    """Write the attention-bleeding figure as a PNG (atomically) and return what it overlays.

    Top row: the reference thumbnails; bottom row: the generated image, then for each subject k
    its map upsampled to the image (nearest, one value per token patch) and overlaid on it.

    Args:
        image: [H, W, 3] float in [0, 1] or uint8 (or a PIL image / path); refs: N references.
        maps: [N, h, w] per-subject maps (e.g. `SubjectAttention.maps`).
        titles: one label per subject (default "subject k").

    Returns:
        [N, H, W] float32, the overlaid maps.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3:
        raise ValueError(f"attention_figure: maps must be [N, h, w], got shape {maps.shape}")
    n = maps.shape[0]
    if len(refs) != n:
        raise ValueError(f"attention_figure: {len(refs)} references for {n} maps")
    titles = list(titles) if titles is not None else [f"subject {k}" for k in range(n)]
    if len(titles) != n:
        raise ValueError(f"attention_figure: {len(titles)} titles for {n} maps")
    img = _as_rgb_array(image, "image")
    big = np.stack([upsample_map(m, img.shape[0], img.shape[1]) for m in maps]).astype(np.float32)
    thumbs = [_as_rgb_array(r, f"reference {k}") for k, r in enumerate(refs)]

    cols = n + 1
    fig = Figure(figsize=(2.4 * cols, 5.0), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for k, thumb in enumerate(thumbs):
        axes[0, k + 1].imshow(thumb)
        axes[0, k + 1].set_title(f"reference: {titles[k]}", fontsize=8)
    axes[1, 0].imshow(img)
    axes[1, 0].set_title("generated", fontsize=8)
    for k in range(n):
        ax = axes[1, k + 1]
        ax.imshow(img)
        overlay = ax.imshow(big[k], cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"{titles[k]}\nmean share {maps[k].mean():.2f}", fontsize=8)
    fig.colorbar(overlay, ax=list(axes[1, 1:]), fraction=0.03, label="share of reference attention")
    _save_figure(fig, path)
    return big


# --------------------------------------------------------------------------------------------
# Routing


@dataclass
class RoutingStats:
    """Mean MoE-LoRA gates over one generation.

    prompt: the prompt; layers: L routed layer names (model order); probs: [L, E] float32, each
    row the gates averaged over tokens, denoising steps and batch (sums to 1).
    """

    prompt: str
    layers: tuple[str, ...]
    probs: np.ndarray

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "layers": {name: row.tolist() for name, row in zip(self.layers, self.probs)}}


def routing_statistics(
    pipe: MCImagePipeline,
    prompt: str,
    refs: Sequence = (),
    categories: Sequence[str] | None = None,
    height: int = 512,
    width: int = 512,
    seed: int = 0,
    steps: int | None = None,
    ref_size: tuple[int, int] | None = None,
    max_sequence_length: int = 512,
    descriptor_tokens=None,
    blocks: str = "all",
) -> RoutingStats:
    """Generate one image and record every routed MoE-LoRA layer's mean gates ([L, E]) in `blocks`
    ("all", "double": MultiCrafter supp. Sec. H's choice, or "single").

    Raises:
        ValueError: the transformer has no MoE-LoRA layer with more than one expert (in `blocks`).
    """
    routed = [name for name, m in moe_lora_layers(pipe.transformer).items() if m.num_experts > 1]
    keep = set(_select(blocks, routed))
    layers = [name for name in routed if name in keep]
    if not layers:
        raise ValueError(f"the model (adapter={pipe.mc_config.adapter!r}) has no MoE-LoRA layers with a router"
                         + ("" if blocks == "all" else f" in the {blocks} blocks"))
    with record_routing(pipe.transformer) as record:
        pipe(
            prompt, refs, categories, height=height, width=width, num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed), output_type="latent", ref_size=ref_size,
        max_sequence_length=max_sequence_length,
            descriptor_tokens=descriptor_tokens,
        )
    means = record.mean()
    # record_routing names layers relative to the transformer it was given; keep model order.
    probs = np.stack([means[name].float().numpy() for name in layers]).astype(np.float32)
    return RoutingStats(prompt=prompt, layers=tuple(layers), probs=probs)


def routing_change_over_seeds(
    pipe: MCImagePipeline, prompt_a: str, prompt_b: str, seeds: Sequence[int], **kwargs
) -> tuple[RoutingStats, RoutingStats, np.ndarray]:
    """MultiCrafter supp. Sec. H: the routing change between two prompts averaged over seeds (4 in
    the paper, on the double blocks), everything else fixed. Returns the gates of each prompt
    averaged over the seeds and the mean over seeds of each seed's change |P_A - P_B| / (P_A + eps)
    [L, E]. `kwargs` go to `routing_statistics` (refs, size, `blocks`, ...)."""
    if not seeds:
        raise ValueError("routing_change_over_seeds: give at least one seed")
    runs = [(routing_statistics(pipe, prompt_a, seed=s, **kwargs), routing_statistics(pipe, prompt_b, seed=s, **kwargs))
            for s in seeds]
    change = np.mean([routing_change(torch.from_numpy(a.probs), torch.from_numpy(b.probs)).numpy() for a, b in runs], 0)
    mean_a = RoutingStats(prompt_a, runs[0][0].layers, np.mean([a.probs for a, _ in runs], 0).astype(np.float32))
    mean_b = RoutingStats(prompt_b, runs[0][1].layers, np.mean([b.probs for _, b in runs], 0).astype(np.float32))
    return mean_a, mean_b, change.astype(np.float32)


def routing_change_figure(
    stats_a: RoutingStats, stats_b: RoutingStats, path: str | os.PathLike, eps: float = 1e-6,
    change: np.ndarray | None = None,
) -> np.ndarray:
    """Write the routing-change figure (PNG, atomically) and return the change matrix [L, E].

    Three heatmaps, layers x experts: the gates of prompt A, of prompt B, and
    `routing_change(P_A, P_B) = |P_A - P_B| / (P_A + eps)` (or `change` when given, e.g. the
    mean over seeds of `routing_change_over_seeds`).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if stats_a.layers != stats_b.layers or stats_a.probs.shape != stats_b.probs.shape:
        raise ValueError("routing_change_figure: the two statistics come from different models (layers differ)")
    if change is None:
        change = routing_change(torch.from_numpy(stats_a.probs), torch.from_numpy(stats_b.probs), eps=eps).numpy()
    layers, experts = change.shape
    fig = Figure(figsize=(11.0, min(2.0 + 0.18 * layers, 40.0)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3, sharey=True)
    panels = [
        (stats_a.probs, f"gates, A: {stats_a.prompt[:40]}", "viridis", 1.0),
        (stats_b.probs, f"gates, B: {stats_b.prompt[:40]}", "viridis", 1.0),
        (change, "|P_A - P_B| / (P_A + eps)", "magma", max(float(change.max()), 1e-12)),
    ]
    step = max(1, layers // 60)
    for ax, (data, title, cmap, vmax) in zip(axes, panels):
        im = ax.imshow(data, cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_xticks(range(experts), [f"e{e}" for e in range(experts)], fontsize=7)
        ax.set_xlabel("expert", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.05)
    axes[0].set_yticks(range(0, layers, step), [stats_a.layers[i] for i in range(0, layers, step)], fontsize=5)
    fig.subplots_adjust(left=0.3, right=0.97, wspace=0.35)
    _save_figure(fig, path)
    return change
