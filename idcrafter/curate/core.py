"""What flows through curation and how a stage is shaped (docs/design.md 8.1).

An input video becomes one `Candidate` (the decode stage); stages split it (shots, clip windows),
fill it in (detections, masks, identity scores, references, captions) or drop it with a reason.
A stage maps a batch of candidates to a list of outcomes, each a `Candidate` (kept, possibly one
of several made from an input) or a `Dropped` (the input and why). The funnel counts, per stage,
what came in, what went out and why the rest was dropped; the report is built from it.

Stages are small classes with one job, a `name`, and models loaded lazily (`setup`, called once
before the first batch, on the run's device), so a run that drops everything early never loads a
detector. Frames are uint8 RGB arrays (T, H, W, 3); boxes are pixel [x0, y0, x1, y1] in frame
coordinates; masks are bool (T, H, W).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

__all__ = ["BACKENDS", "STAGES", "Candidate", "Detection", "Dropped", "Funnel", "Outcome", "Stage", "SubjectTrack",
           "load_local_model", "make_backend", "make_stage", "run_stages"]


@dataclass
class SubjectTrack:
    """One subject followed through a candidate's frames.

    boxes: (T, 4) float pixel boxes, NaN rows where the subject is not found in that frame.
    scores: (T,) detector confidence, 0 where not found.
    masks: (T, H, W) bool once segmented.
    identity: the verification score (cosine similarity of the subject across frames / to its
        reference) once verified.
    reference: (h, w, 3) uint8, the reference image (subject on white), and the frame index in the
        source video it was cut from (never a frame of the training target).
    """

    category: str
    boxes: np.ndarray
    scores: np.ndarray
    masks: np.ndarray | None = None
    keypoints: np.ndarray | None = None
    identity: float | None = None
    reference: np.ndarray | None = None
    reference_frame: int | None = None
    face: np.ndarray | None = None
    descriptor: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def present(self) -> np.ndarray:
        """(T,) bool: frames where the subject was found."""
        return ~np.isnan(self.boxes).any(axis=1)


@dataclass
class Candidate:
    """A clip on its way to becoming a sample.

    source: the input video; key: unique and stable across reruns (input hash, shot, window), the
    sample id; start / end: its frame range [start, end) in the source at the source's `fps`;
    frames: (T, H, W, 3) uint8 as sampled for training (`frame_indices` are their source indices);
    context: frames outside the clip that references may be cut from, by source index.
    """

    source: str
    key: str
    fps: float
    start: int = 0
    end: int = 0
    frames: np.ndarray | None = None
    frame_indices: np.ndarray | None = None
    context: dict[int, np.ndarray] = field(default_factory=dict)
    subjects: list[SubjectTrack] = field(default_factory=list)
    prompt: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the frames."""
        return tuple(self.frames.shape[1:3]) if self.frames is not None else tuple(self.info.get("size", (0, 0)))


@dataclass
class Dropped:
    """An input a stage did not keep: the candidate (or source path) and a short reason."""

    item: Candidate | str
    reason: str
    stage: str = ""


Outcome = Candidate | Dropped


class Stage:
    """One curation step. Subclasses set `name` and implement `process`; models load in `setup`.

    `batch_size` candidates go through `process` at a time; `process` returns, for the batch, the
    candidates it keeps (one input may give several) and a `Dropped` for each input it does not.
    """

    name: ClassVar[str] = "stage"
    batch_size: int = 1

    def __init__(self) -> None:
        self._ready = False
        self.device = "cpu"

    def setup(self) -> None:
        """Load models (from local paths) onto `self.device`; called once, before the first batch."""

    def process(self, batch: list[Candidate]) -> list[Outcome]:
        raise NotImplementedError

    def run(self, items: Sequence[Candidate], funnel: Funnel | None = None) -> list[Candidate]:
        """All of `items` through `process` in batches; the survivors, with the funnel updated."""
        kept: list[Candidate] = []
        started = time.perf_counter()
        if items and not self._ready:
            self.setup()
            self._ready = True
        drops: list[Dropped] = []
        for i in range(0, len(items), max(1, self.batch_size)):
            for out in self.process(list(items[i:i + self.batch_size])):
                if isinstance(out, Dropped):
                    out.stage = out.stage or self.name
                    drops.append(out)
                else:
                    kept.append(out)
        if funnel is not None:
            funnel.add(self.name, len(items), kept, drops, time.perf_counter() - started)
        return kept


@dataclass
class Funnel:
    """Per stage: candidates in, kept, dropped by reason, seconds spent (in stage order)."""

    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    drops: list[Dropped] = field(default_factory=list)

    def add(self, stage: str, n_in: int, kept: Sequence[Candidate], drops: Sequence[Dropped], seconds: float) -> None:
        row = self.stages.setdefault(stage, {"in": 0, "kept": 0, "dropped": Counter(), "seconds": 0.0})
        row["in"] += n_in
        row["kept"] += len(kept)
        row["dropped"].update(d.reason for d in drops)
        row["seconds"] += seconds
        self.drops.extend(drops)

    def merge(self, other: dict[str, dict[str, Any]]) -> None:
        """Add the counts of another funnel's `as_dict()` (another input, another rank)."""
        for stage, row in other.items():
            mine = self.stages.setdefault(stage, {"in": 0, "kept": 0, "dropped": Counter(), "seconds": 0.0})
            mine["in"] += row["in"]
            mine["kept"] += row["kept"]
            mine["dropped"].update(row["dropped"])
            mine["seconds"] += row["seconds"]

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {s: {"in": r["in"], "kept": r["kept"], "dropped": dict(sorted(r["dropped"].items())),
                    "seconds": round(r["seconds"], 4)} for s, r in self.stages.items()}


def run_stages(stages: Iterable[Stage], items: Sequence[Candidate], funnel: Funnel | None = None) -> list[Candidate]:
    """`items` through every stage in order; the candidates that survive them all."""
    for stage in stages:
        items = stage.run(items, funnel)
        if not items:
            break
    return list(items)


@dataclass
class Detection:
    """One detected subject in one frame: pixel box [x0, y0, x1, y1], confidence, category word."""

    box: np.ndarray
    score: float
    category: str


# Stage names (as presets and config files spell them) -> "module:Class". Imported on use, so a
# preset only imports the models it runs.
STAGES = {
    "probe": "idcrafter.curate.probe:ProbeStage",  # decode and probe; drops unreadable / short / small
    "shots": "idcrafter.curate.shots:ShotStage",  # PySceneDetect content detector, clip windows
    "blur": "idcrafter.curate.filters:BlurFilter",  # variance of the Laplacian
    "motion": "idcrafter.curate.filters:MotionFilter",  # optical flow: drop static and chaotic
    "aesthetic": "idcrafter.curate.filters:AestheticFilter",  # optional, on sampled frames
    "detect": "idcrafter.curate.detect:DetectStage",  # Detector backend + tracking into SubjectTracks
    "keypoints": "idcrafter.curate.detect:KeypointStage",  # optional ViTPose for people
    "segment": "idcrafter.curate.segment:SegmentStage",  # Segmenter backend, largest component
    "verify": "idcrafter.curate.identity:VerifyStage",  # faces / DINOv2 / toy: same subject across frames
    "references": "idcrafter.curate.references:ReferenceStage",  # refs from frames outside the target
    "caption": "idcrafter.curate.captions:CaptionStage",  # prompt + item descriptors
}

# Model backends by kind and name -> "module:Class"; every class is built from keyword options
# (a local model path, thresholds, device) and loads its model lazily.
#   detector.detect(frames (N, H, W, 3) uint8, categories) -> per frame list[Detection]
#   segmenter.segment(frames (N, H, W, 3), boxes per frame (k, 4)) -> per frame (k, H, W) bool
#   verifier.embed(crops: list of (h, w, 3) uint8) -> (n, d) unit rows, NaN rows where nothing to embed
#   captioner.caption(candidate) -> (prompt, descriptors: one str | None per subject)
BACKENDS = {
    "detector": {"grounding-dino": "idcrafter.curate.detect:GroundingDinoDetector",
                 "toyworld": "idcrafter.curate.toyworld:ToyDetector"},
    "segmenter": {"sam": "idcrafter.curate.segment:SamSegmenter",
                  "toyworld": "idcrafter.curate.toyworld:ToySegmenter"},
    "verifier": {"face": "idcrafter.curate.identity:FaceVerifier",
                 "dinov2": "idcrafter.curate.identity:DinoVerifier",
                 "toyworld": "idcrafter.curate.toyworld:ToyVerifier"},
    "captioner": {"qwen2.5-vl": "idcrafter.curate.captions:QwenCaptioner",
                  "template": "idcrafter.curate.captions:TemplateCaptioner",
                  "toyworld": "idcrafter.curate.toyworld:ToyCaptioner"},
}


def _load(target: str):
    import importlib

    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def make_stage(name: str, **options) -> Stage:
    """The stage registered as `name`, built with `options`."""
    if name not in STAGES:
        raise ValueError(f"unknown curation stage {name!r}; known: {', '.join(STAGES)}")
    return _load(STAGES[name])(**options)


def make_backend(kind: str, name: str, **options):
    """The `kind` backend registered as `name` (see BACKENDS), built with `options`."""
    known = BACKENDS[kind]
    if name not in known:
        raise ValueError(f"unknown {kind} backend {name!r}; known: {', '.join(known)}")
    return _load(known[name])(**options)


def load_local_model(model_class, path: Path, what: str, dtype: str | None, device: str):
    """`model_class.from_pretrained(path)` in eval mode on `device`, never downloading:
    FileNotFoundError naming `what` when `path` has no config.json. dtype: a torch dtype name or None
    (float32)."""
    import torch

    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{what} folder {str(path)!r} has no config.json (models are never downloaded)")
    dtype = getattr(torch, dtype) if dtype else torch.float32
    return model_class.from_pretrained(path, dtype=dtype, local_files_only=True).to(device).eval()
