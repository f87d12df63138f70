"""ToyID: a small identity embedder for toy-world sprites (the toy world's ArcFace).

A CNN maps a 32x32 crop of one identity to a unit 64-d embedding. It trains on the train pool
with a normalised-softmax (cosine) classifier over train identities and strong augmentation
(rotation, scale, colour jitter, position, background, partial occlusion), then is checked on
held-out identities it never saw: one augmented reference per identity as the gallery, other
augmented views as probes, top-1 retrieval accuracy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from idcrafter.utils.io import atomic_write_dir

CROP = 32


class ToyIDEmbedder(nn.Module):
    """crops [B, 3, 32, 32] in [0, 1] -> unit embeddings [B, dim]."""

    def __init__(self, dim: int = 64, width: int = 32):
        super().__init__()
        self.dim, self.width = dim, width

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(
            block(3, width), nn.MaxPool2d(2), block(width, 2 * width), nn.MaxPool2d(2), block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, dim)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.features(crops * 2 - 1)), dim=-1)

    def save(self, folder: str | Path, metrics: dict | None = None) -> Path:
        with atomic_write_dir(folder) as tmp:
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp / "toyid.safetensors"))
            (tmp / "toyid.json").write_text(json.dumps({"dim": self.dim, "width": self.width, "metrics": metrics or {}}, indent=2))
        return Path(folder)

    @classmethod
    def load(cls, folder: str | Path) -> ToyIDEmbedder:
        folder = Path(folder)
        meta = json.loads((folder / "toyid.json").read_text())
        model = cls(meta["dim"], meta["width"])
        model.load_state_dict(load_file(str(folder / "toyid.safetensors")))
        return model.eval()


def crop_to_box(image: np.ndarray, mask: np.ndarray | None = None, size: int = CROP, pad: float = 0.1) -> np.ndarray:
    """Square crop around the mask's bounding box (whole image without mask), pixels outside the
    mask set to white, resized to size x size: uint8 [H, W, 3] -> float [3, size, size] in [0, 1]."""
    from PIL import Image

    img = image.copy()
    if mask is not None:
        if not mask.any():
            return np.ones((3, size, size), np.float32)
        img[~mask] = 255
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        side = int(max(y1 - y0, x1 - x0) * (1 + pad)) + 1
        cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
        canvas = np.full((side, side, 3), 255, np.uint8)
        ty0, tx0 = cy - side // 2, cx - side // 2
        sy0, sx0 = max(ty0, 0), max(tx0, 0)
        sy1, sx1 = min(ty0 + side, img.shape[0]), min(tx0 + side, img.shape[1])
        canvas[sy0 - ty0 : sy1 - ty0, sx0 - tx0 : sx1 - tx0] = img[sy0:sy1, sx0:sx1]
        img = canvas
    out = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR), np.float32) / 255.0
    return out.transpose(2, 0, 1)


@dataclass
class EmbedderReport:
    train_accuracy: float
    held_out_top1: float
    held_out_identities: int
    steps: int
    seconds: float
