"""`image-idar` case: what IDAR costs in one MultiCrafter training step.

One SFT step of `MCImageTransformer` (MultiCrafter preset: UNO ids, MoE-LoRA E = 4 trainable, base
frozen) with two references: forward + flow loss + backward, side by side in one run,
- `none`: no capture (the flow loss alone);
- `idar`: ref shares captured on the double blocks and L = L_flow + lambda * L_attn
  (`idcrafter.core.regularization.idar_loss`), shares chunked with `--chunk-size`;
- `idar/chunk=C`: the same with query chunk C (`--share-chunk C ...`): how the chunk bounds memory.

Configs (`--config`): `flux-dev` (FLUX.1-dev, 512x512 target and references, T5 512 tokens,
bf16; the default on CUDA), `small` (a 256-wide FLUX with 2 double and 2 single blocks, 256x256
target and references, 64 text tokens; the CPU default), `tiny` (the test preset; `--quick`).
Random weights; the MoE-LoRA B matrices get small random values, as after training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from idcrafter.benchmarks import register
from idcrafter.core.regularization import idar_loss
from idcrafter.flow.matching import add_noise, flow_loss, flow_target
from idcrafter.utils.profiling import measure_side_by_side


@dataclass(frozen=True)
class ImageShape:
    """Token grids of one sample: target (h, w), each reference (h, w), text length, batch."""

    target: tuple[int, int]
    refs: tuple[tuple[int, int], ...]
    text: int
    batch: int = 1


_SMALL_FLUX = dict(
    patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=64,
    num_attention_heads=4, joint_attention_dim=256, pooled_projection_dim=128, guidance_embeds=True,
    axes_dims_rope=[8, 28, 28],
)
# name: (flux config or None for the preset's own, shape). 512x512 pixels = 32x32 packed tokens.
CONFIGS: dict[str, tuple[str, dict | None, ImageShape]] = {
    "flux-dev": ("multicrafter", None, ImageShape(target=(32, 32), refs=((32, 32), (32, 32)), text=512)),
    "small": ("multicrafter", _SMALL_FLUX, ImageShape(target=(16, 16), refs=((16, 16), (16, 16)), text=64)),
    "tiny": ("tiny-multicrafter", None, ImageShape(target=(4, 4), refs=((2, 2), (2, 2)), text=8)),
}


def _setup(name: str, device: torch.device, dtype: torch.dtype, chunk: int):
    from mcimage.config import MCImageConfig  # the image branch, only when this case runs
    from mcimage.transformer import MCImageTransformer

    preset, flux, shape = CONFIGS[name]
    overrides = {"share_chunk_size": chunk, "idar": True, "idar_blocks": "double"}
    if flux is not None:
        overrides["flux"] = flux
    config = MCImageConfig.from_preset(preset, **overrides)
    # Built on the device in the compute dtype (a 12B model never exists in float32); the
    # MoE-LoRA parameters stay float32, as MoELoRALinear keeps them.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = MCImageTransformer.from_mc_config(config, seed=0).train()
    finally:
        torch.set_default_dtype(previous)
    model.trainable_parameters("adapter")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if ".lora_B" in name_:
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p))

    f = config.flux
    b, (th, tw) = shape.batch, shape.target
    z0 = torch.randn(b, th * tw, f["in_channels"], generator=g).to(device, dtype)
    noise = torch.randn(z0.shape, generator=g).to(device, dtype)
    t = torch.full((b,), 0.6)
    inputs = dict(
        hidden_states=add_noise(z0, noise, t.to(device)),
        ref_latents=[torch.randn(b, h * w, f["in_channels"], generator=g).to(device, dtype) for h, w in shape.refs],
        encoder_hidden_states=torch.randn(b, shape.text, f["joint_attention_dim"], generator=g).to(device, dtype),
        pooled_projections=torch.randn(b, f["pooled_projection_dim"], generator=g).to(device, dtype),
        timestep=t.to(device, dtype),
        guidance=torch.full((b,), 3.5, device=device) if f.get("guidance_embeds") else None,
        target_hw=shape.target,
        ref_hws=list(shape.refs),
    )
    # Subject 0 on the left half of the target, subject 1 on the right quarter, the rest background.
    cols = torch.arange(tw).repeat(th)
    assignment = torch.full((th * tw,), -1)
    assignment[cols < tw // 2] = 0
    assignment[cols >= 3 * tw // 4] = 1
    return model, config, shape, inputs, flow_target(z0, noise), assignment.expand(b, -1).to(device)


def run(
    device: str = "cpu",
    full: bool | None = None,
    chunk_size: int = 256,
    repeats: int = 3,
    config: str | None = None,
    quick: bool = False,
    share_chunk: list[int] | tuple[int, ...] = (),
    **_,
) -> dict:
    """Training step with IDAR capture + loss vs without: time, peak memory and their ratios."""
    device = torch.device(device)
    full = device.type == "cuda" if full is None else full
    name = "tiny" if quick else (config or ("flux-dev" if full else "small"))
    if name not in CONFIGS:
        raise ValueError(f"--config {name!r}: unknown; use one of {', '.join(CONFIGS)}")
    if chunk_size <= 0 or any(c <= 0 for c in share_chunk):
        raise ValueError("share chunk sizes must be positive")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, cfg, shape, inputs, target, assignment = _setup(name, device, dtype, chunk_size)

    def step(chunk: int | None) -> None:
        model.zero_grad(set_to_none=True)
        shares: dict[str, torch.Tensor] | None = None if chunk is None else {}
        cfg.share_chunk_size = chunk or chunk_size
        v = model(**inputs, attention_capture=shares)
        loss = flow_loss(v, target)
        if shares is not None:
            l_attn, _ = idar_loss(list(shares.values()), assignment)
            loss = loss + cfg.idar_lambda * l_attn
        loss.backward()

    modes: dict[str, int | None] = {"none": None, "idar": chunk_size}
    for c in share_chunk:
        modes[f"idar/chunk={c}"] = c
    # Timed calls interleaved across modes, so load drift on a shared machine hits every row alike.
    results = measure_side_by_side({mode: (lambda c=c: step(c)) for mode, c in modes.items()}, device, repeats=repeats)
    base = results["none"]
    return {
        "case": "image-idar",
        "config": name,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "shape": asdict(shape),
        "flux": {k: cfg.flux[k] for k in ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim")},
        "idar_blocks": sum(p.capture for p in model.processors.values()),
        "chunk_size": chunk_size,
        "results": {
            mode: {
                "share_chunk": modes[mode],
                "seconds": r.seconds,
                "peak_mib": r.peak_mib,
                "time_ratio": r.seconds / base.seconds,
                "memory_ratio": r.peak_bytes / max(base.peak_bytes, 1),
            }
            for mode, r in results.items()
        },
    }


def format_table(report: dict) -> str:
    s, f = report["shape"], report["flux"]
    refs = " + ".join(f"{h}x{w}" for h, w in s["refs"])
    lines = [
        f"image-idar ({report['config']}): MCImageTransformer train step, {f['num_layers']} double + "
        f"{f['num_single_layers']} single blocks, {f['num_attention_heads']} heads x {f['attention_head_dim']}, "
        f"target {s['target'][0]}x{s['target'][1]} + refs {refs} tokens + text {s['text']}, batch {s['batch']}, "
        f"IDAR on {report['idar_blocks']} blocks, {report['device']} {report['dtype']}",
        f"{'mode':<16}{'time ms':>10}{'peak MiB':>11}{'time x':>9}{'memory x':>10}",
    ]
    for mode, r in report["results"].items():
        lines.append(
            f"{mode:<16}{r['seconds'] * 1e3:>10.1f}{r['peak_mib']:>11.1f}{r['time_ratio']:>9.2f}{r['memory_ratio']:>10.2f}"
        )
    return "\n".join(lines)


register("image-idar", format_table, "MultiCrafter train step with IDAR capture + loss vs without")(run)
