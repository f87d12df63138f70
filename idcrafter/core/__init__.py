"""Shared attention-regularisation core used by the video (ID-Crafter) and image (mcimage) branches.

Depends on torch and diffusers only; never imports `idcrafter.video` or `mcimage`.
"""

from idcrafter.core.attention import attention, ref_attention_share
from idcrafter.core.layout import TokenLayout
from idcrafter.core.moe_lora import (
    MoELoRAConfig,
    MoELoRALinear,
    inject_moe_lora,
    load_moe_lora,
    record_routing,
    save_diffusers_lora,
    save_moe_lora,
)
from idcrafter.core.positions import (
    ccpa_descriptor_ids,
    condition_ids,
    parse_descriptor_markup,
    target_ids,
    text_ids,
    uno_diagonal_ids,
)
from idcrafter.core.regularization import (
    attention_mass_map,
    idar_loss,
    leakage,
    masks_to_token_assignment,
    region_loss,
)
from idcrafter.core.temperature import DynamicTemperature, apply_temperature

__all__ = [
    "DynamicTemperature",
    "MoELoRAConfig",
    "MoELoRALinear",
    "TokenLayout",
    "apply_temperature",
    "attention",
    "attention_mass_map",
    "ccpa_descriptor_ids",
    "condition_ids",
    "idar_loss",
    "inject_moe_lora",
    "leakage",
    "load_moe_lora",
    "masks_to_token_assignment",
    "parse_descriptor_markup",
    "record_routing",
    "ref_attention_share",
    "region_loss",
    "save_diffusers_lora",
    "save_moe_lora",
    "target_ids",
    "text_ids",
    "uno_diagonal_ids",
]
