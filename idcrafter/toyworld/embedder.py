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


def _views(identities, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """One augmented crop [3, 32, 32] per identity: half from references, half from one-frame clips
    beside a distractor (partly occluded, varied background), the way ToyID meets them in videos."""
    from idcrafter.toyworld.world import make_clip, make_reference

    crops = []
    for i, identity in enumerate(identities):
        if rng.random() < 0.5:
            ref = make_reference(identity, size, rng)
            crops.append(crop_to_box(ref, (ref.astype(np.int16) < 245).any(-1)))
        else:
            other = identities[(i + 1 + int(rng.integers(0, len(identities) - 1))) % len(identities)]
            clip = make_clip([identity, other], 1, size, rng)
            crops.append(crop_to_box(clip.frames[0], clip.masks[0, 0]))
    return np.stack(crops)


def train_embedder(
    steps: int = 1500,
    batch_size: int = 128,
    seed: int = 0,
    lr: float = 2e-3,
    bank_size: int = 16384,
    eval_identities: int = 256,
    progress: bool = True,
) -> tuple[ToyIDEmbedder, EmbedderReport]:
    """Train on the train pool (cosine-softmax over its identities), check retrieval on held-out ones.

    Views are rendered once into a bank (rendering dominates otherwise) and reused with light
    pixel noise; the bank covers each train identity about twice.
    """
    import time

    from tqdm.auto import tqdm

    from idcrafter.toyworld.world import split_pools

    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    train_pool, held_out = split_pools(0)
    labels = rng.integers(0, len(train_pool), bank_size)
    bank = torch.from_numpy(_views([train_pool[i] for i in labels], rng))
    labels = torch.from_numpy(labels)
    model = ToyIDEmbedder()
    classifier = nn.Parameter(torch.randn(len(train_pool), model.dim) * 0.01)
    opt = torch.optim.AdamW([*model.parameters(), classifier], lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    correct = seen = 0
    model.train()
    for step in tqdm(range(steps), desc="toyid", disable=not progress):
        idx = torch.randint(0, bank_size, (batch_size,), generator=g)
        x = (bank[idx] + torch.randn(bank[idx].shape, generator=g) * 0.02).clamp(0, 1)
        emb = model(x)
        logits = 16.0 * emb @ F.normalize(classifier, dim=-1).T  # scaled cosine softmax
        loss = F.cross_entropy(logits, labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step >= steps - 100:
            correct += int((logits.argmax(-1) == labels[idx]).sum())
            seen += batch_size
    model.eval()
    top1 = held_out_retrieval(model, held_out[:: max(1, len(held_out) // eval_identities)][:eval_identities], seed + 1)
    report = EmbedderReport(correct / max(seen, 1), top1, min(eval_identities, len(held_out)), steps,
                            time.perf_counter() - started)
    return model, report


@torch.no_grad()
def held_out_retrieval(model: ToyIDEmbedder, identities, seed: int = 1) -> float:
    """Top-1 retrieval: gallery = one reference view per identity, probes = clip views; chance 1/N."""
    from idcrafter.toyworld.world import make_clip, make_reference

    rng = np.random.default_rng(seed)
    gallery, probes = [], []
    for i, identity in enumerate(identities):
        ref = make_reference(identity, 64, rng)
        gallery.append(crop_to_box(ref, (ref.astype(np.int16) < 245).any(-1)))
        clip = make_clip([identity, identities[(i + 1) % len(identities)]], 1, 64, rng)
        probes.append(crop_to_box(clip.frames[0], clip.masks[0, 0]))
    g = model(torch.from_numpy(np.stack(gallery)))
    p = model(torch.from_numpy(np.stack(probes)))
    return float(((p @ g.T).argmax(-1) == torch.arange(len(identities))).float().mean())
