"""Training data (DESIGN 8): the JSONL manifest, clip sampling and decoding, resolution buckets,
the dataset with its collate function and bucket batch sampler, and the encoder-feature cache.

Never imports `idcrafter.video` or `mcimage` (image and video IO come from `idcrafter.utils.media`).
Check a manifest with
`python -m idcrafter.data.validate manifest.jsonl`.
"""

from __future__ import annotations

import importlib

# Names are imported on first use: the manifest reader and validator load without torch.
_EXPORTS = {
    "Bucket": "buckets",
    "BucketBatchSampler": "dataset",
    "CacheMismatchError": "cache",
    "CoverCrop": "buckets",
    "DEFAULT_BUCKETS": "buckets",
    "FeatureCache": "cache",
    "ManifestError": "manifest",
    "Sample": "manifest",
    "Subject": "manifest",
    "VideoDataset": "dataset",
    "VideoInfo": "video",
    "VideoTooShort": "video",
    "apply_cover_crop": "buckets",
    "buckets_for_area": "buckets",
    "build_cache": "cache",
    "cache_fingerprint": "cache",
    "collate": "dataset",
    "cover_crop_box": "buckets",
    "load_clip": "video",
    "load_manifest": "manifest",
    "manifest_stats": "manifest",
    "media_size": "video",
    "nearest_bucket": "buckets",
    "probe_video": "video",
    "resize_and_crop": "buckets",
    "resize_and_crop_masks": "buckets",
    "sample_frame_indices": "video",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"idcrafter.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'idcrafter.data' has no attribute {name!r}")
