"""ID-Crafter on Wan 2.1: subject encoder, hierarchical identity attention, VLM encoder, pipeline."""

from idcrafter.video.config import PRESETS, IDCrafterConfig
from idcrafter.video.pipeline import IDCrafterPipeline, IDCrafterPipelineOutput
from idcrafter.video.transformer import IDCrafterTransformer

__all__ = ["PRESETS", "IDCrafterConfig", "IDCrafterPipeline", "IDCrafterPipelineOutput", "IDCrafterTransformer"]
