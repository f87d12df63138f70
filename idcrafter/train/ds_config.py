"""DeepSpeed configs: read a JSON from ds_configs/, fill its "auto" values from the command line."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any


def fill_auto(config: dict[str, Any], values: dict[str, Any], path: str = "") -> dict[str, Any]:
    """Replace every "auto" leaf by `values[dotted.path]`; an "auto" with no value is an error."""
    out = {}
    for key, value in config.items():
        dotted = f"{path}.{key}" if path else key
        if isinstance(value, dict):
            out[key] = fill_auto(value, values, dotted)
        elif value == "auto":
            if dotted not in values:
                raise ValueError(f"DeepSpeed config: no value for 'auto' at {dotted}")
            out[key] = values[dotted]
        else:
            out[key] = value
    return out


LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_scheduler(schedule: str, *, lr: float, warmup_steps: int, total_steps: int,
                 min_lr_ratio: float = 0.0) -> dict[str, Any] | None:
    """The "scheduler" section of the DeepSpeed config (deepspeed.runtime.lr_schedules), or None
    for a constant learning rate without warm-up.

    constant: WarmupLR, a linear warm-up from 0 to `lr` over `warmup_steps`, then `lr`.
    linear: WarmupDecayLR, a linear warm-up from `min_lr_ratio * lr` to `lr`, then a linear decay
        back to `min_lr_ratio * lr` at `total_steps`.
    cosine: WarmupCosineLR, the same warm-up, then a half cosine down to `min_lr_ratio * lr` at
        `total_steps`.
    DeepSpeed's warm-ups last at least 2 steps (it raises the count to 2), so linear and cosine
    always start at the low end; `lr_at` gives the values these schedulers produce.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; use {', '.join(LR_SCHEDULES)}")
    if schedule == "constant":
        if warmup_steps <= 0:
            return None
        return {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": lr,
                                               "warmup_num_steps": warmup_steps, "warmup_type": "linear"}}
    warmup = max(warmup_steps, 1)  # DeepSpeed refuses 0 (and raises 1 to 2)
    if schedule == "linear":
        return {"type": "WarmupDecayLR", "params": {
            "total_num_steps": total_steps, "warmup_min_lr": min_lr_ratio * lr, "warmup_max_lr": lr,
            "warmup_num_steps": warmup, "warmup_type": "linear"}}
    # WarmupCosineLR scales the optimizer's lr (the AdamW params' "lr") by ratios
    return {"type": "WarmupCosineLR", "params": {
        "total_num_steps": total_steps, "warmup_min_ratio": min_lr_ratio, "cos_min_ratio": min_lr_ratio,
        "warmup_num_steps": warmup, "warmup_type": "linear"}}


def lr_at(schedule: str, iteration: int, *, lr: float, warmup_steps: int, total_steps: int,
          min_lr_ratio: float = 0.0) -> float:
    """The learning rate the scheduler of `lr_scheduler(...)` sets after `iteration + 1` calls of
    its step(), i.e. the lr the trainer logs after optimizer step `iteration + 1` (DeepSpeed steps
    the scheduler after each optimizer step)."""
    if schedule == "constant":
        if warmup_steps <= 0:
            return lr
        warmup = max(2, warmup_steps)
        return lr * iteration / warmup if iteration < warmup else lr
    warmup = max(2, warmup_steps)
    low = min_lr_ratio * lr
    if iteration < warmup:
        return low + (lr - low) * iteration / warmup
    if schedule == "linear":
        return low + (lr - low) * max(0.0, (total_steps - iteration) / max(1.0, total_steps - warmup))
    progress = min(1.0, (iteration - warmup + 1) / max(1, total_steps - warmup))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * (1 + math.cos(math.pi * progress)) / 2)


def prepare_ds_config(
    path: str | Path,
    *,
    micro_batch: int,
    grad_accum: int,
    grad_clip: float,
    bf16: bool,
    hidden_size: int,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    warmup_steps: int = 0,
    total_steps: int = 1,
    schedule: str = "constant",
    min_lr_ratio: float = 0.0,
    on_cpu: bool = False,
) -> dict[str, Any]:
    """The DeepSpeed config dict for a run: "auto" filled, optimizer and LR schedule
    (`lr_scheduler`, `total_num_steps` = `total_steps`) added unless the file has them.

    The bucket sizes follow the usual rule of thumb for transformers of width `hidden_size`
    (reduce: h^2, prefetch: 0.9 h^2, persistence threshold: 10 h). AdamW runs as torch's AdamW on
    CPU (no CUDA kernels there), DeepSpeed's CPU Adam when the optimizer is offloaded, and the fused
    kernel otherwise.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"DeepSpeed config {path}: {err}") from None
    values = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "bf16.enabled": bf16,
        "fp16.enabled": False,
        "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
    }
    config = fill_auto(copy.deepcopy(raw), values)
    config.pop("train_batch_size", None)  # derived from micro batch x accumulation x world size
    zero = config.get("zero_optimization", {})
    offload = zero.get("offload_optimizer", {}).get("device") == "cpu"
    if "optimizer" not in config:
        params = {"lr": lr, "betas": list(betas), "eps": eps, "weight_decay": weight_decay}
        if on_cpu and not offload:
            params["torch_adam"] = True
        config["optimizer"] = {"type": "AdamW", "params": params}
    if "scheduler" not in config:  # a scheduler written in the JSON file wins
        scheduler = lr_scheduler(schedule, lr=lr, warmup_steps=warmup_steps, total_steps=total_steps,
                                 min_lr_ratio=min_lr_ratio)
        if scheduler is not None:
            config["scheduler"] = scheduler
    config.setdefault("zero_allow_untested_optimizer", True)
    return config


def sequence_parallel_reduction(config: dict[str, Any], sp_size: int) -> tuple[dict[str, Any], int]:
    """The DeepSpeed config for `sp_size` ranks per sample, and the factor the loss is multiplied by
    before `engine.backward`, so that the optimizer sees the sample's gradient.

    Under sequence parallelism a rank's gradient is its token shard's share: summed over a sequence
    group it is the gradient of the sample (idcrafter.core.sequence_parallel). DeepSpeed 0.19 with
    its sequence-parallel mpu reduces two ways: ZeRO 0-2, and ZeRO-3 for a bucket of contiguous
    gradients, divide the all-reduced sum by world / sp_size (a sum over the sequence group, a mean
    over the data-parallel groups: factor 1); ZeRO-3's reduce-scatter (taken for buckets larger than
    reduce_bucket_size, and for every bucket without contiguous_gradients) divides by the world
    size (a mean over all ranks: the shares need the factor sp_size). For ZeRO-3, contiguous
    gradients are switched off so that every bucket takes the reduce-scatter: one rule for all.
    """
    if sp_size == 1 or zero_stage(config) != 3:
        return config, 1
    config = copy.deepcopy(config)
    config["zero_optimization"]["contiguous_gradients"] = False
    return config, sp_size


def zero_stage(config: dict[str, Any]) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))
