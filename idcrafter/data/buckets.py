"""Resolution buckets: every sample trains at the bucket nearest its aspect ratio, at about one area.

A frame is resized (aspect kept) until it covers the bucket, then centre-cropped. `cover_crop_box`
computes that geometry once from the source size; `apply_cover_crop` applies it to frames and to
masks alike, which is what keeps a subject's mask on the subject's pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = [
    "DEFAULT_BUCKETS",
    "Bucket",
    "CoverCrop",
    "apply_cover_crop",
    "buckets_for_area",
    "cover_crop_box",
    "nearest_bucket",
    "resize_and_crop",
    "resize_and_crop_masks",
]


@dataclass(frozen=True, order=True)
class Bucket:
    """A training resolution; both sides are multiples of 16 for Wan (VAE 8x, patch 2x)."""

    height: int
    width: int

    def __post_init__(self):
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"Bucket {self.height}x{self.width}: sides must be positive")

    @property
    def aspect(self) -> float:
        """width / height."""
        return self.width / self.height

    def __str__(self) -> str:
        return f"{self.height}x{self.width}"


# About 480p area (480 x 832 = 399,360 pixels): 16:9 both ways, square, and ~4:3 both ways.
DEFAULT_BUCKETS: tuple[Bucket, ...] = (
    Bucket(480, 832),
    Bucket(832, 480),
    Bucket(624, 624),
    Bucket(544, 720),
    Bucket(720, 544),
)


def buckets_for_area(area: int, ratios: Sequence[float], multiple: int = 16) -> tuple[Bucket, ...]:
    """One bucket per aspect ratio (width / height) with about `area` pixels, sides rounded to `multiple`.

    >>> buckets_for_area(480 * 832, [832 / 480, 1.0])
    (Bucket(height=480, width=832), Bucket(height=624, width=624))
    """
    if area <= 0 or multiple <= 0:
        raise ValueError(f"area {area} and multiple {multiple} must be positive")
    buckets: list[Bucket] = []
    for ratio in ratios:
        if not ratio > 0:
            raise ValueError(f"aspect ratio {ratio} must be positive (width / height)")
        height = math.sqrt(area / ratio)
        bucket = Bucket(
            max(multiple, round(height / multiple) * multiple),
            max(multiple, round(height * ratio / multiple) * multiple),
        )
        if bucket not in buckets:
            buckets.append(bucket)
    return tuple(buckets)


def nearest_bucket(height: int, width: int, buckets: Sequence[Bucket] = DEFAULT_BUCKETS) -> Bucket:
    """The bucket whose aspect ratio is nearest (in log scale) to height x width; ties go to the first."""
    if not buckets:
        raise ValueError("no buckets to choose from")
    if height <= 0 or width <= 0:
        raise ValueError(f"size {height}x{width} must be positive")
    target = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b.aspect) - target))


@dataclass(frozen=True)
class CoverCrop:
    """Resize a source of `source` (h, w) by `scale` to `resized` (h, w), then crop `box`.

    `box` is (top, left, bottom, right) in the resized image; its size is the bucket's.
    """

    source: tuple[int, int]
    scale: float
    resized: tuple[int, int]
    box: tuple[int, int, int, int]

    @property
    def size(self) -> tuple[int, int]:
        top, left, bottom, right = self.box
        return bottom - top, right - left

    def source_box(self) -> tuple[float, float, float, float]:
        """The crop in source pixels as PIL wants it: (left, upper, right, lower)."""
        top, left, bottom, right = self.box
        sy, sx = self.resized[0] / self.source[0], self.resized[1] / self.source[1]
        return left / sx, top / sy, right / sx, bottom / sy


def cover_crop_box(height: int, width: int, bucket: Bucket) -> CoverCrop:
    """Geometry to cover `bucket` with a height x width source (aspect kept), then centre-crop."""
    if height <= 0 or width <= 0:
        raise ValueError(f"size {height}x{width} must be positive")
    scale = max(bucket.height / height, bucket.width / width)
    resized = (max(bucket.height, round(height * scale)), max(bucket.width, round(width * scale)))
    top, left = (resized[0] - bucket.height) // 2, (resized[1] - bucket.width) // 2
    return CoverCrop((height, width), scale, resized, (top, left, top + bucket.height, left + bucket.width))


def apply_cover_crop(images: np.ndarray, crop: CoverCrop) -> np.ndarray:
    """Apply `crop` to uint8 frames [..., H, W, C] or float masks [..., H, W], one PIL resize each.

    Resizing straight from the source box is the same as resizing the whole frame and cropping,
    without materialising the full resized frame; bicubic for frames, bilinear for masks
    (antialiased when shrinking).
    """
    images = np.asarray(images)
    channels_last = images.dtype == np.uint8
    if images.ndim < (3 if channels_last else 2):
        raise ValueError(f"expected uint8 [..., H, W, C] or float [..., H, W], got {images.dtype} {images.shape}")
    spatial = images.shape[-3:-1] if channels_last else images.shape[-2:]
    if tuple(spatial) != tuple(crop.source):
        raise ValueError(f"images are {spatial[0]}x{spatial[1]}, the crop was computed for {crop.source}")
    lead = images.shape[:-3] if channels_last else images.shape[:-2]
    flat = images.reshape(-1, *images.shape[len(lead):])
    bh, bw = crop.size
    box = crop.source_box()
    if channels_last:
        out = [np.asarray(Image.fromarray(f).resize((bw, bh), Image.BICUBIC, box=box)) for f in flat]
    else:
        out = [
            np.asarray(Image.fromarray(f.astype(np.float32, copy=False), "F").resize((bw, bh), Image.BILINEAR, box=box))
            for f in flat
        ]
    return np.stack(out).reshape(*lead, *out[0].shape) if out else np.zeros((*lead, bh, bw), images.dtype)


def resize_and_crop(frames: np.ndarray, bucket: Bucket) -> np.ndarray:
    """uint8 frames [F, H, W, 3] -> [F, bucket.height, bucket.width, 3]: resize to cover, centre-crop."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    return apply_cover_crop(frames, cover_crop_box(frames.shape[1], frames.shape[2], bucket))


def resize_and_crop_masks(masks: np.ndarray, bucket: Bucket, threshold: float = 0.5) -> np.ndarray:
    """Masks [..., H, W] in [0, 1] -> float32 {0, 1} [..., bucket.height, bucket.width], same geometry
    as `resize_and_crop` on frames of the same size, binarised at `threshold` after resampling."""
    masks = np.asarray(masks, dtype=np.float32)
    crop = cover_crop_box(masks.shape[-2], masks.shape[-1], bucket)
    return (apply_cover_crop(masks, crop) >= threshold).astype(np.float32)
