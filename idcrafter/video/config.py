"""ID-Crafter configuration: a dataclass with named presets (`tiny`, `wan-1.3b`, `wan-14b`)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from idcrafter.utils.cli import MAX_SAMPLING_STEPS
from idcrafter.utils.errors import ConfigError, FileFormatError

# WanTransformer3DModel configs of the released checkpoints (diffusers layout), and a tiny one.
WAN_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=3, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32,
    ),
    # The toy world's model: 64x64 frames through a 4x pixel-unshuffle codec (48 channels, 16x16).
    "toyworld": dict(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=48, out_channels=48,
        text_dim=64, freq_dim=64, ffn_dim=512, num_layers=4, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64,
    ),
    "wan-1.3b": dict(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
    ),
    "wan-14b": dict(
        patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
    ),
}


# The method and the ablations of ID-Crafter's Tab. S.5 (see `IDCrafterConfig.hierarchy`).
HIERARCHIES = ("full", "no-intra", "no-inter", "no-cross", "stage3", "plain")
TOWER_HIERARCHIES = ("full", "no-intra", "no-inter", "no-cross")  # stages 1-2 run (one of them ablated)
STAGE3_HIERARCHIES = ("full", "no-intra", "no-inter", "stage3")  # the video reads subjects through stage 3
# Where stage 3 gets its query and output projection (see `IDCrafterConfig.stage3_projections`).
STAGE3_PROJECTIONS = ("attn2", "own")
# The layout of configs written before `stage3_projections` existed: stage 3 with its own projections.
LEGACY_STAGE3_PROJECTIONS = "own"
# What starts at zero in the "attn2" form (see `IDCrafterConfig.stage3_init`); "attn2" configs written
# before the option had the zero gate.
STAGE3_INITS = ("value", "gate")
LEGACY_STAGE3_INIT = "gate"


@dataclass
class IDCrafterConfig:
    """What ID-Crafter adds to a Wan transformer, and its sampling defaults.

    Args:
        num_blocks: K, the number of leading DiT blocks with hierarchical identity attention
            (clipped to the depth of the base model).
        max_subjects: subject-index embeddings available; more references are refused.
        use_vlm: add the VLM connector and feed VLM tokens to the cross-modal attention.
        vlm_dim: hidden size of the VLM states (Qwen2.5-VL-7B: 3584); required with use_vlm.
        latent_channels: channels of the VAE latents the subject encoder reads.
        subject_patch: patch size of the subject encoder's patch embedding (2x2).
        guidance_image, guidance_text: s_img and s_txt of the three-pass guidance.
        num_inference_steps, flow_shift: Euler steps and the flow-matching shift (3.0 at 480p).
        height, width, num_frames, fps: default output size and frame rate.
        text_length: tokens of the text encoder input (UMT5: 512).
        ref_size: side of the square canvas references are fitted onto before encoding (None:
            the output size). The toy world uses a smaller canvas so a reference shows its
            subject at about the size it has in the video.
        hierarchy: "full" (stages 1-3, the method), or the ablations of ID-Crafter's Tab. S.5:
            "no-intra" (w/o stage 1), "no-inter" (w/o stage 2), "no-cross" (w/o stage 3: the
            tower's subject tokens join the keys of the stock text cross-attention), "stage3"
            (vanilla attention: stage 3 on the encoded references, no tower), and "plain"
            (reference tokens appended to the text keys: no new attention at all).
        stage3_projections: how stage 3 reads the video tokens (docs/design.md 4), in every
            hierarchy that has stage 3 (ignored by "no-cross" and "plain"): "attn2" (the default:
            the query and output projection of the stock text cross-attention `attn2`, a separate
            softmax over the subject keys added to the text attention before `attn2.to_out` through
            a per-head gate; 2.2 points less per step at 480p x 81 frames, and on the toy world the
            same identity as "own" at the same budget, docs/design.md 9) or "own" (a cross-attention
            with its own query and output projections beside `attn2`, the layout of adapters saved
            before this option).
        stage3_init: what starts at zero in the "attn2" form, so that step 0 is the base model:
            "value" (the subject value projection; the per-head gates start at one) or "gate" (the
            per-head gates; the value projection random). Under Adam a parameter moves about lr
            per step, so H zero gates take ~1/lr steps to open, where a zero D x D value projection
            reads the subjects after a few steps, as the "own" form's zero output projection does
            (docs/design.md 4, 9). Only the initialisation; a loaded adapter keeps its weights.
        prediction: what the transformer outputs: "velocity" (Wan's v = eps - x0) or "sample"
            (x0; converted to v = (z_t - x0) / t), which suits large pixel-patch tokens.
        preset: the name this config came from (informational).
        wan: WanTransformer3DModel config used when a base model is built from scratch.
    """

    # ID-Crafter supp. A.1: the three stages are "inserted within the first 20 layers of the DiT".
    num_blocks: int = 20
    max_subjects: int = 3
    use_vlm: bool = False
    vlm_dim: int | None = None
    latent_channels: int = 16
    subject_patch: int = 2
    # ID-Crafter Sec. 4.1: "Euler sampler with 50 steps and classifier-free guidance ... scale 2.5"
    # (one scale for the image and the text condition).
    guidance_image: float = 2.5
    guidance_text: float = 2.5
    num_inference_steps: int = 50
    # The paper does not state a shift; 3.0 is Wan 2.1's own 480p sampling shift.
    flow_shift: float = 3.0
    # ID-Crafter Sec. 4.1 trains and samples at 480p; 81 frames at 16 fps is Wan 2.1's clip.
    height: int = 480
    width: int = 832
    num_frames: int = 81
    fps: int = 16
    text_length: int = 512
    ref_size: int | None = None
    hierarchy: str = "full"
    # ID-Crafter supp. eq. S.11 writes stage 3 as one cross-attention with Q = Z, KV = [F; f_text]:
    # the block's text cross-attention reads the subjects on its own query. The toy world found the
    # same identity as with separate projections at 2.2 points less per step (docs/design.md 4, 9).
    stage3_projections: str = "attn2"
    # The papers do not say how stage 3 starts; a zero value projection trains like the "own" form's
    # zero output projection, zero gates take ~1/lr Adam steps to open (docs/design.md 4, 9).
    stage3_init: str = "value"
    prediction: str = "velocity"
    preset: str = "custom"
    wan: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_blocks < 1:
            raise ValueError(f"IDCrafterConfig: num_blocks must be >= 1, got {self.num_blocks}")
        if self.max_subjects < 1:
            raise ValueError(f"IDCrafterConfig: max_subjects must be >= 1, got {self.max_subjects}")
        if self.hierarchy not in HIERARCHIES:
            raise ValueError(f"IDCrafterConfig: hierarchy must be one of {', '.join(HIERARCHIES)}, got {self.hierarchy!r}")
        if self.stage3_projections not in STAGE3_PROJECTIONS:
            raise ValueError(f"IDCrafterConfig: stage3_projections must be one of {', '.join(STAGE3_PROJECTIONS)}, "
                             f"got {self.stage3_projections!r}")
        if self.stage3_init not in STAGE3_INITS:
            raise ValueError(f"IDCrafterConfig: stage3_init must be one of {', '.join(STAGE3_INITS)}, got {self.stage3_init!r}")
        if self.use_vlm and not self.uses_stage3:
            raise ValueError(f"IDCrafterConfig: hierarchy {self.hierarchy!r} has no cross-modal attention to read VLM tokens")
        if self.prediction not in ("velocity", "sample"):
            raise ValueError(f"IDCrafterConfig: prediction must be velocity or sample, got {self.prediction!r}")
        if self.use_vlm and not self.vlm_dim:
            raise ValueError("IDCrafterConfig: use_vlm needs vlm_dim (the VLM hidden size)")
        if (self.num_frames - 1) % 4:
            raise ValueError(f"IDCrafterConfig: num_frames must be 4n+1, got {self.num_frames}")
        if self.height % 16 or self.width % 16:
            raise ValueError(f"IDCrafterConfig: height and width must be multiples of 16, got {self.height}x{self.width}")
        if self.ref_size is not None and (self.ref_size <= 0 or self.ref_size % 16):
            raise ValueError(f"IDCrafterConfig: ref_size must be a positive multiple of 16, got {self.ref_size}")
        if isinstance(self.wan.get("patch_size"), list):
            self.wan["patch_size"] = tuple(self.wan["patch_size"])

    @property
    def uses_tower(self) -> bool:
        """Stages 1-2 (the subject tower) run, with one of them when ablating the other."""
        return self.hierarchy in TOWER_HIERARCHIES

    @property
    def uses_stage3(self) -> bool:
        """The video tokens read the subjects through stage 3's own cross-attention."""
        return self.hierarchy in STAGE3_HIERARCHIES

    def ref_canvas(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """(height, width) references are fitted onto: ref_size, else the output size."""
        if self.ref_size:
            return self.ref_size, self.ref_size
        return height or self.height, width or self.width

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> IDCrafterConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        values = dict(PRESETS[name])
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if "patch_size" in data["wan"]:
            data["wan"]["patch_size"] = list(data["wan"]["patch_size"])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IDCrafterConfig:
        """Inverse of `to_dict`; unknown keys and values of the wrong JSON type are a ValueError.

        A config without `stage3_projections` was written before the option existed, when stage 3
        always had its own projections: it reads as "own", so old adapters and model folders load
        unchanged; an "attn2" one without `stage3_init` was initialised with the zero gate ("gate")."""
        from idcrafter.utils.schema import check_json_fields

        check_json_fields(cls, data, "IDCrafterConfig")
        legacy = {"stage3_projections": LEGACY_STAGE3_PROJECTIONS}
        if data.get("stage3_projections") == "attn2":
            legacy["stage3_init"] = LEGACY_STAGE3_INIT
        return cls(**{**legacy, **data})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> IDCrafterConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


# File names of an ID-Crafter adapter folder (and the folder's name inside a model folder). Kept here,
# free of diffusers, so validating a request does not import the model code.
ADAPTER_SUBFOLDER = "idcrafter_adapter"
ADAPTER_CONFIG = "idcrafter_config.json"
ADAPTER_WEIGHTS = "idcrafter_adapter.safetensors"
# (temporal, spatial) downsampling of the Wan 2.1 VAE, full size and the tiny test one alike.
WAN_VAE_FACTORS = (4, 8)


def read_adapter_config(folder: str | Path) -> tuple[IDCrafterConfig, dict]:
    """(config, the whole JSON) of an adapter folder; FileNotFoundError without the file,
    ValueError (JSONDecodeError included) for a file that is not an ID-Crafter adapter config."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"adapter folder {folder}: no {ADAPTER_CONFIG}")
    meta = json.loads(path.read_text())
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise ValueError(f"{path}: no 'config' object (not an ID-Crafter adapter config)")
    if not isinstance(meta.get("base", {}), dict):
        raise ValueError(f"{path}: 'base' must be an object")
    return IDCrafterConfig.from_dict(meta["config"]), meta


# The model class a transformer folder saved by `IDCrafterTransformer.save_pretrained` names in its
# config.json, and the entries that file holds beside the Wan config: the IDCrafterConfig (without its
# `wan`, which is the file's own Wan config), the MoE-LoRA config of LoRA layers, the VLM folder.
MODEL_CLASS = "IDCrafterTransformer"
MODEL_EXTRA_KEYS = ("idcrafter", "lora", "vlm_folder")
# Loading options that only mean something for a download from the Hugging Face Hub.
HUB_OPTIONS = ("revision", "custom_pipeline", "custom_revision", "token", "proxies", "force_download", "mirror",
               "cache_dir", "push_to_hub")


def read_model_config(folder: str | Path) -> tuple[IDCrafterConfig, dict] | None:
    """(config, meta) of a transformer folder saved by `IDCrafterTransformer.save_pretrained`, or None
    when its config.json names another class (a stock Wan transformer).

    The config is the "idcrafter" entry on the file's own Wan config; meta has the keys of an
    adapter's JSON ("config", "base", "vlm_folder"). FileNotFoundError without config.json,
    ValueError (JSONDecodeError included) for a file that is not such a config.
    """
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"transformer folder {folder}: no config.json")
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    if data.get("_class_name") != MODEL_CLASS:
        return None
    stored = data.get("idcrafter")
    if not isinstance(stored, dict):
        raise ValueError(f"{path}: no 'idcrafter' object (the ID-Crafter config)")
    wan = {k: v for k, v in data.items() if not k.startswith("_") and k not in MODEL_EXTRA_KEYS}
    config = IDCrafterConfig.from_dict({**stored, "wan": wan})
    try:
        base = base_signature(wan)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: not a Wan transformer config ({err!r})") from None
    vlm_folder = data.get("vlm_folder")
    return config, {"config": config.to_dict(), "base": base, "vlm_folder": vlm_folder}


def model_folder_config(folder: str | Path) -> tuple[IDCrafterConfig, dict] | None:
    """(config, meta) of the ID-Crafter model in a pipeline folder of either layout: an
    `IDCrafterTransformer` in transformer/, else an `idcrafter_adapter/` beside a stock Wan
    transformer (the layout of older saves and of training exports). None for a folder with
    neither (a stock Wan folder, whose model starts from a fresh adapter)."""
    folder = Path(folder)
    if (folder / "transformer" / "config.json").is_file():
        own = read_model_config(folder / "transformer")
        if own is not None:
            return own
    if (folder / ADAPTER_SUBFOLDER / ADAPTER_CONFIG).is_file():
        return read_adapter_config(folder / ADAPTER_SUBFOLDER)
    return None


def local_model_folder(path: Any, what: str, options: Mapping[str, Any] | None = None) -> Path:
    """`path` as an existing local folder; FileFormatError or ConfigError (one line naming `what`) for anything that only a
    download could satisfy: a hub id or missing path, or a Hub option (`HUB_OPTIONS`) in `options`
    set to anything but its default. Models are never downloaded (docs/design.md 10)."""
    for key in HUB_OPTIONS:
        if (options or {}).get(key) not in (None, False):
            raise ConfigError(f"{what}: {key}= is a Hugging Face Hub option; models load from local folders only")
    if not isinstance(path, (str, Path)) or not str(path):
        raise TypeError(f"{what}: expected a local model folder, got {type(path).__name__} {path!r}")
    folder = Path(path)
    if not folder.is_dir():
        raise FileFormatError(f"{what}: {path} is not a local folder (models load from local folders only; "
                              "hub ids are not downloaded)")
    subfolder = (options or {}).get("subfolder")
    if subfolder and not (folder / subfolder).is_dir():
        raise FileFormatError(f"{what}: {folder} has no {subfolder}/ subfolder")
    return folder


def base_signature(wan: Mapping[str, Any]) -> dict[str, int]:
    """What an adapter records of the Wan transformer it was trained on, from that transformer's
    config: an adapter loads only onto a base with the same signature."""
    return {
        "dim": int(wan["num_attention_heads"]) * int(wan["attention_head_dim"]),
        "heads": int(wan["num_attention_heads"]),
        "num_layers": int(wan["num_layers"]),
        "in_channels": int(wan["in_channels"]),
    }


def check_adapter_fits(meta: Mapping[str, Any], wan: Mapping[str, Any], adapter: str | Path) -> None:
    """ConfigError when an adapter's recorded base (`meta["base"]`) differs from this Wan config."""
    ours = base_signature(wan)
    for key, value in (meta.get("base") or {}).items():
        if ours.get(key) != value:
            raise ConfigError(f"adapter {adapter} was trained for a base model with {key}={value}, "
                              f"this base model has {key}={ours.get(key)}")


def vae_scale_factors(vae_config: Mapping[str, Any]) -> tuple[int, int]:
    """(temporal, spatial) downsampling of a Wan VAE, or of the toy world's codec, from its config:
    the explicit `scale_factor_*` entries when present, else Wan's `temperal_downsample` layout
    (one spatial halving per stage, a temporal one where the flag is set)."""
    down = list(vae_config.get("temperal_downsample") or [])
    temporal = vae_config.get("scale_factor_temporal") or 2 ** sum(bool(d) for d in down)
    spatial = vae_config.get("scale_factor_spatial") or 2 ** len(down)
    return int(temporal), int(spatial)


@dataclass(frozen=True)
class VideoLimits:
    """The largest request a model can take: Wan's rotary embedding has `rope_max_seq_len` positions
    per axis, so latent frames / patch and latent rows / patch beyond it crash inside the model."""

    max_frames: int
    max_height: int
    max_width: int
    max_steps: int = MAX_SAMPLING_STEPS

    @classmethod
    def from_configs(cls, wan: dict, vae: dict) -> VideoLimits:
        positions = int(wan.get("rope_max_seq_len", 1024))
        p_t, p_h, p_w = wan.get("patch_size", (1, 2, 2))
        temporal, spatial = vae_scale_factors(vae)
        return cls(max_frames=(positions * p_t - 1) * temporal + 1, max_height=positions * p_h * spatial,
                   max_width=positions * p_w * spatial)

    def check(self, height: int, width: int, frames: int, steps: int,
              names: tuple[str, str, str] = ("--size", "--frames", "--steps")) -> None:
        """ConfigError naming the option (`names`: size, frames, steps) for a request past a bound."""
        size_name, frames_name, steps_name = names
        if height > self.max_height or width > self.max_width:
            raise ConfigError(f"{size_name} {height}x{width}: this model's rotary position range covers at most "
                              f"{self.max_height}x{self.max_width}")
        if frames > self.max_frames:
            raise ConfigError(f"{frames_name} {frames}: this model's rotary position range covers at most "
                              f"{self.max_frames} frames")
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise TypeError(f"{steps_name} must be an integer, got {steps!r}")
        if not 1 <= steps <= self.max_steps:
            raise ConfigError(f"{steps_name} must be in [1, {self.max_steps}], got {steps}")


PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests and the built-in default model: 3 blocks of width 32, 64x64 (8x8 latents), 9 frames.
    "tiny": dict(
        num_blocks=2, max_subjects=3, num_inference_steps=4, height=64, width=64, num_frames=9,
        fps=8, text_length=64, flow_shift=3.0, preset="tiny", wan=WAN_CONFIGS["tiny"],
    ),
    # Trained on the synthetic toy world (idcrafter.toyworld); the built-in default model. Stage 3 on
    # its own projections: the committed model was trained so, and its build reproduces it.
    "toyworld": dict(
        num_blocks=4, max_subjects=3, latent_channels=48, num_inference_steps=20, height=64, width=64,
        num_frames=5, fps=8, text_length=96, ref_size=32, flow_shift=3.0, guidance_image=2.0, guidance_text=1.0,
        prediction="sample", stage3_projections="own", preset="toyworld", wan=WAN_CONFIGS["toyworld"],
    ),
    # Qwen2.5-VL-7B has hidden size 3584; the VLM is switched on when a VLM folder is given.
    "wan-1.3b": dict(num_blocks=20, vlm_dim=3584, preset="wan-1.3b", wan=WAN_CONFIGS["wan-1.3b"]),
    "wan-14b": dict(num_blocks=20, vlm_dim=3584, preset="wan-14b", wan=WAN_CONFIGS["wan-14b"]),
}
