"""Training samples as tensors: `VideoDataset`, `collate`, and `BucketBatchSampler`.

A sample that cannot be decoded (corrupt or too-short video, unreadable image or mask) is skipped
and counted, never silently replaced by another sample (docs/design.md 8): `__getitem__` returns None,
records the reason in `dataset.failures`, logs one warning per sample, and `collate` drops it.
With DataLoader workers each worker holds its own `failures`; the main process sees the count as
`batch["num_skipped"]`, and `failure_log` (a JSONL file all workers append to) keeps the reasons.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from idcrafter.data.buckets import DEFAULT_BUCKETS, Bucket, apply_cover_crop, cover_crop_box, nearest_bucket
from idcrafter.data.cache import FeatureCache
from idcrafter.data.manifest import Sample, is_video_path, load_manifest
from idcrafter.data.video import VideoInfo, load_clip, max_clip_start, media_size, probe_video
from idcrafter.utils import media
from idcrafter.utils.errors import FileFormatError
from idcrafter.utils.io import atomic_write
from idcrafter.utils.logging import get_logger

__all__ = ["BucketBatchSampler", "VideoDataset", "collate"]

logger = get_logger(__name__)

# Keys `collate` handles itself; every other tensor in an item (the cached encoder outputs) is
# stacked, zero-padded along its first dimension where items differ (ref_latents per subject).
_ITEM_KEYS = frozenset(
    {"id", "prompt", "categories", "descriptors", "bucket", "video", "refs", "subject_mask", "subject_has_mask", "masks"}
)
_MASK_THRESHOLD = 0.5


def _load_image(path: Path, role: str):
    """`media.load_image`, with errors naming the file's role (its messages say "reference image")."""
    try:
        return media.load_image(path)
    except FileFormatError as err:
        raise FileFormatError(str(err).replace("reference image", role, 1)) from None


def _mask_values(image) -> np.ndarray:
    """A PIL mask -> float32 [H, W] in [0, 1].

    The alpha channel is the mask when the image has one that is not fully opaque (a cut-out);
    otherwise the grey level (white = subject).
    """
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        if alpha.min() < 255:
            return alpha.astype(np.float32) / 255.0
    if image.mode in media.HIGH_BIT_MODES:
        return np.clip(np.asarray(image, dtype=np.float32) / 65535.0, 0.0, 1.0)
    if image.mode == "F":
        return np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def _luminance(frames: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> float32 [...] in [0, 1] (ITU-R 601 weights, as PIL's convert("L"))."""
    return (frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)) / 255.0


class VideoDataset(Dataset):
    """Manifest samples -> tensors for ID-Crafter training, one clip per sample.

    Args:
        samples: parsed manifest samples (`load_manifest`, or use `from_manifest`).
        num_frames: frames per clip, 4n+1 (an image sample gives 1 frame).
        fps: the frame rate clips are sampled at.
        buckets: training resolutions; a sample goes to the bucket nearest its aspect ratio, read
            from the file header without decoding (`bucket_ids`).
        ref_size: (height, width) every reference is fitted onto (white canvas, aspect kept).
        max_subjects: a sample with more subjects fails (counted), it is not truncated.
        cache: a `FeatureCache`; its tensors for the sample are added to the item. Without pixels
            (`load_pixels=False`, the default with a cache) "video" and "refs" are not decoded and
            a sample missing from the cache fails. Masks are always read from the mask files.
        seed: seeds the random clip start (`clip_start="random"`) with the epoch and index.
        load_pixels: decode "video" and "refs"; default: only when there is no cache.
        clip_start: "first" (clip starts at frame 0) or "random" (uniform over the starts that fit;
            needs no cache, since a cache holds one fixed clip per sample).
        size_cache: optional JSON file remembering media sizes (keyed by path, size and mtime), so
            a large dataset's headers are read once, not at every launch.
        failure_log: optional JSONL file each failure is appended to ({"id", "line", "reason"}).

    Items (dicts):
        id: str; prompt: str; categories: list[str]; descriptors: list[str | None];
        bucket: (height, width) of the clip;
        video: float32 [3, F, H, W] in [-1, 1] (when pixels are loaded);
        refs: float32 [N, 3, rh, rw] in [-1, 1] (when pixels are loaded);
        subject_mask: bool [N], all True (padding is marked by `collate`);
        subject_has_mask: bool [N], which subjects have a mask file;
        masks: float32 [N, F, H, W] in {0, 1}, aligned with `video`, zeros for a subject without a
            mask file; None when no subject of the sample has one;
        plus the cached tensors (e.g. latents, ref_latents, text_states, vlm_states, vlm_mask).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        num_frames: int,
        fps: float = 16,
        buckets: Sequence[Bucket] = DEFAULT_BUCKETS,
        ref_size: tuple[int, int] = (480, 480),
        max_subjects: int = 3,
        cache: FeatureCache | None = None,
        seed: int = 0,
        *,
        load_pixels: bool | None = None,
        clip_start: str = "first",
        size_cache: str | os.PathLike | None = None,
        failure_log: str | os.PathLike | None = None,
    ):
        if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % 4:
            raise ValueError(f"num_frames {num_frames} must be 4n+1 (e.g. 9, 17, 81) for the Wan VAE")
        if not fps > 0:
            raise ValueError(f"fps {fps} must be positive")
        if not buckets:
            raise ValueError("buckets is empty")
        if len(ref_size) != 2 or min(ref_size) <= 0:
            raise ValueError(f"ref_size {ref_size} must be (height, width), both positive")
        if max_subjects < 1:
            raise ValueError(f"max_subjects {max_subjects} must be >= 1")
        if clip_start not in ("first", "random"):
            raise ValueError(f"clip_start {clip_start!r} must be 'first' or 'random'")
        if cache is not None and clip_start != "first":
            raise ValueError("clip_start='random' cannot be used with a feature cache (it holds one clip per sample)")
        ids = [s.id for s in samples]
        if len(set(ids)) != len(ids):
            raise ValueError("sample ids are not unique")
        self.samples = list(samples)
        self.num_frames = num_frames
        self.fps = float(fps)
        self.buckets = tuple(buckets)
        self.ref_size = (int(ref_size[0]), int(ref_size[1]))
        self.max_subjects = max_subjects
        self.cache = cache
        self.seed = seed
        self.load_pixels = cache is None if load_pixels is None else load_pixels
        self.clip_start = clip_start
        self.size_cache = None if size_cache is None else Path(size_cache)
        self.failure_log = None if failure_log is None else Path(failure_log)
        self.epoch = 0
        self.failures: dict[str, str] = {}
        self.num_failures = 0
        self._sizes: dict[int, tuple[int, int] | None] = {}
        self._size_errors: dict[int, str] = {}
        self._video_infos: dict[int, VideoInfo] = {}

    @classmethod
    def from_manifest(
        cls, path: str | os.PathLike, *args, split: str | None = None, allow_bad_lines: bool = False, **kwargs
    ) -> VideoDataset:
        """Load and validate a manifest, keep `split` (all samples when None), build the dataset.

        Bad lines raise `FileFormatError` listing them (fix the manifest before a long run), unless
        `allow_bad_lines`, which drops them with a warning.
        """
        samples, errors = load_manifest(path)
        if errors and not allow_bad_lines:
            shown = "; ".join(str(e) for e in errors[:5])
            more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
            raise FileFormatError(f"{path}: {len(errors)} bad lines: {shown}{more}; run python -m idcrafter.data.validate")
        for error in errors:
            logger.warning("%s: dropping %s", path, error)
        if split is not None:
            samples = [s for s in samples if s.split == split]
        return cls(samples, *args, **kwargs)

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Changes the random clip starts (`clip_start="random"`) from one epoch to the next."""
        self.epoch = epoch

    # ------------------------------------------------------------------ buckets without decoding
    def _read_size_cache(self) -> dict[str, list]:
        if self.size_cache is None or not self.size_cache.is_file():
            return {}
        try:
            return json.loads(self.size_cache.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            logger.warning("ignoring unreadable size cache %s (%s)", self.size_cache, err)
            return {}

    @staticmethod
    def _stamp(path: Path) -> list[int]:
        stat = path.stat()
        return [stat.st_size, stat.st_mtime_ns]

    def _size(self, index: int) -> tuple[int, int]:
        """(height, width) of the sample's video or image from its header; FileFormatError if unreadable."""
        if index not in self._sizes:
            path = self.samples[index].media
            try:
                self._sizes[index] = media_size(path, is_video=self.samples[index].is_video)
            except FileFormatError as err:
                self._sizes[index] = None
                self._size_errors[index] = str(err)
        size = self._sizes[index]
        if size is None:
            raise FileFormatError(self._size_errors[index])
        return size

    def bucket_of(self, index: int) -> Bucket:
        """The sample's bucket, from the file header (cached); FileFormatError when it cannot be read."""
        return nearest_bucket(*self._size(index), self.buckets)

    def clip_frames(self, index: int) -> int:
        return self.num_frames if self.samples[index].is_video else 1

    def bucket_ids(self) -> list[tuple[int, int, int] | None]:
        """Per sample the batch-compatibility key (frames, height, width), or None when its header is
        unreadable (the sample is then counted in `failures` and left out of every batch)."""
        stored = self._read_size_cache()
        for index, sample in enumerate(self.samples):
            if index in self._sizes:
                continue
            key = str(sample.media)
            try:
                hit = stored.get(key)
                if hit is not None and hit[2:] == self._stamp(sample.media):
                    self._sizes[index] = (int(hit[0]), int(hit[1]))
            except OSError:
                pass
        keys: list[tuple[int, int, int] | None] = []
        for index, sample in enumerate(self.samples):
            try:
                bucket = self.bucket_of(index)
            except FileFormatError as err:
                self._fail(sample, str(err))
                keys.append(None)
                continue
            keys.append((self.clip_frames(index), bucket.height, bucket.width))
        if self.size_cache is not None:
            updated = dict(stored)
            for index, size in self._sizes.items():
                if size is not None:
                    path = self.samples[index].media
                    try:
                        updated[str(path)] = [size[0], size[1], *self._stamp(path)]
                    except OSError:
                        pass
            if updated != stored:
                with atomic_write(self.size_cache) as tmp:
                    tmp.write_text(json.dumps(updated), encoding="utf-8")
        return keys

    # ------------------------------------------------------------------ failures
    def _fail(self, sample: Sample, reason: str) -> None:
        self.num_failures += 1
        if sample.id in self.failures:
            return
        self.failures[sample.id] = reason
        logger.warning("skipping sample %r (manifest line %d): %s", sample.id, sample.line, reason)
        if self.failure_log is not None:
            record = json.dumps({"id": sample.id, "line": sample.line, "reason": reason}) + "\n"
            # one O_APPEND write per record: lines from several workers do not interleave
            fd = os.open(self.failure_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, record.encode("utf-8"))
            finally:
                os.close(fd)

    # ------------------------------------------------------------------ loading
    def _clip_start(self, index: int, source_fps: float) -> int:
        if self.clip_start == "first":
            return 0
        if index not in self._video_infos:
            self._video_infos[index] = probe_video(self.samples[index].video)
        info = self._video_infos[index]
        if info.num_frames <= 0:
            return 0
        last = max_clip_start(info.num_frames, source_fps, self.fps, self.num_frames)
        if last <= 0:
            return 0
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return int(rng.integers(0, last + 1))

    def _source_fps(self, sample: Sample) -> float:
        if sample.fps is not None:
            return sample.fps
        fps = probe_video(sample.video).fps
        if not fps:
            raise FileFormatError(f"video {sample.video}: the container gives no frame rate; set 'fps' in the manifest")
        return fps

    def _load_masks(
        self, sample: Sample, bucket: Bucket, size: tuple[int, int], frames: int, start: int, source_fps: float | None
    ) -> torch.Tensor | None:
        if not sample.has_masks:
            return None
        out = np.zeros((len(sample.subjects), frames, bucket.height, bucket.width), np.float32)
        for k, subject in enumerate(sample.subjects):
            if subject.mask is None:
                continue
            if is_video_path(subject.mask):
                if sample.is_video:
                    clip = load_clip(subject.mask, frames, self.fps, start, source_fps=source_fps)
                else:  # an image sample with a mask video: its first frame
                    clip = load_clip(subject.mask, 1, self.fps)
                values = _luminance(clip)  # [F, H, W]
            else:
                values = _mask_values(_load_image(subject.mask, "mask"))[None]  # [1, H, W]: every frame
            mh, mw = values.shape[-2:]
            if abs(math.log((mw / mh) / (size[1] / size[0]))) > 0.01:
                raise FileFormatError(
                    f"mask {subject.mask} is {mh}x{mw}, which does not match the {size[0]}x{size[1]} "
                    f"{'video' if sample.is_video else 'image'}'s aspect ratio"
                )
            binary = (values >= _MASK_THRESHOLD).astype(np.float32)
            crop = cover_crop_box(mh, mw, bucket)
            out[k] = apply_cover_crop(binary, crop) >= _MASK_THRESHOLD  # broadcasts one mask image over F
        return torch.from_numpy(out)

    def _load(self, index: int, sample: Sample) -> dict[str, Any]:
        if len(sample.subjects) > self.max_subjects:
            raise FileFormatError(f"{len(sample.subjects)} subjects, more than max_subjects={self.max_subjects}")
        size = self._size(index)
        bucket = nearest_bucket(*size, self.buckets)
        frames = self.clip_frames(index)
        n = len(sample.subjects)
        item: dict[str, Any] = {
            "id": sample.id,
            "prompt": sample.prompt,
            "categories": [s.category for s in sample.subjects],
            "descriptors": [s.descriptor for s in sample.subjects],
            "bucket": (bucket.height, bucket.width),
            "subject_mask": torch.ones(n, dtype=torch.bool),
            "subject_has_mask": torch.tensor([s.mask is not None for s in sample.subjects], dtype=torch.bool),
        }
        if self.cache is not None:
            cached = self.cache.get(sample.id)
            if cached is None and not self.load_pixels:
                raise FileFormatError(f"not in the feature cache {self.cache.folder}")
            item.update(cached or {})
        needs_fps = sample.is_video and (self.load_pixels or any(
            s.mask is not None and is_video_path(s.mask) for s in sample.subjects
        ))
        source_fps = self._source_fps(sample) if needs_fps else None
        start = self._clip_start(index, source_fps) if source_fps is not None else 0
        if self.load_pixels:
            clip = load_clip(sample.media, frames, self.fps, start, source_fps=source_fps, is_video=sample.is_video)
            clip = apply_cover_crop(clip, cover_crop_box(clip.shape[1], clip.shape[2], bucket))
            item["video"] = torch.from_numpy(clip).permute(3, 0, 1, 2).float() / 127.5 - 1.0
            rh, rw = self.ref_size
            item["refs"] = torch.stack(
                [media.image_to_tensor(media.fit_on_canvas(media.load_rgb(s.image), rh, rw)) for s in sample.subjects]
            )
        item["masks"] = self._load_masks(sample, bucket, size, frames, start, source_fps)
        return item

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        sample = self.samples[index]
        try:
            return self._load(index, sample)
        except FileFormatError as err:  # VideoTooShort included; every file problem arrives as FileFormatError
            self._fail(sample, str(err))
            return None


def _pad_stack(tensors: list[torch.Tensor], key: str) -> torch.Tensor:
    """Stack, zero-padding dim 0 to the longest; the other dims must agree."""
    first = tensors[0]
    if first.dim() == 0 or all(t.shape == first.shape for t in tensors):
        return torch.stack(tensors)
    if any(t.dim() != first.dim() or t.shape[1:] != first.shape[1:] for t in tensors):
        raise ValueError(f"collate: '{key}' shapes differ beyond dim 0: {[tuple(t.shape) for t in tensors]}")
    longest = max(t.shape[0] for t in tensors)
    out = tensors[0].new_zeros((len(tensors), longest, *tensors[0].shape[1:]))
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t
    return out


def collate(items: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Drop failed items (None), pad subjects to the batch's largest N; None when every item failed.

    Batch:
        ids: list[str]; prompts: list[str]; categories, descriptors: list[list]; bucket: (H, W);
        num_skipped: int, the failed items dropped from this batch;
        video: float32 [B, 3, F, H, W] (when pixels are loaded);
        refs: float32 [B, N_max, 3, rh, rw], zeros for padding subjects (when pixels are loaded);
        subject_mask: bool [B, N_max], True for real subjects;
        subject_has_mask: bool [B, N_max];
        masks: float32 [B, N_max, F, H, W] in {0, 1}, zeros where a sample or subject has no mask;
            None when no item of the batch has masks;
        has_masks: bool [B];
        plus each cached tensor stacked [B, ...] (dim 0 zero-padded where items differ).
    """
    kept = [item for item in items if item is not None]
    if not kept:
        return None
    buckets = {item["bucket"] for item in kept}
    if len(buckets) > 1:
        raise ValueError(f"collate: a batch mixes buckets {sorted(buckets)}; batch with BucketBatchSampler")
    n_max = max(len(item["subject_mask"]) for item in kept)
    batch: dict[str, Any] = {
        "ids": [item["id"] for item in kept],
        "prompts": [item["prompt"] for item in kept],
        "categories": [item["categories"] for item in kept],
        "descriptors": [item["descriptors"] for item in kept],
        "bucket": kept[0]["bucket"],
        "num_skipped": len(items) - len(kept),
        "subject_mask": _pad_stack([item["subject_mask"] for item in kept], "subject_mask"),
        "subject_has_mask": _pad_stack([item["subject_has_mask"] for item in kept], "subject_has_mask"),
        "has_masks": torch.tensor([item["masks"] is not None for item in kept], dtype=torch.bool),
    }
    for key in ("video", "refs"):
        present = [key in item for item in kept]
        if any(present) and not all(present):
            raise ValueError(f"collate: some items have '{key}' and some do not")
        if all(present):
            batch[key] = _pad_stack([item[key] for item in kept], key)
    with_masks = [item["masks"] for item in kept if item["masks"] is not None]
    if with_masks:
        _, frames, height, width = with_masks[0].shape
        masks = torch.zeros(len(kept), n_max, frames, height, width)
        for i, item in enumerate(kept):
            if item["masks"] is not None:
                masks[i, : item["masks"].shape[0]] = item["masks"]
        batch["masks"] = masks
    else:
        batch["masks"] = None
    extra = sorted({key for item in kept for key, value in item.items() if key not in _ITEM_KEYS})
    for key in extra:
        values = [item.get(key) for item in kept]
        if not all(isinstance(v, torch.Tensor) for v in values):
            raise ValueError(f"collate: '{key}' is missing or not a tensor in some items")
        batch[key] = _pad_stack(values, key)
    return batch


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of indices from one bucket each, shuffled from (seed, epoch), sharded across ranks.

    Each epoch: the indices of every bucket are shuffled and cut into batches, the batches are
    shuffled together, and rank r takes batches r, r + R, r + 2R, ... (R = num_replicas), so ranks
    never share a sample and every rank gets the same number of batches (with `drop_last` the
    remainder is dropped; without it, partial batches are kept and the batch list is padded by
    repeating its first batches). `skip_batches=k` starts the next iteration at this rank's
    batch k, exactly where a run stopped after k steps of this epoch; it applies to one
    iteration only, so later epochs start at 0. Samples whose key is None are left out.

    With `weights` (one per sample) an epoch is instead as many samples as there are usable ones,
    drawn with replacement with probability proportional to the weight (from (seed, epoch), so a
    resumed run draws the same), then batched by key the same way: resampling such as One-for-All's
    2:2:2:1 category balance.

    Args:
        dataset_or_bucket_ids: a dataset with `bucket_ids()` or one hashable key per sample.
    """

    def __init__(
        self,
        dataset_or_bucket_ids,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        drop_last: bool = True,
        skip_batches: int = 0,
        weights: Sequence[float] | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size} must be >= 1")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} must be in [0, num_replicas={num_replicas})")
        if skip_batches < 0 or seed < 0:
            raise ValueError(f"skip_batches {skip_batches} and seed {seed} must be >= 0")
        source = dataset_or_bucket_ids
        keys = source.bucket_ids() if hasattr(source, "bucket_ids") else list(source)
        self.groups: dict[Any, list[int]] = {}  # first-appearance order: deterministic
        for index, key in enumerate(keys):
            if key is not None:
                self.groups.setdefault(key, []).append(index)
        self.weights = None
        if weights is not None:
            weights = np.asarray(weights, dtype=np.float64)
            if weights.shape != (len(keys),) or not np.all(np.isfinite(weights)) or (weights < 0).any():
                raise ValueError(f"weights must be {len(keys)} finite non-negative numbers, one per sample")
            usable = [i for indices in self.groups.values() for i in indices]
            if weights[usable].sum() <= 0:
                raise ValueError("weights: the usable samples all have weight 0")
            self.weights, self._usable = weights, usable
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.drop_last = drop_last
        self.skip_batches = skip_batches
        self.epoch = 0
        self._cached: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self, epoch: int) -> list[list[int]]:
        """Every rank's batches of `epoch` in global order (batch j goes to rank j % num_replicas)."""
        rng = np.random.default_rng([self.seed, epoch])
        groups = self.groups
        if self.weights is not None:
            p = self.weights[self._usable] / self.weights[self._usable].sum()
            drawn = rng.choice(self._usable, size=len(self._usable), replace=True, p=p)
            key_of = {i: key for key, indices in self.groups.items() for i in indices}
            groups = {key: [] for key in self.groups}
            for i in drawn.tolist():
                groups[key_of[i]].append(i)
        batches: list[list[int]] = []
        for indices in groups.values():
            order = [indices[i] for i in rng.permutation(len(indices))]
            for begin in range(0, len(order), self.batch_size):
                chunk = order[begin : begin + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    batches.append(chunk)
        batches = [batches[i] for i in rng.permutation(len(batches))]
        remainder = len(batches) % self.num_replicas
        if remainder and self.drop_last:
            batches = batches[: len(batches) - remainder]
        elif remainder:
            batches += [batches[i % len(batches)] for i in range(self.num_replicas - remainder)]
        return batches

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """This rank's batches of `epoch` (default: the current one), from the start."""
        epoch = self.epoch if epoch is None else epoch
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self.global_batches(epoch)[self.rank :: self.num_replicas])
        return self._cached[1]

    def __iter__(self):
        skip, self.skip_batches = self.skip_batches, 0
        return iter(self.batches()[skip:])

    def __len__(self) -> int:
        return max(0, len(self.batches()) - self.skip_batches)
