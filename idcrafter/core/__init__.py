"""Shared attention-regularisation core used by the video (ID-Crafter) and image (mcimage) branches.

Depends on torch and diffusers only; never imports `idcrafter.video` or `mcimage`. Names are
imported on first use, so the torch-free parts (`categories`, `lora_config`) load without torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "attention": "attention",
    "ref_attention_share": "attention",
    "TokenLayout": "layout",
    "MoELoRAConfig": "lora_config",
    "MoELoRALinear": "moe_lora",
    "inject_moe_lora": "moe_lora",
    "load_moe_lora": "moe_lora",
    "record_routing": "moe_lora",
    "save_diffusers_lora": "moe_lora",
    "save_moe_lora": "moe_lora",
    "ccpa_descriptor_ids": "positions",
    "condition_ids": "positions",
    "parse_descriptor_markup": "categories",
    "target_ids": "positions",
    "text_ids": "positions",
    "uno_diagonal_ids": "positions",
    "attention_mass_map": "regularization",
    "idar_loss": "regularization",
    "leakage": "regularization",
    "masks_to_token_assignment": "regularization",
    "region_loss": "regularization",
    "DynamicTemperature": "temperature",
    "apply_temperature": "temperature",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"idcrafter.core.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'idcrafter.core' has no attribute {name!r}")
