"""Image-branch configuration: one dataclass with named presets.

    multicrafter        FLUX.1-dev; UNO diagonal ids; IDAR on the double blocks (lambda 0.3);
                        MoE-LoRA (E = 4) on attention and feed-forward projections; DAM off.
    one-for-all         FLUX.1-Kontext; condition ids (eq. 2) with CCPA (eq. 3); DAM in every
                        MM-attention block; plain LoRA of rank 512.
    tiny-multicrafter   the same methods on a tiny random FluxTransformer2DModel (CPU tests).
    tiny-one-for-all
    toyworld-multicrafter   the toy image world (docs/design.md 9): a small FLUX on the pixel-unshuffle
    toyworld-one-for-all    codec, clean-sample prediction, 20 steps, no guidance embedding.

`MCImageConfig.from_preset(name, **overrides)`, `to_dict` / `from_dict`, `save` / `load` (JSON).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from idcrafter.core.lora_config import FLUX_TARGET_MODULES, MoELoRAConfig
from idcrafter.utils.errors import ConfigError

__all__ = ["FLUX_CONFIGS", "PRESETS", "MCImageConfig", "check_categories"]

# FluxTransformer2DModel configs (diffusers layout) of the base checkpoints, and a tiny one.
# FLUX.1-dev and FLUX.1-Kontext-dev share the architecture (both guidance-distilled).
_FLUX_12B: dict[str, Any] = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=[16, 56, 56],
)
FLUX_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=[4, 6, 6],
    ),
    # The toy image world: 4x pixel-unshuffle codec (48 channels, packed 2x2 -> 192 = 8x8-pixel tokens).
    "toy": dict(
        patch_size=1, in_channels=192, num_layers=2, num_single_layers=2, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=False,
        axes_dims_rope=[8, 12, 12],
    ),
    "flux-dev": _FLUX_12B,
    "flux-kontext": _FLUX_12B,
}

# "index" and "temporal" are One-for-All's ablation variants Var. 1 and Var. 2 (Sec. 4.5, Tab. 4).
_POSITION_MODES = ("uno", "condition", "index", "temporal")
_CATEGORY_BINDINGS = ("true", "random")
_ADAPTERS = ("none", "lora", "moe_lora")
_BLOCK_SELECTIONS = ("all", "none", "double", "single")


@dataclass
class MCImageConfig:
    """What mcimage adds to a FLUX transformer, and the recipe defaults of each method.

    Args:
        base_model: Hugging Face id (or folder) of the FLUX pipeline the preset is trained on.
        position_ids: "uno" (MultiCrafter: reference k on the diagonal after the target and the
            earlier references, time index 0) or "condition" (One-for-All eq. 2: time index 1,
            category diagonal block c); One-for-All's ablations (Sec. 4.5, Tab. 4): "index" (Var. 1: every
            reference on the target's own grid, u = (0, 0, 0), told apart by a learned per-category
            embedding added to its tokens, zero at initialisation) and "temporal" (Var. 2: the
            category on the virtual time axis only, u = (c, 0, 0)).
        category_binding: "true" (One-for-All Sec. 3.2: each reference keeps its own category, so
            each category block learns the references it shows: "category-position binding is
            essential", App. G.5.1) or, as an ablation only, "random" (each step gives single-subject
            references a random category from `category_weights`).
        category_weights: {category: weight} resampling of the training pairs by the category of
            their subject (One-for-All App. H: 2:2:2:1 for face, upper, lower, bag); None: none.
        multi_learning_rate: the learning rate of multi-subject training (MultiCrafter supp. Sec. B:
            1e-5 after single-subject pre-training at `learning_rate`); None: `learning_rate`.
        condition_base_offset: with "condition", also shift every reference block (and the CCPA
            centroids) by the target grid size, as the paper's wording allows.
        ccpa: put item-descriptor text tokens at their category's reference centroid (eq. 3);
            needs position_ids="condition".
        max_subjects: most references one sample may carry.
        dam: Dynamic Attention Modulation temperatures; `dam_blocks` = "all" / "double" /
            "single" / list of block names; `dam_per_head`: one temperature per head.
        idar: record ref-restricted attention shares for the IDAR loss in `idar_blocks`
            ("double" for MultiCrafter); `idar_lambda` weights L_attn in the SFT loss.
        share_chunk_size: query chunk of the share computation (memory O(chunk)).
        adapter: "moe_lora" (MultiCrafter), "lora" (One-for-All, a MoE-LoRA with E = 1) or "none".
            `save_adapter` writes a "lora" adapter also as `pytorch_lora_weights.safetensors`, which
            diffusers' `FluxPipeline.load_lora_weights(folder)` reads. That file is the LoRA only: a
            stock FLUX with it equals this model on prompts without references when DAM is off (the
            DAM temperatures, reference tokens and their position ids have no stock equivalent). A
            "moe_lora" adapter gets such a file only when asked, with its experts merged at a fixed
            routing (`save_adapter(merged_routing=...)`), which approximates the per-token routing.
        lora_rank, lora_alpha, num_experts, top_k, lora_target_modules, load_balance_weight:
            the adapter's `MoELoRAConfig` (num_experts is forced to 1 for "lora").
        learning_rate, weight_decay, num_inference_steps, guidance_scale: recipe defaults.
        prediction: what the FLUX output means: "velocity" (stock FLUX) or "sample" (the clean
            latent, converted to a velocity by the wrapper; the toy world's small models learn
            clean-sample prediction where velocity prediction stays noisy).
        text_length: T5 tokens of the prompt (max_sequence_length; FLUX: 512).
        ref_size: (h, w) canvas the references are fitted on in training and sampling; None: the
            target size (the papers' choice). The toy world uses half the frame so a reference
            shows its subject at about the size it has in the image.
        preset: the name this config came from (informational).
        flux: FluxTransformer2DModel config used when the base model is built from scratch.
    """

    base_model: str = "black-forest-labs/FLUX.1-dev"
    position_ids: str = "uno"
    category_binding: str = "true"
    category_weights: dict[str, float] | None = None
    multi_learning_rate: float | None = None
    condition_base_offset: bool = False
    ccpa: bool = False
    max_subjects: int = 4
    dam: bool = False
    dam_per_head: bool = False
    dam_blocks: str | list[str] = "all"
    idar: bool = False
    idar_blocks: str | list[str] = "double"
    idar_lambda: float = 0.3
    share_chunk_size: int = 256
    adapter: str = "none"
    lora_rank: int = 16
    lora_alpha: float = 16.0
    num_experts: int = 4
    top_k: int | None = None
    lora_target_modules: tuple[str, ...] = FLUX_TARGET_MODULES
    load_balance_weight: float = 0.0
    learning_rate: float = 1e-5
    weight_decay: float = 1e-2
    num_inference_steps: int = 28
    guidance_scale: float = 3.5
    prediction: str = "velocity"
    text_length: int = 512
    ref_size: tuple[int, int] | None = None
    preset: str = "custom"
    flux: dict[str, Any] = field(default_factory=lambda: dict(FLUX_CONFIGS["tiny"]))

    def __post_init__(self) -> None:
        self.lora_target_modules = tuple(self.lora_target_modules)
        self.flux = copy.deepcopy(dict(self.flux))  # presets share their nested lists
        if self.position_ids not in _POSITION_MODES:
            raise ValueError(f"MCImageConfig: position_ids must be one of {_POSITION_MODES}, got {self.position_ids!r}")
        if self.category_binding not in _CATEGORY_BINDINGS:
            raise ValueError(f"MCImageConfig: category_binding must be one of {_CATEGORY_BINDINGS}, "
                             f"got {self.category_binding!r}")
        if self.category_weights is not None:
            from idcrafter.core.categories import canonical_category

            weights = {}
            for name, weight in dict(self.category_weights).items():
                if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
                    raise ValueError(f"MCImageConfig: category_weights[{name!r}] must be a number >= 0, got {weight!r}")
                weights[canonical_category(name)] = float(weight)
            if not any(weights.values()):
                raise ValueError("MCImageConfig: category_weights are all 0")
            self.category_weights = weights
        if self.category_binding == "random" and not self.category_weights:
            raise ValueError("MCImageConfig: category_binding 'random' draws from category_weights; give them")
        if self.ccpa and self.position_ids != "condition":
            raise ValueError("MCImageConfig: ccpa needs position_ids='condition' (CCPA centroids are eq. 2 blocks)")
        if self.condition_base_offset and self.position_ids != "condition":
            raise ValueError("MCImageConfig: condition_base_offset applies to position_ids='condition' only")
        if self.ref_size is not None:
            self.ref_size = tuple(int(v) for v in self.ref_size)
            if len(self.ref_size) != 2 or min(self.ref_size) <= 0:
                raise ValueError(f"MCImageConfig: ref_size must be (height, width), got {self.ref_size}")
        if self.prediction not in ("velocity", "sample"):
            raise ValueError(f"MCImageConfig: prediction must be 'velocity' or 'sample', got {self.prediction!r}")
        if self.adapter not in _ADAPTERS:
            raise ValueError(f"MCImageConfig: adapter must be one of {_ADAPTERS}, got {self.adapter!r}")
        if self.max_subjects < 1:
            raise ValueError(f"MCImageConfig: max_subjects must be >= 1, got {self.max_subjects}")
        if self.share_chunk_size < 1:
            raise ValueError(f"MCImageConfig: share_chunk_size must be >= 1, got {self.share_chunk_size}")
        if self.idar_lambda < 0:
            raise ValueError(f"MCImageConfig: idar_lambda must be >= 0, got {self.idar_lambda}")
        for name in ("dam_blocks", "idar_blocks"):
            spec = getattr(self, name)
            if isinstance(spec, str):
                if spec not in _BLOCK_SELECTIONS:
                    raise ValueError(f"MCImageConfig: {name} must be one of {_BLOCK_SELECTIONS} or a list, got {spec!r}")
            else:
                setattr(self, name, list(spec))
        if self.adapter != "none":
            self.adapter_config()  # validates rank / alpha / experts / patterns up front
        if "in_channels" not in self.flux:
            raise ValueError("MCImageConfig: flux config needs in_channels (packed latent channels)")

    # ------------------------------------------------------------------ derived
    @property
    def uses_categories(self) -> bool:
        """Whether references are placed by their category (One-for-All and its variants)."""
        return self.position_ids in ("condition", "index", "temporal")

    @property
    def capture_blocks(self) -> str | list[str]:
        """The `install_processors` capture selection: IDAR blocks, or none when IDAR is off."""
        return self.idar_blocks if self.idar else "none"

    def adapter_config(self) -> MoELoRAConfig | None:
        """The `MoELoRAConfig` of the adapter, or None for adapter="none"."""
        if self.adapter == "none":
            return None
        return MoELoRAConfig(
            rank=self.lora_rank,
            alpha=self.lora_alpha,
            num_experts=1 if self.adapter == "lora" else self.num_experts,
            top_k=None if self.adapter == "lora" else self.top_k,
            target_modules=self.lora_target_modules,
            load_balance_weight=self.load_balance_weight,
        )

    # ------------------------------------------------------------------ construction / IO
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> MCImageConfig:
        if name not in PRESETS:
            raise ValueError(f"MCImageConfig: unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        values = dict(PRESETS[name])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"MCImageConfig: unknown override(s) {unknown}; known keys are {sorted(known)}")
        values.update(overrides)
        return cls(**values)

    def to_model_dict(self) -> dict[str, Any]:
        """The JSON-ready dict an `MCImageTransformer` keeps in its diffusers config (field "mcimage"):
        everything but `flux`, which the model's own FLUX arguments carry."""
        data = self.to_dict()
        del data["flux"]
        return data

    @classmethod
    def from_model_config(cls, model_config: dict[str, Any]) -> MCImageConfig:
        """Inverse of `to_model_dict` from an `MCImageTransformer` config (its config.json as a dict):
        the "mcimage" field, with `flux` the model's FLUX arguments (those not None, tuples as lists).
        ValueError for a missing or malformed field."""
        data = model_config.get(MODEL_CONFIG_FIELD)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"{MODEL_CONFIG_FIELD!r} must be a JSON object, got {type(data).__name__}")
        flux = {k: list(v) if isinstance(v, tuple) else v for k, v in model_config.items()
                if not k.startswith("_") and k != MODEL_CONFIG_FIELD and v is not None}
        return cls.from_dict({**{k: v for k, v in data.items() if k != "flux"}, "flux": flux})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        data = dataclasses.asdict(self)
        data["lora_target_modules"] = list(self.lora_target_modules)
        data["ref_size"] = None if self.ref_size is None else list(self.ref_size)
        data["flux"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.flux.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MCImageConfig:
        """Inverse of `to_dict`; unknown keys (a typo never passes silently) and values of the wrong
        JSON type are a ValueError."""
        from idcrafter.utils.schema import check_json_fields

        check_json_fields(cls, data, "MCImageConfig")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> MCImageConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


# Each default names its source: "MC" = the MultiCrafter paper and supplement, "OfA" = One-for-All.
_MULTICRAFTER: dict[str, Any] = dict(
    # MC supp. Sec. B follows UNO [68], an in-context FLUX.1-dev model with diagonal reference ids
    base_model="black-forest-labs/FLUX.1-dev", position_ids="uno",
    ccpa=False, dam=False,  # One-for-All's modules, not MultiCrafter's
    idar=True, idar_blocks="double",  # MC Fig. 2: attention bleeding in the double blocks; IDAR regularises them
    idar_lambda=0.3,  # MC supp. Sec. B: lambda = 0.3 in multi-subject training
    adapter="moe_lora", num_experts=4,  # MC supp. Tab. S-3: 4 experts best
    lora_rank=16, lora_alpha=16.0,  # not given by the paper: our choice
    learning_rate=3e-5, weight_decay=1e-2,  # MC supp. Sec. B: single-subject pre-training, AdamW
    multi_learning_rate=1e-5,  # MC supp. Sec. B: "we decrease the learning rate to 1e-5" (multi-subject)
    num_inference_steps=28, guidance_scale=3.5,  # not given by the paper: FLUX.1-dev's own defaults
)
_ONE_FOR_ALL: dict[str, Any] = dict(
    base_model="black-forest-labs/FLUX.1-Kontext-dev",  # OfA Sec. 4.1: FLUX.1-Kontext-dev backbone
    position_ids="condition", category_binding="true",  # OfA Sec. 3.2 eq. 2: category-position binding
    category_weights={"face": 2.0, "upper": 2.0, "lower": 2.0, "bag": 1.0},  # OfA App. H: 2:2:2:1 resampling
    ccpa=True,  # OfA Sec. 3.3
    dam=True, dam_blocks="all",  # OfA Sec. 3.4: DAM in the MM-attention blocks
    idar=False,  # MultiCrafter's loss, not One-for-All's
    adapter="lora", num_experts=1, lora_rank=512, lora_alpha=512.0,  # OfA Sec. 4.1: LoRA of rank 512
    learning_rate=5e-6,  # OfA Sec. 4.1
    weight_decay=0.0,  # not given by the paper: our choice
    num_inference_steps=25, guidance_scale=6.0,  # OfA Sec. 4.1: 25 sampling steps, guidance 6.0
)

PRESETS: dict[str, dict[str, Any]] = {
    "multicrafter": dict(_MULTICRAFTER, preset="multicrafter", flux=FLUX_CONFIGS["flux-dev"]),
    "one-for-all": dict(_ONE_FOR_ALL, preset="one-for-all", flux=FLUX_CONFIGS["flux-kontext"]),
    # Tiny random backbones for CPU tests: same methods, small adapters.
    "tiny-multicrafter": dict(
        _MULTICRAFTER, lora_rank=4, lora_alpha=4.0, share_chunk_size=16, num_inference_steps=4,
        preset="tiny-multicrafter", flux=FLUX_CONFIGS["tiny"],
    ),
    "tiny-one-for-all": dict(
        _ONE_FOR_ALL, lora_rank=4, lora_alpha=4.0, share_chunk_size=16, num_inference_steps=4,
        preset="tiny-one-for-all", flux=FLUX_CONFIGS["tiny"],
    ),
}
# The toy image world: same methods on a small FLUX trained from scratch on a CPU.
_TOY = dict(lora_rank=16, lora_alpha=16.0, share_chunk_size=256, num_inference_steps=20, guidance_scale=1.0,
            prediction="sample", text_length=128, ref_size=(32, 32), max_subjects=3, learning_rate=5e-4, flux=FLUX_CONFIGS["toy"])
PRESETS["toyworld-multicrafter"] = dict(_MULTICRAFTER, **_TOY, preset="toyworld-multicrafter")
PRESETS["toyworld-one-for-all"] = dict(_ONE_FOR_ALL, **_TOY, preset="toyworld-one-for-all")


def check_categories(config: MCImageConfig, num_refs: int, categories) -> tuple[str, ...] | None:
    """The canonical category of each reference, or None when none are given (UNO ids).

    Raises ValueError when the count differs from the references, a name is unknown, condition
    ids get no categories, or condition ids get a category twice (two references would share
    RoPE positions). One check for the model, the pipeline and the command line.
    """
    from idcrafter.core.positions import canonical_category

    condition = config.uses_categories
    if categories is None:
        if condition and num_refs:
            raise ValueError(f"{config.position_ids} position ids need a category per reference (categories=[...]); "
                             f"got {num_refs} references and no categories")
        return None
    categories = list(categories)
    if len(categories) != num_refs:
        raise ValueError(f"{len(categories)} categories for {num_refs} references ({categories}); "
                         "give one category per reference")
    canon = []
    for k, name in enumerate(categories):
        try:
            canon.append(canonical_category(name))
        except ValueError as err:
            raise ValueError(f"categories[{k}]: {err}") from None
    if condition and len(set(canon)) != len(canon):
        raise ValueError(f"categories {categories} repeat a category; condition ids place one reference per category "
                         "(two would share RoPE positions)")
    return tuple(canon)


# File names of an mcimage adapter folder (and the folder's name inside a model folder). Kept here,
# free of diffusers, so validating a request does not import the model code.
ADAPTER_SUBFOLDER = "mcimage_adapter"
ADAPTER_CONFIG_NAME = "mcimage_config.json"
ADAPTER_FORMAT = "mcimage.adapter"
ADAPTER_FORMAT_VERSION = 1
# The model class a folder of the current layout names in transformer/config.json, and the field of
# that config holding the MCImageConfig (`to_model_dict`).
MODEL_CLASS_NAME = "MCImageTransformer"
MODEL_CONFIG_FIELD = "mcimage"


def read_adapter_config(folder: str | Path) -> MCImageConfig:
    """The config saved in an adapter folder; ValueError (JSONDecodeError included) for a missing
    file, another format, or fields of the wrong type."""
    path = Path(folder) / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{path}: no mcimage adapter config (expected a folder written by save_adapter)")
    payload = json.loads(path.read_text())
    if not isinstance(payload, dict) or payload.get("format") != ADAPTER_FORMAT \
            or payload.get("version") != ADAPTER_FORMAT_VERSION:
        raise ValueError(f"{path}: not an {ADAPTER_FORMAT} v{ADAPTER_FORMAT_VERSION} file")
    if not isinstance(payload.get("config"), dict):
        raise ValueError(f"{path}: no 'config' object")
    return MCImageConfig.from_dict(payload["config"])


def check_adapter_fits(config: MCImageConfig, flux: dict[str, Any], adapter: str | Path, base: str | Path) -> None:
    """ConfigError when the FLUX architecture an adapter was trained on (`config.flux`) differs from
    the base transformer's config `flux` (keys both have; lists and tuples compare alike)."""
    def same(a, b) -> bool:
        return (list(a) if isinstance(a, (list, tuple)) else a) == (list(b) if isinstance(b, (list, tuple)) else b)

    diff = sorted(k for k, v in config.flux.items() if k in flux and not same(flux[k], v))
    if diff:
        raise ConfigError(f"{adapter}: adapter was trained on a different FLUX architecture than {base} "
                          f"({', '.join(f'{k}: {config.flux[k]} vs {flux[k]}' for k in diff[:3])})")
