"""ID-Crafter on Wan 2.1: subject encoder, hierarchical identity attention, VLM encoder, pipeline.

Exports load on first use, so light modules such as `idcrafter.utils.media` or
`idcrafter.video.config` import without pulling in diffusers.
"""

from idcrafter.utils.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "PRESETS": "idcrafter.video.config",
    "IDCrafterConfig": "idcrafter.video.config",
    "IDCrafterPipeline": "idcrafter.video.pipeline",
    "IDCrafterPipelineOutput": "idcrafter.video.pipeline",
    "IDCrafterTransformer": "idcrafter.video.transformer",
})
