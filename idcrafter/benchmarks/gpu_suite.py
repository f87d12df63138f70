"""`gpu-suite`: what a lent GPU runs, in one command, in a few minutes.

Full-size Wan 2.1 1.3B with random weights (built on the GPU itself: no download, no CPU init),
bf16, at 480x832 x 81 frames (32,760 video tokens, 1,560 per reference):
- a cached denoising step (one guidance pass reading a precomputed subject stream) with 0-3 subjects;
- a training step (forward + backward, every weight trainable, gradient checkpointing) with 0-3
  subjects, the stream encoded inside as in training;
each for every stage-3 form the model has. Rows report s/step, peak memory above the weights,
time ratio to stock, the analytic FLOP ratio (idcrafter/video/flops.py), achieved TFLOP/s and
MFU against --peak-tflops (known GPUs: their bf16 dense peak). Output: JSON.

On a machine without CUDA it refuses in one line; --quick runs the same suite on a tiny model on
the CPU (for tests).
"""

from __future__ import annotations

import dataclasses
import json
import time

import torch

from idcrafter.benchmarks import register
from idcrafter.utils.profiling import measure
from idcrafter.video.config import WAN_CONFIGS, IDCrafterConfig

FULL_LATENT, FULL_REF, FULL_TEXT = (21, 60, 104), (60, 104), 512  # 81 frames at 480x832
TINY_LATENT, TINY_REF, TINY_TEXT = (3, 8, 8), (8, 8), 16
# bf16 dense peak TFLOP/s by device name (NVIDIA data sheets, SXM parts).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}


def peak_tflops_of(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def stage3_forms() -> list[str | None]:
    """The stage-3 forms this model offers (None: the model has only its own projections)."""
    field = IDCrafterConfig.__dataclass_fields__.get("stage3_projections")
    return [None] if field is None else ["own", "attn2"]


def build(config: IDCrafterConfig, device: torch.device, dtype: torch.dtype):
    """Random weights initialised on `device`; the zero-initialised modules get small values, as
    after training (kernels could skip exact zeros)."""
    from idcrafter.video.transformer import IDCrafterTransformer

    with torch.device(device):
        model = IDCrafterTransformer.from_idcrafter_config(config, seed=0)
    # As diffusers' loading with torch_dtype: the modules Wan keeps in fp32 (norms, time embedding) stay fp32.
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        fp32 = tensor.is_floating_point() and any(k in name.split(".") for k in keep)
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(device=device, dtype=torch.float32 if fp32 else dtype)
    g = torch.Generator(device=device).manual_seed(1)
    with torch.no_grad():
        for p in model.adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32).mul_(0.02).to(p.dtype))
    return model


def run_suite(device: str = "cpu", full: bool | None = None, repeats: int = 3, quick: bool = False,
              peak_tflops: float | None = None, **_) -> dict:
    device = torch.device(device)
    if device.type != "cuda" and not quick:
        raise ValueError("gpu-suite needs a CUDA GPU (full-size Wan 1.3B at 480p x 81 frames); "
                         "--quick runs its tiny CPU variant")
    from idcrafter.video import flops

    started = time.perf_counter()
    tiny = quick
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    latent, ref, text_len = (TINY_LATENT, TINY_REF, TINY_TEXT) if tiny else (FULL_LATENT, FULL_REF, FULL_TEXT)
    wan = dict(WAN_CONFIGS["tiny" if tiny else "wan-1.3b"])
    peak = peak_tflops or peak_tflops_of(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, *latent, generator=g).to(device, dtype)
    text = torch.randn(1, text_len, wan["text_dim"], generator=g).to(device, dtype)
    t = torch.tensor([500.0], device=device)
    refs = {n: torch.randn(1, n, 16, 1, *ref, generator=g).to(device, dtype) for n in (1, 2, 3)}
    report = {"case": "gpu-suite", "device": str(device), "device_name": torch.cuda.get_device_name(device)
              if device.type == "cuda" else "cpu", "dtype": str(dtype).replace("torch.", ""), "full": not tiny,
              "latent": latent, "ref_latent": ref, "text_tokens": text_len, "peak_tflops": peak, "forms": {}}
    for form in stage3_forms():
        extra = {} if form is None else {"stage3_projections": form}
        config = IDCrafterConfig(num_blocks=20, max_subjects=3, wan=dict(wan), preset="gpu-suite", **extra)
        model = build(config, device, dtype)
        model.enable_gradient_checkpointing()
        model.trainable_parameters("full")
        rows = _measure_rows(model, x, t, text, refs, device, repeats)
        shape = flops.WanShape.from_config(model.config)
        idc = flops.IDCrafterShape.from_config(dataclasses.replace(config, wan=wan), form)
        tokens = latent[0] * latent[1] * latent[2] // 4
        ref_tokens = ref[0] * ref[1] // 4
        for key, row in rows.items():
            kind, n = key.split("/")
            count = flops.count_flops(shape, idc, tokens, text_len, int(n), ref_tokens)
            work = count.cached_forward if kind == "step" else flops.training_step_flops(count.full_forward, True)
            row["analytic_ratio"] = count.cached_ratio if kind == "step" else count.full_ratio
            row["time_ratio"] = row["seconds"] / rows[f"{kind}/0"]["seconds"]
            row["tflops"] = work / row["seconds"] / 1e12
            if peak:
                row["mfu"] = row["tflops"] / peak
        report["forms"][form or "own"] = rows
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["seconds_total"] = time.perf_counter() - started
    return report


def _measure_rows(model, x, t, text, refs, device, repeats) -> dict[str, dict]:
    """step/N: a cached denoising pass with N subjects (0 = stock); train/N: forward + backward."""
    rows = {}
    with torch.no_grad():
        streams = {n: model.encode_subjects(r) for n, r in refs.items()}

    def step(n):
        with torch.no_grad():
            model(x, t, text, return_dict=False, subject_stream=streams.get(n))

    def train(n):
        model.zero_grad(set_to_none=True)
        out = model(x, t, text, return_dict=False, subjects=refs.get(n))[0]
        out.float().square().mean().backward()

    model.eval()  # no dropout in Wan; eval keeps the stock forward exact
    for n in (0, 1, 2, 3):
        m = measure(lambda n=n: step(n), device, repeats=repeats)
        rows[f"step/{n}"] = {"seconds": m.seconds, "peak_gib": m.peak_bytes / 2**30}
    model.train()
    for n in (0, 1, 2, 3):
        m = measure(lambda n=n: train(n), device, repeats=repeats)
        rows[f"train/{n}"] = {"seconds": m.seconds, "peak_gib": m.peak_bytes / 2**30}
    model.zero_grad(set_to_none=True)
    return rows


def format_json(report: dict) -> str:
    return json.dumps(report, indent=1)


register("gpu-suite", format_json, "full-size Wan 1.3B on one GPU: cached step and training step vs stock, "
         "ratios, s/step, peak memory, MFU (JSON; --quick: tiny on CPU)")(run_suite)
