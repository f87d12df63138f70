"""The built-in default model of `scripts/infer.py`, for machines without downloaded weights.

When the package carries the toy-world model (`idcrafter/assets/toyworld/model`, built by
`python -m idcrafter.toyworld.build --install`), that is the default: a small ID-Crafter trained
with this code on the synthetic toy world, which draws the given toy identities. Otherwise the
`tiny` preset with random weights from a fixed seed runs the whole path with noise-like output.
"""

from __future__ import annotations

from pathlib import Path

from idcrafter.video.config import IDCrafterConfig, model_folder_config

DEFAULT_SEED = 0
TOYWORLD_MODEL = Path(__file__).resolve().parents[1] / "assets" / "toyworld" / "model"


def toyworld_available() -> bool:
    """Whether the package carries the toy-world model (in either folder layout, see
    `idcrafter.video.pipeline.IDCrafterPipeline`)."""
    return model_folder_config(TOYWORLD_MODEL) is not None


def builtin_name() -> str:
    return "toyworld" if toyworld_available() else "tiny"


def builtin_config(preset: str | None = None) -> IDCrafterConfig:
    """The config of the built-in model for `preset` (None: whichever is built in)."""
    preset = preset or builtin_name()
    if preset == "toyworld" and toyworld_available():
        return model_folder_config(TOYWORLD_MODEL)[0]
    return IDCrafterConfig.from_preset(preset)


def default_pipeline(preset: str | None = None, adapter=None):
    from idcrafter.video.pipeline import IDCrafterPipeline
    from idcrafter.video.presets import build_components

    preset = preset or builtin_name()
    if preset == "toyworld" and toyworld_available():
        pipe = IDCrafterPipeline.from_pretrained(TOYWORLD_MODEL, adapter=adapter)
    elif preset == "tiny":
        pipe = IDCrafterPipeline.from_components(build_components(IDCrafterConfig.from_preset("tiny"), seed=DEFAULT_SEED))
        if adapter is not None:
            pipe.transformer.load_adapter(adapter)
    else:
        raise ValueError(f"no built-in model for preset {preset!r}; pass --model (a Wan diffusers folder)")
    return pipe
