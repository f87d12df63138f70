"""Video cases, ratios measured side by side in one run.

- `video-overhead`: IDCrafterTransformer with 1, 2, 3 subjects vs the stock Wan transformer (same
  weights, same video tokens): a denoising step (subject stream precomputed, as in sampling) and
  forward + backward (stream encoded inside, as in training).
- `video-step-cache`: pipeline denoising step with the subject stream computed once vs recomputed
  at every step.

CPU sizes by default; on CUDA (or with --full) Wan 2.1 1.3B at 480p x 81 frames, random weights.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from idcrafter.benchmarks import register
from idcrafter.utils.profiling import measure
from idcrafter.video.config import WAN_CONFIGS, IDCrafterConfig

CPU_WAN = dict(WAN_CONFIGS["tiny"], num_attention_heads=4, attention_head_dim=32, text_dim=64, ffn_dim=256, num_layers=4)
# (latent frames, latent height, latent width) of the video; reference latent size.
CPU_LATENT, CPU_REF = (3, 16, 16), (16, 16)
GPU_LATENT, GPU_REF = (21, 60, 104), (60, 104)  # 81 frames at 480x832


def _setup(full: bool, device: torch.device, dtype: torch.dtype):
    from idcrafter.video.transformer import IDCrafterTransformer

    wan = WAN_CONFIGS["wan-1.3b"] if full else CPU_WAN
    config = IDCrafterConfig(num_blocks=20, max_subjects=3, wan=dict(wan), preset="benchmark")
    model = IDCrafterTransformer.from_idcrafter_config(config, seed=0).to(device).eval()
    if model.dtype != dtype:
        model.to(dtype)
    # Give the zero-initialised modules values, as after training (zeros could be skipped by kernels).
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.adapter.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p))
    return model, config


def _video_inputs(latent, text_dim, device, dtype, text_len=512):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, *latent, generator=g).to(device, dtype)
    txt = torch.randn(1, text_len, text_dim, generator=g).to(device, dtype)
    return x, torch.tensor([500.0], device=device), txt


def _report(case, device, dtype, full, extra, results, base_key):
    base = results[base_key]
    return {
        "case": case,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "full": full,
        **extra,
        "results": {
            k: {"seconds": r.seconds, "peak_mib": r.peak_mib, "time_ratio": r.seconds / base.seconds,
                "memory_ratio": r.peak_bytes / max(base.peak_bytes, 1)}
            for k, r in results.items()
        },
    }


def run_overhead(device: str = "cpu", full: bool | None = None, repeats: int = 3, **_) -> dict:
    """IDCrafterTransformer with 1/2/3 subjects vs stock Wan: step and forward+backward."""
    device = torch.device(device)
    full = device.type == "cuda" if full is None else full
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, config = _setup(full, device, dtype)
    latent, ref = (GPU_LATENT, GPU_REF) if full else (CPU_LATENT, CPU_REF)
    x, t, txt = _video_inputs(latent, config.wan["text_dim"], device, dtype, 512 if full else 32)
    if full:
        model.enable_gradient_checkpointing()
    model.trainable_parameters("new-modules")  # the base stays frozen, as in training
    results = {}

    def fwd(n):
        with torch.no_grad():
            if n == 0:
                model(x, t, txt, return_dict=False)
            else:
                model(x, t, txt, return_dict=False, subject_stream=streams[n])

    def fwd_bwd(n):
        model.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_()
        subjects = None if n == 0 else torch.randn(1, n, 16, *ref, device=device, dtype=dtype)
        out = model(xi, t, txt, return_dict=False, subjects=subjects)[0]
        out.float().square().mean().backward()

    with torch.no_grad():
        streams = {n: model.encode_subjects(torch.randn(1, n, 16, *ref, device=device, dtype=dtype)) for n in (1, 2, 3)}
    for n in (0, 1, 2, 3):
        name = "stock" if n == 0 else f"{n}_subjects"
        results[f"step/{name}"] = measure(lambda n=n: fwd(n), device, repeats=repeats)
    for n in (0, 1, 2, 3):
        name = "stock" if n == 0 else f"{n}_subjects"
        results[f"train/{name}"] = measure(lambda n=n: fwd_bwd(n), device, repeats=repeats)
    report = _report("video-overhead", device, dtype, full, {"latent": latent, "ref_latent": ref,
                     "num_blocks": model.num_blocks, "wan": {k: config.wan[k] for k in ("num_layers", "num_attention_heads", "attention_head_dim")}},
                     results, "step/stock")
    for key, r in report["results"].items():  # train rows against the stock train row
        if key.startswith("train/"):
            r["time_ratio"] = results[key].seconds / results["train/stock"].seconds
            r["memory_ratio"] = results[key].peak_bytes / max(results["train/stock"].peak_bytes, 1)
    _add_analytic_ratios(report, model, latent, ref, txt.shape[1])
    return report


def _add_analytic_ratios(report: dict, model, latent, ref, text_tokens: int) -> None:
    """Each row's FLOP ratio to stock (idcrafter/video/flops.py) next to its measured time ratio:
    steps read a cached stream, training rows encode it (the same ratio for fwd+bwd, 3x both)."""
    from idcrafter.video import flops

    shape = flops.WanShape.from_config(model.config)
    idc = flops.IDCrafterShape.from_config(model.idcrafter_config)
    tokens = latent[0] * latent[1] * latent[2] // (shape.patch[1] * shape.patch[2])
    ref_tokens = ref[0] * ref[1] // idc.subject_patch**2
    report["video_to_reference_tokens"] = tokens / ref_tokens
    for key, row in report["results"].items():
        kind, name = key.split("/")
        n = 0 if name == "stock" else int(name.split("_")[0])
        count = flops.count_flops(shape, idc, tokens, text_tokens, n, ref_tokens)
        row["analytic_ratio"] = count.cached_ratio if kind == "step" else count.full_ratio


def run_step_cache(device: str = "cpu", full: bool | None = None, repeats: int = 3, **_) -> dict:
    """Denoising step time with the subject stream cached vs recomputed every step."""
    from PIL import Image

    from idcrafter.video.pipeline import IDCrafterPipeline
    from idcrafter.video.presets import TINY_VAE, char_tokenizer, tiny_text_encoder

    device = torch.device(device)
    full = device.type == "cuda" if full is None else full
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, config = _setup(full, device, dtype)
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    tokenizer = char_tokenizer(64)
    components = dict(
        tokenizer=tokenizer, text_encoder=tiny_text_encoder(len(tokenizer), config.wan["text_dim"]).to(device),
        vae=AutoencoderKLWan(**TINY_VAE).to(device).eval(), transformer=model,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    model.idcrafter_config = dataclasses.replace(model.idcrafter_config, text_length=64)
    pipe = IDCrafterPipeline.from_components(components)
    pipe.set_progress_bar_config(disable=True)
    latent = GPU_LATENT if full else CPU_LATENT
    height, width, frames = latent[1] * 8, latent[2] * 8, (latent[0] - 1) * 4 + 1
    refs = [Image.new("RGB", (width, height), c) for c in ("red", "green", "blue")]
    steps = 4
    rows = {}
    for mode, recompute in (("cached", False), ("recomputed", True)):
        per_step = []
        for _ in range(repeats):
            stamps: list[float] = []

            def stamp(_pipe, _step, _t, tensors, stamps=stamps):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                stamps.append(time.perf_counter())
                return tensors

            # Step times are differences between callbacks: encoding and decoding are left out.
            pipe("bench", refs, height=height, width=width, num_frames=frames, num_inference_steps=steps + 1,
                 recompute_subjects_each_step=recompute, output_type="latent", generator=torch.Generator().manual_seed(0),
                 callback_on_step_end=stamp)
            per_step += [b - a for a, b in zip(stamps, stamps[1:])]
        rows[mode] = statistics.median(per_step)
    return {
        "case": "video-step-cache", "device": str(device), "dtype": str(dtype).replace("torch.", ""), "full": full,
        "latent": latent, "subjects": 3,
        "results": {m: {"seconds": s, "time_ratio": s / rows["cached"]} for m, s in rows.items()},
    }


def format_table(report: dict) -> str:
    head = f"{report['case']} on {report['device']} {report['dtype']} ({'full size' if report['full'] else 'CPU size'})"
    lines = [head, f"{'row':<22}{'time ms':>10}{'peak MiB':>11}{'time x':>9}{'memory x':>10}{'FLOP x':>9}"]
    for key, r in report["results"].items():
        peak = f"{r['peak_mib']:>11.1f}" if "peak_mib" in r else f"{'-':>11}"
        mem = f"{r['memory_ratio']:>10.2f}" if "memory_ratio" in r else f"{'-':>10}"
        flop = f"{r['analytic_ratio']:>9.3f}" if "analytic_ratio" in r else f"{'-':>9}"
        lines.append(f"{key:<22}{r['seconds'] * 1e3:>10.1f}{peak}{r['time_ratio']:>9.2f}{mem}{flop}")
    return "\n".join(lines)


register("video-overhead", format_table, "IDCrafterTransformer with 1/2/3 subjects vs stock Wan")(run_overhead)
register("video-step-cache", format_table, "pipeline step with the subject stream cached vs recomputed")(run_step_cache)
