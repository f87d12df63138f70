"""The built-in default model of `scripts/infer.py` on a machine without downloaded weights.

The `tiny` preset with random weights from a fixed seed: the whole pipeline runs end to end
(real UMT5, Wan VAE and Wan transformer classes), so commands and outputs can be checked, but
the videos are noise-like; pass `--model` (a Wan diffusers folder) and `--adapter` for real use.
"""

from __future__ import annotations

from idcrafter.video.config import IDCrafterConfig

DEFAULT_SEED = 0


def default_pipeline(preset: str = "tiny", adapter=None):
    from idcrafter.video.pipeline import IDCrafterPipeline
    from idcrafter.video.presets import build_components

    config = IDCrafterConfig.from_preset(preset)
    if preset != "tiny":
        raise ValueError(f"the built-in model exists for the tiny preset only; pass --model for {preset!r}")
    pipe = IDCrafterPipeline.from_components(build_components(config, seed=DEFAULT_SEED))
    if adapter is not None:
        pipe.transformer.load_adapter(adapter)
    return pipe
