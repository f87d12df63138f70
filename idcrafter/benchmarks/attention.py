"""`attention` case: what IDAR costs in one FLUX double-block attention.

A real diffusers `FluxAttention` (joint text/image attention with QK-norm and RoPE, as in
`FluxTransformerBlock`) with our processor, forward + backward three ways, side by side in one run:
- `none`:  no regularisation (the processor does not capture);
- `idar`:  region loss through `ref_attention_share` (chunked, checkpointed, softmax over refs);
- `naive`: region loss from the full softmax over all keys, materialised and sliced.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxPosEmbed

from idcrafter.benchmarks import register
from idcrafter.core.layout import TokenLayout
from idcrafter.core.regularization import region_loss
from idcrafter.utils.profiling import measure
from mcimage.processors import MCFluxAttnProcessor, ShareCapture


@dataclass
class AttentionShape:
    heads: int
    head_dim: int
    text: int
    target: int
    refs: tuple[int, ...]
    batch: int = 1


CPU_SHAPE = AttentionShape(heads=4, head_dim=64, text=128, target=1024, refs=(256, 256))
# FLUX.1 at 1024^2 with two 512^2 references: 24 heads x 128, T5 512 tokens, 64x64 target grid.
GPU_SHAPE = AttentionShape(heads=24, head_dim=128, text=512, target=4096, refs=(1024, 1024))


class NaiveShareProcessor(MCFluxAttnProcessor):
    """Same processor, but the share comes from the full [B, H, L_t, L] softmax, sliced."""

    def _record(self, q: torch.Tensor, k: torch.Tensor, active) -> None:
        layout = active.layout
        start, end = layout.target
        logits = q[:, :, start:end].float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
        probs = logits.softmax(dim=-1)
        mass = torch.stack([probs[..., s:e].sum(-1) for s, e in layout.refs], dim=1)  # [B, N, H, L_t]
        active.shares[self.name] = (mass / mass.sum(1, keepdim=True)).mean(2)


def _grid_ids(h: int, w: int, dh: int = 0, dw: int = 0) -> torch.Tensor:
    i, j = torch.meshgrid(torch.arange(h) + dh, torch.arange(w) + dw, indexing="ij")
    return torch.stack([torch.zeros_like(i), i, j], -1).reshape(-1, 3).float()


def _setup(shape: AttentionShape, device, dtype):
    dim = shape.heads * shape.head_dim
    attn = FluxAttention(
        query_dim=dim, heads=shape.heads, dim_head=shape.head_dim, added_kv_proj_dim=dim,
        context_pre_only=False, bias=True, eps=1e-6,
    ).to(device, dtype)
    g = torch.Generator().manual_seed(0)
    image_len = shape.target + sum(shape.refs)
    x = torch.randn(shape.batch, image_len, dim, generator=g).to(device, dtype).requires_grad_()
    ctx = torch.randn(shape.batch, shape.text, dim, generator=g).to(device, dtype).requires_grad_()
    # UNO-style diagonal ids so RoPE sees a realistic layout: target grid, then each reference.
    side = int(math.isqrt(shape.target))
    ids, offset = [torch.zeros(shape.text, 3), _grid_ids(side, shape.target // side)], side
    for n in shape.refs:
        s = int(math.isqrt(n))
        ids.append(_grid_ids(s, n // s, offset, offset))
        offset += s
    rope = tuple(t.to(device) for t in FluxPosEmbed(10000, [16, 56, 56] if shape.head_dim == 128 else [8, 28, 28])(torch.cat(ids)))
    layout = TokenLayout.concat(text_len=shape.text, target_len=shape.target, ref_lens=shape.refs)
    # Half the target tokens belong to subject 0, a quarter to subject 1, the rest is background.
    assignment = torch.full((shape.batch, shape.target), -1, device=device)
    assignment[:, : shape.target // 2] = 0
    assignment[:, shape.target // 2 : 3 * shape.target // 4] = 1
    return attn, x, ctx, rope, layout, assignment


def run(device: str = "cpu", full: bool | None = None, chunk_size: int = 256, repeats: int = 3, **_) -> dict:
    """Peak memory and time of none / idar / naive and the ratios against none."""
    device = torch.device(device)
    full = device.type == "cuda" if full is None else full
    shape = GPU_SHAPE if full else CPU_SHAPE
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    attn, x, ctx, rope, layout, assignment = _setup(shape, device, dtype)
    dim = shape.heads * shape.head_dim
    processors = {
        "none": MCFluxAttnProcessor(dim, shape.heads, capture=False),
        "idar": MCFluxAttnProcessor(dim, shape.heads, capture=True),
        "naive": NaiveShareProcessor(dim, shape.heads, capture=True),
    }

    def step(mode: str):
        attn.zero_grad(set_to_none=True)
        x.grad = ctx.grad = None
        proc = processors[mode]
        proc.active = ShareCapture(layout, chunk_size=chunk_size)
        attn.set_processor(proc)
        image_out, text_out = attn(x, ctx, image_rotary_emb=rope)
        loss = image_out.float().square().mean() + text_out.float().square().mean()
        if proc.active.shares:
            loss = loss + region_loss(list(proc.active.shares.values()), assignment)
        proc.active = None
        loss.backward()

    results = {mode: measure(lambda m=mode: step(m), device, repeats=repeats) for mode in processors}
    base = results["none"]
    return {
        "case": "attention",
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "shape": asdict(shape),
        "chunk_size": chunk_size,
        "results": {
            mode: {
                "seconds": r.seconds,
                "peak_mib": r.peak_mib,
                "time_ratio": r.seconds / base.seconds,
                "memory_ratio": r.peak_bytes / max(base.peak_bytes, 1),
            }
            for mode, r in results.items()
        },
    }


def format_table(report: dict) -> str:
    s = report["shape"]
    lines = [
        f"attention: FLUX double-block attention, {s['heads']} heads x {s['head_dim']}, text {s['text']} + "
        f"target {s['target']} + refs {s['refs']}, batch {s['batch']}, {report['device']} {report['dtype']}, "
        f"share chunk {report['chunk_size']}",
        f"{'mode':<7}{'time ms':>10}{'peak MiB':>11}{'time x':>9}{'memory x':>10}",
    ]
    for mode, r in report["results"].items():
        lines.append(
            f"{mode:<7}{r['seconds'] * 1e3:>10.1f}{r['peak_mib']:>11.1f}{r['time_ratio']:>9.2f}{r['memory_ratio']:>10.2f}"
        )
    return "\n".join(lines)


register("attention", format_table, "IDAR vs no regularisation vs naive softmax in one FLUX double-block attention")(run)
