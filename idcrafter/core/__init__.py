"""Shared attention-regularisation core used by the video (ID-Crafter) and image (mcimage) branches.

Depends on torch and diffusers only; never imports `idcrafter.video` or `mcimage`. Names are
imported on first use, so the torch-free parts (`categories`, `lora_config`) load without torch.
"""

from idcrafter.utils.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "attention": "idcrafter.core.attention",
    "ref_attention_share": "idcrafter.core.attention",
    "TokenLayout": "idcrafter.core.layout",
    "MoELoRAConfig": "idcrafter.core.lora_config",
    "MoELoRALinear": "idcrafter.core.moe_lora",
    "inject_moe_lora": "idcrafter.core.moe_lora",
    "load_moe_lora": "idcrafter.core.moe_lora",
    "record_routing": "idcrafter.core.moe_lora",
    "save_diffusers_lora": "idcrafter.core.moe_lora",
    "save_moe_lora": "idcrafter.core.moe_lora",
    "ccpa_descriptor_ids": "idcrafter.core.positions",
    "condition_ids": "idcrafter.core.positions",
    "parse_descriptor_markup": "idcrafter.core.categories",
    "target_ids": "idcrafter.core.positions",
    "text_ids": "idcrafter.core.positions",
    "uno_diagonal_ids": "idcrafter.core.positions",
    "attention_mass_map": "idcrafter.core.regularization",
    "idar_loss": "idcrafter.core.regularization",
    "leakage": "idcrafter.core.regularization",
    "masks_to_token_assignment": "idcrafter.core.regularization",
    "region_loss": "idcrafter.core.regularization",
    "DynamicTemperature": "idcrafter.core.temperature",
    "apply_temperature": "idcrafter.core.temperature",
})
