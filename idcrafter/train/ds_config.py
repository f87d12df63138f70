"""DeepSpeed configs: read a JSON from ds_configs/, fill its "auto" values from the command line."""

from __future__ import annotations

import copy
import json
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
    on_cpu: bool = False,
) -> dict[str, Any]:
    """The DeepSpeed config dict for a run: "auto" filled, optimizer and LR schedule added.

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
    if "scheduler" not in config and warmup_steps > 0:  # no warmup: constant learning rate
        config["scheduler"] = {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": lr, "warmup_num_steps": warmup_steps, "warmup_type": "linear"},
        }
    config.setdefault("zero_allow_untested_optimizer", True)
    return config


def zero_stage(config: dict[str, Any]) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))
