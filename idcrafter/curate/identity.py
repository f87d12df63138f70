"""Identity verification: is a subject the same one in every frame and in its reference (docs/design.md 8.1)?

MultiCrafter (data preparation): faces are detected on the segmented portraits, embedded with a
face recognition model, and "by computing the cosine similarity between embeddings from the
reference and target frames, we enforce a stringent threshold to discard pairs where identity
cannot be confidently verified". `VerifyStage` does this per subject with the verifier of its
category: faces with `FaceVerifier` (the face reward's dlib / insightface backends), other things
with DINOv2 (`DinoVerifier`, idcrafter.curate.dino), toy sprites with ToyID
(`idcrafter.curate.toyworld.ToyVerifier`). A verifier maps crops to unit embeddings
(`verifier.embed(crops) -> (n, d)`, NaN rows where it finds nothing to embed).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from idcrafter.curate.core import Candidate, Dropped, Outcome, Stage, SubjectTrack, make_backend
from idcrafter.curate.references import shared_face_backend, subject_crop

__all__ = ["FaceVerifier", "VerifyStage", "subject_similarities", "view_positions"]


def __getattr__(name: str):
    # DinoVerifier lives with the other transformers models (idcrafter.curate.dino); imported on
    # first use so that verifying faces or toys never imports transformers.
    if name == "DinoVerifier":
        from idcrafter.curate.dino import DinoVerifier

        return DinoVerifier
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class FaceVerifier:
    """Verifier backend for people: the largest face in each crop, embedded by a face backend of
    the face reward (`idcrafter.rewards.faces`: "dlib", offline on a CPU, or "insightface",
    ArcFace from a local model folder), as unit rows; NaN rows for crops without a face.

    threshold: the default lowest cosine `VerifyStage` accepts. dlib's descriptors are trained
    for Euclidean distance, so their cosines are compressed (different people ~0.8-0.9, the same
    person ~0.95-1) and its threshold is high; ArcFace separates people near 0 and the same
    person above ~0.4.
    """

    THRESHOLDS = {"dlib": 0.93, "insightface": 0.4}

    def __init__(self, backend: str = "dlib", threshold: float | None = None, device: str = "cpu", **options):
        self.backend = shared_face_backend(backend, device, **options)
        self.threshold = float(threshold if threshold is not None else self.THRESHOLDS.get(backend, 0.5))

    def embed(self, crops: list[np.ndarray]) -> np.ndarray:
        """crops: (h, w, 3) uint8 -> (n, d) unit rows (largest face of each), NaN rows without a face."""
        out = np.full((len(crops), self.backend.dim), np.nan, np.float32)
        for i, crop in enumerate(crops):
            if crop is None or min(crop.shape[:2]) < 8:
                continue
            faces = self.backend.detect(np.ascontiguousarray(crop))
            best = faces.largest()
            if best is not None:
                e = faces.embeddings[best].astype(np.float64)
                out[i] = e / max(np.linalg.norm(e), 1e-12)
        return out


def view_positions(track: SubjectTrack, count: int) -> np.ndarray:
    """Up to `count` frame positions spread evenly over the frames where the subject is found
    (and its mask, if any, is not empty) -> int array, ascending."""
    ok = track.present()
    if track.masks is not None:
        ok = ok & track.masks.reshape(len(track.masks), -1).any(axis=1)
    where = np.flatnonzero(ok)
    if len(where) <= count:
        return where
    return where[np.unique(np.round(np.linspace(0, len(where) - 1, count)).astype(int))]


def subject_similarities(frames: np.ndarray, reference: np.ndarray | None) -> np.ndarray:
    """Cosines that decide a subject: frames (n, d) unit rows (NaN rows skipped), reference (d,)
    or None -> with a reference, the reference against each frame; without, every pair of frames."""
    frames = frames[~np.isnan(frames).any(axis=1)]
    if reference is not None and not np.isnan(reference).any():
        return frames @ reference
    if reference is not None:
        return np.zeros(0)
    sims = frames @ frames.T
    return sims[np.triu_indices(len(frames), k=1)]


class VerifyStage(Stage):
    """Drop a candidate when one of its subjects is not verifiably the same across its frames and
    its reference.

    Per subject, `frames` views spread over the clip are cut (masked subject on white, or the box
    without a mask) and embedded with the verifier of its category, with its reference (its face
    crop, for the face verifier) when the reference stage ran first. Scores: the reference against
    every view, else every pair of views. Kept when min >= threshold and mean >= mean_threshold;
    the subject records `identity` (the mean) and info["identity_min"].

    verifier: the backend for every category (a registered name or a built backend);
    verifiers: {category: name or backend} for categories that need another one (people: "face");
    options: {backend name: keyword options} for backends built here by name;
    threshold / mean_threshold: a number, or {category: number} with "*" for the rest (default:
    the verifier's own `threshold` attribute, else 0.5; mean_threshold defaults to threshold);
    min_views: embeddings needed (views + reference) to decide at all.
    Drops: "identity below threshold", "subject cannot be verified", "no verifier for the
    subject's category".
    """

    name = "verify"

    def __init__(self, verifier=None, verifiers: Mapping[str, object] | None = None,
                 options: Mapping[str, dict] | None = None, threshold: float | Mapping[str, float] | None = None,
                 mean_threshold: float | Mapping[str, float] | None = None, frames: int = 4, min_views: int = 2,
                 pad: float = 0.1, batch_size: int = 8, device: str = "cpu"):
        super().__init__()
        self.specs = dict(verifiers or {})
        if verifier is not None:
            self.specs.setdefault("*", verifier)
        if not self.specs:
            raise ValueError("verify: no verifier given (verifier=... or verifiers={category: ...})")
        self.options = {k: dict(v) for k, v in (options or {}).items()}
        self.threshold, self.mean_threshold = threshold, mean_threshold
        if int(frames) < 1 or int(min_views) < 2:
            raise ValueError(f"verify: frames must be >= 1 and min_views >= 2, got {frames}, {min_views}")
        self.frames, self.min_views, self.pad = int(frames), int(min_views), float(pad)
        self.batch_size, self.device = int(batch_size), device
        self.backends: dict[str, object] = {}  # category (or "*") -> built backend

    def setup(self) -> None:
        built: dict[str, object] = {}  # one instance per backend name
        for category, spec in self.specs.items():
            if isinstance(spec, str):
                if spec not in built:
                    built[spec] = make_backend("verifier", spec, device=self.device, **self.options.get(spec, {}))
                spec = built[spec]
            self.backends[category] = spec

    def key(self, category: str) -> str | None:
        """The category's entry in the verifiers ("*" when it has none of its own)."""
        return category if category in self.backends else ("*" if "*" in self.backends else None)

    @staticmethod
    def _setting(setting, key: str):
        if isinstance(setting, Mapping):
            setting = setting.get(key, setting.get("*"))
        return setting

    def thresholds(self, key: str) -> tuple[float, float]:
        """(min, mean) cosine thresholds for a verifiers entry."""
        low = self._setting(self.threshold, key)
        low = float(low if low is not None else getattr(self.backends[key], "threshold", 0.5))
        mean = self._setting(self.mean_threshold, key)
        return low, float(mean if mean is not None else low)

    def _views(self, c: Candidate, track: SubjectTrack, face: bool) -> tuple[list[np.ndarray | None], np.ndarray | None]:
        crops = []
        for t in view_positions(track, self.frames):
            mask = None if track.masks is None else track.masks[t]
            crops.append(subject_crop(c.frames[t], mask, track.boxes[t], self.pad))
        reference = track.face if face and track.face is not None else track.reference
        return crops, reference

    def process(self, batch: list[Candidate]) -> list[Outcome]:
        if not self._ready:  # called directly, not through `run`
            self.setup()
            self._ready = True
        # every crop of the batch for each backend in one call: models run on batches
        jobs: dict[int, tuple[object, list]] = {}  # id(backend) -> (backend, crops)
        plan = []  # per (candidate, subject): (verifiers key, backend id, slice of its views, reference row) or None
        for c in batch:
            for track in c.subjects:
                key = self.key(track.category)
                if key is None:
                    plan.append(None)
                    continue
                backend = self.backends[key]
                crops, reference = self._views(c, track, isinstance(backend, FaceVerifier))
                queue = jobs.setdefault(id(backend), (backend, []))[1]
                first = len(queue)
                queue.extend(crops)
                ref_at = None
                if reference is not None:
                    ref_at = len(queue)
                    queue.append(reference)
                plan.append((key, id(backend), slice(first, first + len(crops)), ref_at))
        embedded = {}
        for bid, (backend, crops) in jobs.items():
            keep = [i for i, x in enumerate(crops) if x is not None]
            rows = np.asarray(backend.embed([crops[i] for i in keep]), np.float32) if keep else np.zeros((0, 1), np.float32)
            out = np.full((len(crops), rows.shape[1]), np.nan, np.float32)
            out[keep] = rows
            embedded[bid] = out
        results, n = [], 0
        for c in batch:
            reason = None
            for track in c.subjects:
                entry, n = plan[n], n + 1
                if reason:
                    continue
                if entry is None:
                    reason = "no verifier for the subject's category"
                    continue
                key, bid, views, ref_at = entry
                rows = embedded[bid][views]
                reference = None if ref_at is None else embedded[bid][ref_at]
                found = int((~np.isnan(rows).any(axis=1)).sum()) + int(reference is not None and not np.isnan(reference).any())
                sims = subject_similarities(rows, reference)
                if found < self.min_views or not len(sims):
                    reason = "subject cannot be verified"
                    continue
                low, mean = self.thresholds(key)
                track.identity = float(sims.mean())
                track.info["identity_min"] = float(sims.min())
                if sims.min() < low or sims.mean() < mean:
                    reason = "identity below threshold"
            results.append(Dropped(c, reason) if reason else c)
        return results
