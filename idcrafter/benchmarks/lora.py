"""`lora` case: our plain LoRA (MoE-LoRA with E = 1) against peft's, on one stock Wan transformer.

Plain LoRA stays on our layer (`idcrafter.core.moe_lora`: one code path for LoRA and MoE-LoRA,
docs/design.md 3.6); this case is the measurement behind that choice. Three rows, side by side in one
run, all on the weights of the same `WanTransformer3DModel` (base frozen, forward + backward):
- `none`: no LoRA;
- `ours`: `IDCrafterTransformer.add_lora(rank)` on `WAN_LORA_TARGETS`, trainable set "lora"
  (what `train_video.py --trainable lora` builds);
- `peft`: diffusers' `add_adapter(LoraConfig(r=rank, target_modules=...))` on the same layers.
The LoRA weights of `ours` are copied into `peft`; the report holds the largest output and LoRA-
gradient differences (float32, a small latent) and the trainable parameter counts, which must agree.
"""

from __future__ import annotations

import copy

import torch

from idcrafter.benchmarks import register
from idcrafter.core.moe_lora import moe_lora_layers
from idcrafter.utils.profiling import measure_side_by_side
from idcrafter.video.config import WAN_CONFIGS, IDCrafterConfig

# A mid-size Wan: width 512 (8 heads x 64), 4 blocks; a 3 x 16 x 16 latent (192 video tokens).
CPU_WAN = dict(WAN_CONFIGS["tiny"], num_attention_heads=8, attention_head_dim=64, text_dim=512, freq_dim=256,
               ffn_dim=2048, num_layers=4)
CPU_LATENT, CPU_TEXT, CPU_RANK = (3, 16, 16), 64, 64
QUICK_WAN = dict(WAN_CONFIGS["tiny"], num_layers=2)
QUICK_LATENT, QUICK_TEXT, QUICK_RANK = (2, 8, 8), 16, 4
GPU_LATENT, GPU_TEXT, GPU_RANK = (21, 60, 104), 512, 64  # Wan 2.1 1.3B, 81 frames at 480x832
CHECK_LATENT = (2, 8, 8)  # the float32 equality check of the full-size model
# Largest output difference of `ours` and `peft` on the same LoRA weights (float32).
MAX_OUTPUT_DIFF = 1e-5


def peft_target_pattern(targets: tuple[str, ...]) -> str:
    """One regex for peft: a string `target_modules` is `re.fullmatch`ed against each module name, as
    our `module_matches` does with each pattern (a list would be matched as name suffixes)."""
    return "(?:" + "|".join(targets) + ")"


def _peft_pairs(ours: torch.nn.Module, peft_model: torch.nn.Module) -> dict[str, tuple]:
    """{layer name: (our MoELoRALinear, peft's LoRA Linear)} for every adapted layer of both models."""
    peft_layers = {name: m for name, m in peft_model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    ours_layers = moe_lora_layers(ours)
    if set(peft_layers) != set(ours_layers):
        raise RuntimeError(f"peft adapted {len(peft_layers)} layers, ours {len(ours_layers)}: the target sets differ")
    return {name: (ours_layers[name], peft_layers[name]) for name in ours_layers}


def copy_lora_into_peft(ours: torch.nn.Module, peft_model: torch.nn.Module, adapter: str = "default") -> int:
    """Copy every layer's A [1, r, in] and B [1, out, r] into peft's lora_A [r, in] / lora_B [out, r];
    both scale by alpha / r. Returns the number of layers."""
    pairs = _peft_pairs(ours, peft_model)
    with torch.no_grad():
        for layer, peft_layer in pairs.values():
            if layer.num_experts != 1 or peft_layer.scaling[adapter] != layer.scaling:
                raise RuntimeError("copy_lora_into_peft: plain LoRA with the same alpha / r only")
            peft_layer.lora_A[adapter].weight.copy_(layer.lora_A[0])
            peft_layer.lora_B[adapter].weight.copy_(layer.lora_B[0])
    return len(pairs)


def _models(wan_config: dict, rank: int, seed: int = 0):
    """(stock, ours, peft) on the same random base weights; LoRA B drawn non-zero (as after training)
    in ours and copied into peft."""
    from diffusers import WanTransformer3DModel
    from peft import LoraConfig

    from idcrafter.video.transformer import WAN_LORA_TARGETS, IDCrafterTransformer

    torch.manual_seed(seed)
    stock = WanTransformer3DModel(**wan_config).eval()
    stock.requires_grad_(False)
    # The smallest adapter: its modules do not run without subjects, and LoRA is what is compared.
    config = IDCrafterConfig(num_blocks=1, wan=dict(wan_config), preset="benchmark")
    ours = IDCrafterTransformer.from_wan(copy.deepcopy(stock), config).eval()
    ours.add_lora(rank=rank)
    ours.trainable_parameters("lora")
    peft_model = copy.deepcopy(stock)
    peft_model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=peft_target_pattern(WAN_LORA_TARGETS)))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in moe_lora_layers(ours).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.02)
    copy_lora_into_peft(ours, peft_model)
    return stock, ours, peft_model


def _inputs(wan_config: dict, latent, text_len: int, device, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, wan_config["in_channels"], *latent, generator=g).to(device, dtype)
    txt = torch.randn(1, text_len, wan_config["text_dim"], generator=g).to(device, dtype)
    return x, torch.tensor([500.0], device=device), txt


def _forward_backward(model, x, t, txt) -> torch.Tensor:
    """One training step's compute: forward, a loss, backward (the base frozen). Returns the output."""
    model.zero_grad(set_to_none=True)
    xi = x.detach().requires_grad_()  # a gradient path also for the row without trainable weights
    out = model(xi, t, txt, return_dict=False)[0]
    out.float().square().mean().backward()
    return out.detach()


def compare_ours_and_peft(stock, ours, peft_model, x, t, txt) -> dict:
    """Largest |difference| of the outputs and of each layer's LoRA gradients (peft's layout), and
    how far the LoRA moves the output from the stock model's (so that the equality means something)."""
    out_stock = _forward_backward(stock, x, t, txt)
    out_ours = _forward_backward(ours, x, t, txt)
    out_peft = _forward_backward(peft_model, x, t, txt)
    grad = 0.0
    for layer, peft_layer in _peft_pairs(ours, peft_model).values():
        for mine, theirs in ((layer.lora_A, peft_layer.lora_A["default"].weight),
                             (layer.lora_B, peft_layer.lora_B["default"].weight)):
            grad = max(grad, (mine.grad[0] - theirs.grad).abs().max().item())
    return {"max_abs_diff": (out_ours - out_peft).abs().max().item(), "grad_max_abs_diff": grad,
            "lora_effect": (out_ours - out_stock).abs().max().item()}


def trainable_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_lora(device: str = "cpu", full: bool | None = None, repeats: int = 3, quick: bool = False, **_) -> dict:
    """Our plain LoRA vs peft's (diffusers add_adapter) on one Wan: time, memory, equality."""
    device = torch.device(device)
    full = device.type == "cuda" if full is None else full
    if full:
        wan, latent, text_len, rank = WAN_CONFIGS["wan-1.3b"], GPU_LATENT, GPU_TEXT, GPU_RANK
    elif quick:
        wan, latent, text_len, rank = QUICK_WAN, QUICK_LATENT, QUICK_TEXT, QUICK_RANK
    else:
        wan, latent, text_len, rank = CPU_WAN, CPU_LATENT, CPU_TEXT, CPU_RANK
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models = dict(zip(("none", "ours", "peft"), _models(dict(wan), rank)))
    counts = {name: trainable_count(m) for name, m in models.items()}
    if counts["ours"] != counts["peft"]:
        raise RuntimeError(f"trainable parameters differ: ours {counts['ours']}, peft {counts['peft']}")
    for m in models.values():
        m.to(device)
    # Equality in float32 on a small latent, before the timed rows run in `dtype`.
    check = compare_ours_and_peft(models["none"], models["ours"], models["peft"],
                                  *_inputs(wan, CHECK_LATENT if full else latent, text_len, device, torch.float32))
    if check["max_abs_diff"] > MAX_OUTPUT_DIFF:
        raise RuntimeError(f"ours and peft differ by {check['max_abs_diff']:.2e} on the same LoRA weights")
    if dtype != torch.float32:
        for m in models.values():
            m.to(dtype)  # our LoRA parameters stay float32 in training; here all rows run in one dtype
    if full:
        for m in models.values():
            m.enable_gradient_checkpointing()
    x, t, txt = _inputs(wan, latent, text_len, device, dtype)
    results = measure_side_by_side({name: (lambda m=m: _forward_backward(m, x, t, txt)) for name, m in models.items()},
                                   device, repeats=repeats)
    base = results["none"]
    return {
        "case": "lora", "device": str(device), "dtype": str(dtype).replace("torch.", ""), "full": full,
        "latent": latent, "rank": rank, "layers": len(moe_lora_layers(models["ours"])),
        "wan": {k: wan[k] for k in ("num_layers", "num_attention_heads", "attention_head_dim", "ffn_dim")},
        **check,
        "results": {
            name: {"seconds": r.seconds, "peak_mib": r.peak_mib, "time_ratio": r.seconds / base.seconds,
                   "memory_ratio": r.peak_bytes / max(base.peak_bytes, 1), "trainable": counts[name]}
            for name, r in results.items()
        },
    }


def format_table(report: dict) -> str:
    size = "full size" if report["full"] else "CPU size"
    lines = [
        f"lora on {report['device']} {report['dtype']} ({size}): rank {report['rank']} on {report['layers']} layers, "
        f"latent {tuple(report['latent'])}",
        f"ours vs peft on the same weights: output |diff| {report['max_abs_diff']:.1e}, "
        f"LoRA gradient |diff| {report['grad_max_abs_diff']:.1e} (LoRA vs none: output |diff| {report['lora_effect']:.1e})",
        f"{'row':<8}{'time ms':>10}{'peak MiB':>11}{'time x':>9}{'memory x':>10}{'trainable':>12}",
    ]
    for name, r in report["results"].items():
        lines.append(f"{name:<8}{r['seconds'] * 1e3:>10.1f}{r['peak_mib']:>11.1f}{r['time_ratio']:>9.2f}"
                     f"{r['memory_ratio']:>10.2f}{r['trainable']:>12,}")
    ours, peft = report["results"]["ours"], report["results"]["peft"]
    lines.append(f"ours / peft: time {ours['seconds'] / peft['seconds']:.2f}x, "
                 f"memory {ours['peak_mib'] / max(peft['peak_mib'], 1e-9):.2f}x")
    return "\n".join(lines)


register("lora", format_table, "our plain LoRA (MoE-LoRA, E = 1) vs peft's on one Wan: time, memory, equality")(run_lora)
