"""Training data (DESIGN 8): the JSONL manifest, clip sampling and decoding, resolution buckets,
the dataset with its collate function and bucket batch sampler, and the encoder-feature cache.

Never imports `idcrafter.video` or `mcimage` (image and video IO come from `idcrafter.utils.media`).
Check a manifest with
`python -m idcrafter.data.validate manifest.jsonl`.
"""

from idcrafter.data.buckets import (
    DEFAULT_BUCKETS,
    Bucket,
    CoverCrop,
    apply_cover_crop,
    buckets_for_area,
    cover_crop_box,
    nearest_bucket,
    resize_and_crop,
    resize_and_crop_masks,
)
from idcrafter.data.cache import CacheMismatchError, FeatureCache, build_cache, cache_fingerprint
from idcrafter.data.dataset import BucketBatchSampler, VideoDataset, collate
from idcrafter.data.manifest import ManifestError, Sample, Subject, load_manifest, manifest_stats
from idcrafter.data.video import (
    VideoInfo,
    VideoTooShort,
    load_clip,
    media_size,
    probe_video,
    sample_frame_indices,
)

__all__ = [
    "DEFAULT_BUCKETS",
    "Bucket",
    "BucketBatchSampler",
    "CacheMismatchError",
    "CoverCrop",
    "FeatureCache",
    "ManifestError",
    "Sample",
    "Subject",
    "VideoDataset",
    "VideoInfo",
    "VideoTooShort",
    "apply_cover_crop",
    "build_cache",
    "buckets_for_area",
    "cache_fingerprint",
    "collate",
    "cover_crop_box",
    "load_clip",
    "load_manifest",
    "manifest_stats",
    "media_size",
    "nearest_bucket",
    "probe_video",
    "resize_and_crop",
    "resize_and_crop_masks",
    "sample_frame_indices",
]
