"""Video cases, ratios measured side by side in one run.

- `video-overhead`: IDCrafterTransformer with 1, 2, 3 subjects vs the stock Wan transformer (same
  weights, same video tokens): a denoising step (subject stream precomputed, as in sampling) and
  forward + backward (stream encoded inside, as in training), for each stage-3 form
  (`--stage3-projections`, default both: attn2's projections and stage 3's own) side by side.
- `video-step-cache`: pipeline denoising step with the subject stream computed once vs recomputed
  at every step.

CPU sizes by default; on CUDA (or with --full) Wan 2.1 1.3B at 480p x 81 frames, random weights.
The CPU sizes keep the proportions that decide the overhead at 480p x 81 frames: 21 latent frames
of one reference's token grid (21 video tokens per reference token: 32,760 vs 1,560), text tokens
at the same share of the video (512 / 32,760), and stage 3 in 2/3 of the blocks (K = 20 of 30).
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time

import torch

from idcrafter.benchmarks import register
from idcrafter.utils.profiling import Measurement, measure_side_by_side
from idcrafter.video.config import WAN_CONFIGS, IDCrafterConfig

CPU_WAN = dict(WAN_CONFIGS["tiny"], num_attention_heads=4, attention_head_dim=32, text_dim=64, ffn_dim=256, num_layers=6)
# (latent frames, latent height, latent width) of the video; reference latent size; text tokens.
CPU_LATENT, CPU_REF, CPU_TEXT = (21, 16, 16), (16, 16), 21  # 1,344 video, 64 reference, 21 text tokens
GPU_LATENT, GPU_REF, GPU_TEXT = (21, 60, 104), (60, 104), 512  # 81 frames at 480x832
QUICK_LATENT, QUICK_REF, QUICK_TEXT = (3, 8, 8), (8, 8), 8  # --quick: seconds, for tests (3:1, not 21:1)
CPU_BLOCKS, GPU_BLOCKS = 4, 20  # blocks with stage 3: 2/3 of the depth, as K = 20 of Wan 1.3B's 30
STEP_CACHE_LATENT = (3, 16, 16)  # video-step-cache on CPU: a short clip (caching saves the same either way)


def _setup(full: bool, device: torch.device, dtype: torch.dtype, stage3_projections: str = "attn2", base=None):
    """The benchmark model of one stage-3 form; on `base`'s Wan weights (shared) when given."""
    from idcrafter.video.transformer import IDCrafterTransformer

    wan = WAN_CONFIGS["wan-1.3b"] if full else CPU_WAN
    config = IDCrafterConfig(num_blocks=GPU_BLOCKS if full else CPU_BLOCKS, max_subjects=3, wan=dict(wan),
                             stage3_projections=stage3_projections, preset="benchmark")
    if base is None:
        # On the meta device (--device meta: FLOPs only) no weights are drawn or stored.
        with torch.device("meta") if device.type == "meta" else contextlib.nullcontext():
            model = IDCrafterTransformer.from_idcrafter_config(config, seed=0)
        model = model.to(device).eval()
    else:
        model = IDCrafterTransformer.from_wan(base.to_wan(), config).eval()
    if model.dtype != dtype:
        model.to(dtype)
    # Give the zero-initialised modules values, as after training (zeros could be skipped by kernels).
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.adapter.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p))
    return model, config


def count_flops(fn) -> int:
    """FLOPs of one call of `fn` as torch's `FlopCounterMode` counts the ops that run (matmuls,
    convolutions, attention kernels): a count of the executed graph, free of a shared machine's
    timing noise, and available on the meta device at full size. The CPU kernels of SDPA get
    torch's own SDPA formulas, which it registers for the CUDA kernels only."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: fc.sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad, q, k, v, *_, **__: fc.sdpa_backward_flop_count(grad, q, k, v),
    }
    with fc.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return int(counter.get_total_flops())


def cpu_times(fns: dict, repeats: int) -> dict[str, float]:
    """Median process CPU time of each variant over `repeats` interleaved calls (after one warm-up
    call each). On a shared CPU the time a variant waits for a core is not charged to it, which
    wall time does; run with OMP_NUM_THREADS=1 so that it is one core's work."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.process_time()
            fn()
            times[name].append(time.process_time() - start)
    return {name: statistics.median(t) for name, t in times.items()}


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


def run_overhead(device: str = "cpu", full: bool | None = None, repeats: int = 3, quick: bool = False,
                 stage3_projections: tuple[str, ...] = ("attn2", "own"), **_) -> dict:
    """IDCrafterTransformer with 1/2/3 subjects vs stock Wan: step and forward+backward, per stage-3 form.

    Rows `step/stock`, `step/<form>/<n>_subjects`, `train/stock`, `train/<form>/<n>_subjects`; every
    form runs on the same Wan weights, and a step's variants are timed interleaved
    (`measure_side_by_side`), so the load of a shared machine falls on all of them alike. Every row
    also has its FLOPs as counted by torch (`count_flops`), and on a CPU its process CPU time
    (`cpu_times`, robust to the load of a shared machine); on the meta device (`--device meta`,
    full size by default) only those: Wan 1.3B at 480p x 81 frames in seconds on a CPU.
    """
    device = torch.device(device)
    full = device.type in ("cuda", "meta") if full is None else full
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    forms = list(dict.fromkeys(stage3_projections))
    timed = device.type != "meta"  # the meta device has shapes only: FLOPs, no times
    models = {}
    for form in forms:
        models[form], config = _setup(full, device, dtype, form, base=next(iter(models.values()), None))
    latent, ref, text = (GPU_LATENT, GPU_REF, GPU_TEXT) if full else (QUICK_LATENT, QUICK_REF, QUICK_TEXT) if quick else (
        CPU_LATENT, CPU_REF, CPU_TEXT)
    x, t, txt = _video_inputs(latent, config.wan["text_dim"], device, dtype, text)
    for model in models.values():
        if full:
            model.enable_gradient_checkpointing()
        model.trainable_parameters("new-modules")  # the base stays frozen, as in training
    first = models[forms[0]]
    g = torch.Generator().manual_seed(2)
    refs = {n: torch.randn(1, n, 16, *ref, generator=g).to(device, dtype) for n in (1, 2, 3)}

    def fwd(model, stream=None):
        with torch.no_grad():
            model(x, t, txt, return_dict=False, subject_stream=stream)

    def fwd_bwd(model, subjects=None):
        model.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_()
        out = model(xi, t, txt, return_dict=False, subjects=subjects)[0]
        out.float().square().mean().backward()

    with torch.no_grad():
        streams = {(f, n): m.encode_subjects(refs[n]) for f, m in models.items() for n in (1, 2, 3)}
    steps = {"step/stock": lambda: fwd(first)}
    trains = {"train/stock": lambda: fwd_bwd(first)}
    for n in (1, 2, 3):
        for form, model in models.items():
            steps[f"step/{form}/{n}_subjects"] = lambda m=model, s=streams[form, n]: fwd(m, s)
            trains[f"train/{form}/{n}_subjects"] = lambda m=model, r=refs[n]: fwd_bwd(m, r)
    flops = {name: count_flops(fn) for name, fn in {**steps, **trains}.items()}
    if timed:
        results = {**measure_side_by_side(steps, device, repeats=repeats),
                   **measure_side_by_side(trains, device, repeats=repeats)}
    else:
        results = {name: Measurement(seconds=float("nan"), peak_bytes=0) for name in flops}
    cpu = {**cpu_times(steps, repeats), **cpu_times(trains, repeats)} if device.type == "cpu" else {}
    report = _report("video-overhead", device, dtype, full, {
        "latent": latent, "ref_latent": ref, "text_tokens": txt.shape[1], "num_blocks": first.num_blocks,
        "stage3_projections": forms, "tokens": _tokens(first, latent, ref),
        "wan": {k: config.wan[k] for k in ("num_layers", "num_attention_heads", "attention_head_dim")}},
        results, "step/stock")
    for key, r in report["results"].items():  # train rows against the stock train row
        stock = "train/stock" if key.startswith("train/") else "step/stock"
        if key.startswith("train/"):
            r["time_ratio"] = results[key].seconds / results["train/stock"].seconds
            r["memory_ratio"] = results[key].peak_bytes / max(results["train/stock"].peak_bytes, 1)
        r["flops"], r["flop_ratio"] = flops[key], flops[key] / flops[stock]
        if cpu:
            r["cpu_seconds"], r["cpu_time_ratio"] = cpu[key], cpu[key] / cpu[stock]
        if not timed:
            del r["seconds"], r["peak_mib"], r["time_ratio"], r["memory_ratio"]
    _add_analytic_ratios(report, first, txt.shape[1])
    return report


def _add_analytic_ratios(report: dict, model, text_tokens: int) -> None:
    """Each step row's analytic FLOP ratio to stock (idcrafter/video/flops.py, a cached stream) beside the
    counted one. Training rows keep the counted ratio only: their base is frozen, so the backward skips
    the base's weight gradients and fwd+bwd is not 3x the forward the analytic model assumes."""
    from idcrafter.video import flops as analytic

    shape = analytic.WanShape.from_config(model.config)
    tokens = report["tokens"]
    for key, row in report["results"].items():
        kind, *rest = key.split("/")
        if kind != "step":
            continue
        if rest == ["stock"]:
            row["analytic_ratio"] = 1.0
            continue
        form, subjects = rest[0], int(rest[1].split("_")[0])
        idc = analytic.IDCrafterShape.from_config(model.idcrafter_config, stage3_form=form)
        count = analytic.count_flops(shape, idc, tokens["video"], text_tokens, subjects, tokens["per_reference"])
        row["analytic_ratio"] = count.cached_ratio


def _tokens(model, latent, ref) -> dict:
    """Video tokens, tokens per reference and their ratio (21 at 480p x 81 frames)."""
    p = model.config.patch_size
    video = (latent[0] // p[0]) * (latent[1] // p[1]) * (latent[2] // p[2])
    per_ref = (ref[0] // p[1]) * (ref[1] // p[2])
    return {"video": video, "per_reference": per_ref, "ratio": video / per_ref}


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
    latent = GPU_LATENT if full else STEP_CACHE_LATENT
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
    lines = [head, f"{'row':<26}{'time ms':>10}{'peak MiB':>11}{'time x':>9}{'memory x':>10}{'FLOPs x':>9}"
                   f"{'analytic x':>11}"]
    for key, r in report["results"].items():
        secs = f"{r['seconds'] * 1e3:>10.1f}" if "seconds" in r else f"{'-':>10}"
        peak = f"{r['peak_mib']:>11.1f}" if "peak_mib" in r else f"{'-':>11}"
        ratio = f"{r['time_ratio']:>9.2f}" if "time_ratio" in r else f"{'-':>9}"
        mem = f"{r['memory_ratio']:>10.2f}" if "memory_ratio" in r else f"{'-':>10}"
        fl = f"{r['flop_ratio']:>9.3f}" if "flop_ratio" in r else f"{'-':>9}"
        an = f"{r['analytic_ratio']:>11.3f}" if "analytic_ratio" in r else f"{'-':>11}"
        lines.append(f"{key:<26}{secs}{peak}{ratio}{mem}{fl}{an}")
    if report.get("stage3_projections"):
        lines.append(_forms_table(report))
    return "\n".join(lines)


def _forms_table(report: dict) -> str:
    """The stage-3 forms side by side: time and counted-FLOP ratios vs stock per subject count."""
    rows, tokens = report["results"], report.get("tokens", {})
    ratio = f", {tokens['ratio']:.0f} video tokens per reference token" if tokens else ""
    lines = [f"vs stock by stage-3 form{ratio}",
             f"{'form':<15}" + "".join(f"{f'{kind} {n}':>9}" for kind in ("step", "train") for n in (1, 2, 3))]
    for form in report["stage3_projections"]:
        for column, label in (("time_ratio", "time"), ("cpu_time_ratio", "CPU time"), ("flop_ratio", "FLOPs")):
            cells = [rows[f"{kind}/{form}/{n}_subjects"].get(column) for kind in ("step", "train") for n in (1, 2, 3)]
            if all(c is not None for c in cells):
                lines.append(f"{f'{form} {label}':<15}" + "".join(f"{c:>8.3f}x" for c in cells))
    return "\n".join(lines)


register("video-overhead", format_table, "IDCrafterTransformer with 1/2/3 subjects vs stock Wan")(run_overhead)
register("video-step-cache", format_table, "pipeline step with the subject stream cached vs recomputed")(run_step_cache)
