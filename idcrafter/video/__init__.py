"""ID-Crafter on Wan 2.1: subject encoder, hierarchical identity attention, VLM encoder, pipeline.

Exports load on first use, so light modules such as `idcrafter.utils.media` or
`idcrafter.video.config` import without pulling in diffusers.
"""

from importlib import import_module

_EXPORTS = {
    "PRESETS": "idcrafter.video.config",
    "IDCrafterConfig": "idcrafter.video.config",
    "IDCrafterPipeline": "idcrafter.video.pipeline",
    "IDCrafterPipelineOutput": "idcrafter.video.pipeline",
    "IDCrafterTransformer": "idcrafter.video.transformer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'idcrafter.video' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
