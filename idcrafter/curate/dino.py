"""DINOv2 embeddings of subject crops, for verifying non-face subjects across frames (docs/design.md
8.1, stage 6). The verify stage compares them by cosine similarity; `idcrafter.curate.identity`
re-exports `DinoVerifier` under the "dinov2" verifier name."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["DinoVerifier"]


class DinoVerifier:
    """Crops -> unit DINOv2 CLS embeddings: transformers' `Dinov2Model` from a local folder.

    The CLS token after the final layer norm (`pooler_output`) is DINOv2's global image descriptor
    (DINOv2 Sec. 7: linear probes and retrieval read it). `embed(crops)` returns (n, d) unit rows,
    a NaN row for a missing or empty crop, in batches of `batch_size`.
    """

    def __init__(self, model: str | None = None, device: str = "cpu", batch_size: int = 32,
                 dtype: str | None = None) -> None:
        if not model:
            raise ValueError("the dinov2 verifier needs model: a local DINOv2 folder (backends.verifier.model)")
        self.path = Path(model)
        self.device = device
        self.batch_size = max(1, int(batch_size))
        self.dtype = dtype
        self.model = self.processor = None

    def load(self) -> None:
        if self.model is not None:
            return
        from transformers import AutoImageProcessor, Dinov2Model

        from idcrafter.curate.core import load_local_model

        self.model = load_local_model(Dinov2Model, self.path, "DINOv2", self.dtype, self.device)
        self.processor = AutoImageProcessor.from_pretrained(self.path, local_files_only=True)

    @property
    def dim(self) -> int:
        self.load()
        return int(self.model.config.hidden_size)

    def embed(self, crops: Sequence[np.ndarray | None]) -> np.ndarray:
        """crops: (h, w, 3) uint8 each (None or empty: nothing to embed) -> (n, d) float32 unit rows."""
        import torch

        self.load()
        out = np.full((len(crops), self.dim), np.nan, dtype=np.float32)
        valid = [i for i, c in enumerate(crops) if c is not None and np.asarray(c).ndim == 3 and min(np.asarray(c).shape[:2]) > 0]
        for s in range(0, len(valid), self.batch_size):
            rows = valid[s:s + self.batch_size]
            inputs = self.processor(images=[np.ascontiguousarray(crops[i]) for i in rows], return_tensors="pt")
            with torch.inference_mode():
                cls = self.model(pixel_values=inputs["pixel_values"].to(self.device, self.model.dtype)).pooler_output
            cls = torch.nn.functional.normalize(cls.float(), dim=-1)
            out[rows] = cls.cpu().numpy()
        return out
