"""On-disk cache of encoder outputs, so training need not run the VAE and text encoders every step.

Layout of a cache folder:

    index.json                  {"format", "version", "fingerprint", "samples": {id: {"shard", "slot", "keys"}}}
    shard-00000.safetensors     up to `shard_size` samples; tensor "<slot>.<key>" of sample <slot>
    index-<writer>.json         one index per extra writer (e.g. one per rank when building in parallel)
    shard-<writer>-00000.safetensors

Typical keys: `latents` (VAE latents of the clip [C, t, h, w]), `ref_latents` ([N, C, 1, h', w']),
`text_states`, and with a VLM its states [L, D] and masks [L] of the three inputs training's
condition dropout needs: `vlm_states` / `vlm_mask` (prompt and references), `vlm_ref_states` /
`vlm_ref_mask` (references, empty prompt) and `vlm_text_states` / `vlm_text_mask` (prompt, no
images). The `fingerprint` (see `cache_fingerprint`) records the settings the features were made
with; opening a cache with a different fingerprint is refused, so latents made at another frame
count, bucket set or encoder are never trained on by mistake. `stored_encoders` reads a folder's
record without torch, for checks before anything loads.

Writes are atomic: a shard is renamed into place before the index that names it, and the index
is replaced by rename, so a crash leaves at worst an unreferenced shard, never a dangling index.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from idcrafter.data.buckets import Bucket
from idcrafter.utils.errors import FileFormatError
from idcrafter.utils.io import atomic_write
from idcrafter.utils.logging import get_logger

if TYPE_CHECKING:
    import torch

__all__ = ["CACHE_KEYS", "CacheMismatchError", "FeatureCache", "build_cache", "cache_fingerprint", "stored_encoders"]

logger = get_logger(__name__)

CACHE_KEYS = ("latents", "ref_latents", "text_states", "text_mask", "vlm_states", "vlm_mask", "vlm_ref_states",
              "vlm_ref_mask", "vlm_text_states", "vlm_text_mask")
FORMAT = "idcrafter-feature-cache"
VERSION = 1
_WRITER = re.compile(r"^[A-Za-z0-9_.-]+$")


class CacheMismatchError(FileFormatError):
    """The cache on disk was built with other settings (its fingerprint differs)."""


def cache_fingerprint(
    encoders: Mapping[str, str] | Sequence[str],
    num_frames: int,
    buckets: Bucket | Iterable[Bucket],
    ref_size: tuple[int, int],
    **extra: Any,
) -> str:
    """A canonical string naming everything the cached tensors depend on.

    >>> cache_fingerprint({"vae": "Wan2.1-VAE"}, 81, Bucket(480, 832), (480, 480))
    '{"buckets":["480x832"],"encoders":{"vae":"Wan2.1-VAE"},"num_frames":81,"ref_size":[480,480]}'
    """
    buckets = [buckets] if isinstance(buckets, Bucket) else list(buckets)
    record = {
        "encoders": dict(encoders) if isinstance(encoders, Mapping) else list(encoders),
        "num_frames": int(num_frames),
        "buckets": [str(b) for b in buckets],
        "ref_size": [int(s) for s in ref_size],
        **extra,
    }
    return json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)


def stored_encoders(folder: str | os.PathLike) -> dict | None:
    """The `encoders` record of the fingerprint a cache folder was built with, or None when the
    folder holds no index yet. Reads JSON only (no torch), so scripts check it before loading."""
    for path in FeatureCache.index_files(Path(folder)):
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
            record = json.loads(index["fingerprint"])
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise FileFormatError(f"feature cache index {path} cannot be read ({err.__class__.__name__}: {err})") from None
        encoders = record.get("encoders") if isinstance(record, dict) else None
        return dict(encoders) if isinstance(encoders, dict) else {}
    return None


class FeatureCache:
    """Per-sample tensors in safetensors shards, keyed by sample id, guarded by a fingerprint.

    Args:
        folder: the cache folder (created on the first flush).
        fingerprint: the settings this run needs; None adopts what the folder holds (reading only;
            writing needs a fingerprint). A different stored fingerprint raises `CacheMismatchError`.
        shard_size: samples per shard file; `put` flushes when the buffer reaches it.
        writer: a name for this writer's index and shards, so several processes (ranks) can fill
            one folder at once without touching each other's files; readers merge all indexes.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        fingerprint: str | None = None,
        shard_size: int = 256,
        writer: str | None = None,
    ):
        if shard_size < 1:
            raise ValueError(f"shard_size {shard_size} must be >= 1")
        if writer is not None and not _WRITER.match(writer):
            raise ValueError(f"writer {writer!r}: use letters, digits, '_', '.', '-' only")
        self.folder = Path(folder)
        self.shard_size = shard_size
        self.writer = writer
        self.fingerprint = fingerprint
        self._buffer: dict[str, dict[str, torch.Tensor]] = {}
        self._own: dict[str, dict] = {}
        self._entries: dict[str, dict] = {}
        self.reload()

    # ------------------------------------------------------------------ index
    @property
    def index_path(self) -> Path:
        return self.folder / ("index.json" if self.writer is None else f"index-{self.writer}.json")

    @staticmethod
    def index_files(folder: Path) -> list[Path]:
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if re.fullmatch(r"index(-[A-Za-z0-9_.-]+)?\.json", p.name))

    def _index_files(self) -> list[Path]:
        return self.index_files(self.folder)

    def reload(self) -> None:
        """Re-read every index in the folder (e.g. after other writers finished)."""
        entries: dict[str, dict] = {}
        for path in self._index_files():
            try:
                index = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as err:
                raise FileFormatError(f"feature cache index {path} cannot be read ({err})") from None
            if not isinstance(index, dict) or index.get("format") != FORMAT:
                raise FileFormatError(f"{path} is not a feature cache index")
            if index.get("version") != VERSION:
                raise FileFormatError(f"{path}: cache format version {index.get('version')}, this code reads {VERSION}")
            stored = index.get("fingerprint")
            if self.fingerprint is None:
                self.fingerprint = stored
            elif stored != self.fingerprint:
                raise CacheMismatchError(
                    f"feature cache {self.folder} was built with other settings: {path.name} has fingerprint "
                    f"{stored}, this run needs {self.fingerprint}; rebuild the cache or use another folder"
                )
            samples = index.get("samples", {})
            entries.update(samples)
            if path == self.index_path:
                self._own = dict(samples)
        self._entries = entries

    def _write_index(self) -> None:
        index = {"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint, "samples": self._own}
        with atomic_write(self.index_path) as tmp:
            tmp.write_text(json.dumps(index, indent=0, sort_keys=True), encoding="utf-8")

    def _next_shard_name(self) -> str:
        prefix = "shard-" if self.writer is None else f"shard-{self.writer}-"
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.safetensors")
        taken = [int(m.group(1)) for p in self.folder.iterdir() if (m := pattern.fullmatch(p.name))]
        return f"{prefix}{max(taken, default=-1) + 1:05d}.safetensors"

    # ------------------------------------------------------------------ access
    def put(self, sample_id: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Buffer one sample's tensors (moved to CPU); a full buffer is flushed to a new shard."""
        if self.fingerprint is None:
            raise ValueError(f"FeatureCache({self.folder}): give a fingerprint before writing to a new cache")
        if not isinstance(sample_id, str) or not sample_id:
            raise ValueError(f"sample id must be a non-empty string, got {sample_id!r}")
        import torch

        stored = {}
        for key, value in tensors.items():
            if not isinstance(key, str) or not isinstance(value, torch.Tensor):
                raise TypeError(f"sample {sample_id!r}: tensors must map str -> torch.Tensor, got {key!r}")
            # clone: safetensors refuses tensors that share storage, and the caller may reuse its buffers
            stored[key] = value.detach().to("cpu", copy=True).contiguous()
        self._buffer[sample_id] = stored
        if len(self._buffer) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the buffered samples as one shard, then the index that names it (both atomically)."""
        if not self._buffer:
            return
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        name = self._next_shard_name()
        flat: dict[str, torch.Tensor] = {}
        entries: dict[str, dict] = {}
        for slot, (sample_id, tensors) in enumerate(self._buffer.items()):
            for key, value in tensors.items():
                flat[f"{slot}.{key}"] = value
            entries[sample_id] = {"shard": name, "slot": slot, "keys": sorted(tensors)}
        with atomic_write(self.folder / name) as tmp:
            save_file(flat, str(tmp), metadata={"fingerprint": self.fingerprint or ""})
        self._own.update(entries)
        self._write_index()
        self._entries.update(entries)
        self._buffer.clear()

    def get(self, sample_id: str) -> dict[str, torch.Tensor] | None:
        """The stored tensors of `sample_id` (buffered ones included), or None when absent."""
        if sample_id in self._buffer:
            return dict(self._buffer[sample_id])
        entry = self._entries.get(sample_id)
        if entry is None:
            return None
        from safetensors import safe_open

        path = self.folder / entry["shard"]
        try:
            with safe_open(str(path), framework="pt") as f:
                return {key: f.get_tensor(f"{entry['slot']}.{key}") for key in entry["keys"]}
        except Exception as err:  # a deleted or damaged shard: name it
            raise FileFormatError(f"feature cache shard {path} cannot be read ({err.__class__.__name__}: {err})") from None

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self._buffer or sample_id in self._entries

    def __len__(self) -> int:
        return len(self._entries.keys() | self._buffer.keys())

    def ids(self) -> list[str]:
        return sorted(self._entries.keys() | self._buffer.keys())

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.flush()

    def __getstate__(self) -> dict:
        # DataLoader workers get a reader: unflushed tensors stay with the process that wrote them.
        state = self.__dict__.copy()
        state["_buffer"] = {}
        return state

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.folder)!r}, samples={len(self)}, fingerprint={self.fingerprint!r})"


def _identity(item):
    return item


def build_cache(
    dataset,
    encode_fn: Callable[[dict], Mapping[str, torch.Tensor]],
    cache: FeatureCache,
    num_workers: int = 0,
    skip_existing: bool = True,
    progress: bool = True,
) -> dict[str, int]:
    """Encode every sample of `dataset` with `encode_fn(item) -> {name: tensor}` and store it in `cache`.

    `dataset` yields item dicts with an "id" (or None for a sample that failed to decode, which is
    skipped and counted, see `VideoDataset.failures`); it should load pixels (no cache of its own).
    Samples already in the cache are skipped without decoding when `skip_existing`, so an
    interrupted build resumes. Returns counts: written, existing, failed.
    """
    import torch
    from torch.utils.data import DataLoader, Subset
    from tqdm.auto import tqdm

    samples = getattr(dataset, "samples", None)
    indices = list(range(len(dataset)))
    existing = 0
    if skip_existing and samples is not None:
        todo = [i for i in indices if samples[i].id not in cache]
        existing = len(indices) - len(todo)
        indices = todo
    loader = DataLoader(
        Subset(dataset, indices), batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=_identity
    )
    written = failed = 0
    for item in tqdm(loader, total=len(indices), desc="caching features", disable=not progress):
        if item is None:
            failed += 1
            continue
        if skip_existing and samples is None and item["id"] in cache:
            existing += 1
            continue
        with torch.no_grad():
            tensors = encode_fn(item)
        cache.put(item["id"], tensors)
        written += 1
    cache.flush()
    logger.info("feature cache %s: %d written, %d already there, %d failed", cache.folder, written, existing, failed)
    return {"written": written, "existing": existing, "failed": failed}
