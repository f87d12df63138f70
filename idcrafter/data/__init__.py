"""Training data (docs/design.md 8): the JSONL manifest, clip sampling and decoding, resolution buckets,
the dataset with its collate function and bucket batch sampler, and the encoder-feature cache.

Never imports `idcrafter.video` or `mcimage` (image and video IO come from `idcrafter.utils.media`).
Check a manifest with
`python -m idcrafter.data.validate manifest.jsonl`.
"""

from idcrafter.utils.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "Bucket": "idcrafter.data.buckets",
    "BucketBatchSampler": "idcrafter.data.dataset",
    "CacheMismatchError": "idcrafter.data.cache",
    "CoverCrop": "idcrafter.data.buckets",
    "DEFAULT_BUCKETS": "idcrafter.data.buckets",
    "FeatureCache": "idcrafter.data.cache",
    "ManifestError": "idcrafter.data.manifest",
    "Sample": "idcrafter.data.manifest",
    "Subject": "idcrafter.data.manifest",
    "VideoDataset": "idcrafter.data.dataset",
    "VideoInfo": "idcrafter.data.video",
    "VideoTooShort": "idcrafter.data.video",
    "apply_cover_crop": "idcrafter.data.buckets",
    "buckets_for_area": "idcrafter.data.buckets",
    "build_cache": "idcrafter.data.cache",
    "cache_fingerprint": "idcrafter.data.cache",
    "collate": "idcrafter.data.dataset",
    "cover_crop_box": "idcrafter.data.buckets",
    "load_clip": "idcrafter.data.video",
    "load_manifest": "idcrafter.data.manifest",
    "manifest_stats": "idcrafter.data.manifest",
    "media_size": "idcrafter.data.video",
    "nearest_bucket": "idcrafter.data.buckets",
    "probe_video": "idcrafter.data.video",
    "resize_and_crop": "idcrafter.data.buckets",
    "resize_and_crop_masks": "idcrafter.data.buckets",
    "sample_frame_indices": "idcrafter.data.video",
})
