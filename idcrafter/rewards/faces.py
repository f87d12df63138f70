"""Multi-ID face reward (docs/design.md 7): face embeddings per frame, Hungarian matching to the references.

    refs   [R, D]  = embedding of the largest face in each reference image
    dets_f [M_f, D] = embeddings of the faces detected in sampled frame f
    s_fk           = hungarian(cosine(refs, dets_f) clipped at 0)[k]             (0 where unmatched)
    R_face         = mean_f [(1 - alpha) mean_k s_fk + alpha min_k s_fk]          (alpha = 0.5)

R_face is ID-Crafter's eq. 7 (alpha weighs the worst subject; Tab. S.7 ablates 0 = mean only to
1 = min only and keeps 0.5) taken per frame and averaged over the sampled frames (App. A.2, eq.
S.12: the frame-level rewards averaged over the video). MultiCrafter's image reward uses the same
Hungarian multi-ID matching (w_id = 0.5 for people, supp. Sec. B); an image is one frame.

A backend only supplies boxes and embeddings; the matching is `idcrafter.rewards.identity`.
- `DlibFaceBackend`: dlib's HOG detector, 68-point landmarks and its ResNet face descriptor (128-d),
  weights from the `face-recognition-models` package: works offline on a CPU. dlib descriptors are
  trained for Euclidean distance, so their cosines are compressed: different people typically score
  0.8-0.9 and the same person 0.95-1. The ranking is right; the range is narrow.
- `InsightFaceBackend`: insightface's detector + ArcFace (the papers' choice; cosines of different
  people are near 0), from a model folder the user downloaded (`root`/models/`model_name`).

A reference without a detectable face scores 0 (and is left out of the matching, so it takes no
face from the others); a sampled frame without a face contributes 0 for every reference. Both are
counted in the warnings; neither raises nor gives NaN.
"""

from __future__ import annotations

import abc
import hashlib
import importlib.util
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from idcrafter.rewards.base import register_reward
from idcrafter.rewards.common import SubjectReward, check_alpha, check_frame_options, sample_frames
from idcrafter.rewards.identity import frame_identity_scores
from idcrafter.utils.deps import require

__all__ = ["DetectedFaces", "DlibFaceBackend", "FaceBackend", "FaceReward", "InsightFaceBackend", "make_face_backend"]


@dataclass
class DetectedFaces:
    """boxes: float32 [M, 4] as (x0, y0, x1, y1) pixels; embeddings: float32 [M, D]."""

    boxes: np.ndarray
    embeddings: np.ndarray

    def __len__(self) -> int:
        return len(self.boxes)

    def largest(self) -> int | None:
        """Index of the face with the largest box, None when there is none."""
        if len(self) == 0:
            return None
        b = self.boxes
        return int(np.argmax((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])))


class FaceBackend(abc.ABC):
    """Boxes and embeddings of the faces in an RGB image uint8 [H, W, 3]; loads its models lazily."""

    name = "face-backend"
    dim = 0

    @abc.abstractmethod
    def detect(self, image: np.ndarray) -> DetectedFaces:
        """Every face found: boxes [M, 4] (x0, y0, x1, y1) and unit embeddings [M, dim]."""

    def _empty(self) -> DetectedFaces:
        return DetectedFaces(np.zeros((0, 4), np.float32), np.zeros((0, self.dim), np.float32))


def face_recognition_models_dir() -> Path:
    """The weights folder of `face-recognition-models`, found without importing the package:
    its __init__ imports `pkg_resources`, which setuptools >= 81 no longer ships."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        require("face_recognition_models")  # raises the error naming the pip extra
    folder = Path(list(spec.submodule_search_locations)[0]) / "models"
    if not folder.is_dir():
        raise FileNotFoundError(f"face-recognition-models has no models folder at {folder}; reinstall it")
    return folder


class DlibFaceBackend(FaceBackend):
    """dlib: HOG frontal-face detector, 68-point shape predictor, ResNet descriptor (128-d). CPU only.

    Args:
        upsample: times the detector upsamples the image (1 finds faces down to about 40 px).
        num_jitters: descriptor re-samplings averaged (0 = one pass; 10 is 10x slower, slightly better).
    """

    name = "dlib"
    dim = 128

    def __init__(self, upsample: int = 1, num_jitters: int = 0):
        if int(upsample) < 0 or int(num_jitters) < 0:
            raise ValueError(f"DlibFaceBackend: upsample and num_jitters must be >= 0, got {upsample}, {num_jitters}")
        self.upsample, self.num_jitters = int(upsample), int(num_jitters)
        self._models = None

    def load(self):
        if self._models is None:
            dlib = require("dlib")
            folder = face_recognition_models_dir()
            self._models = (
                dlib,
                dlib.get_frontal_face_detector(),
                dlib.shape_predictor(str(folder / "shape_predictor_68_face_landmarks.dat")),
                dlib.face_recognition_model_v1(str(folder / "dlib_face_recognition_resnet_model_v1.dat")),
            )
        return self._models

    def detect(self, image: np.ndarray) -> DetectedFaces:
        dlib, detector, predictor, encoder = self.load()
        image = np.ascontiguousarray(image, dtype=np.uint8)
        rects = list(detector(image, self.upsample))
        if not rects:
            return self._empty()
        shapes = dlib.full_object_detections([predictor(image, r) for r in rects])
        embeddings = np.asarray(encoder.compute_face_descriptor(image, shapes, self.num_jitters), np.float32)
        h, w = image.shape[:2]
        boxes = np.array([[max(r.left(), 0), max(r.top(), 0), min(r.right(), w), min(r.bottom(), h)] for r in rects],
                         np.float32)
        return DetectedFaces(boxes, embeddings.reshape(len(rects), self.dim))


class InsightFaceBackend(FaceBackend):
    """insightface `FaceAnalysis` (detector + ArcFace, 512-d) from `root`/models/`model_name`; never downloads.

    Args:
        root: the insightface root folder (the one that holds models/), e.g. ~/.insightface.
        model_name: the model pack, a folder of .onnx files under root/models (antelopev2, buffalo_l, ...);
            FaceAnalysis calls it `name` (a word `build_reward` keeps for the reward's own name).
        device: "cuda[:i]" runs on the CUDA provider of onnxruntime, anything else on the CPU.
        det_size: detector input side; det_thresh: detection confidence threshold.
    """

    name = "insightface"
    dim = 512

    def __init__(self, root: str | Path | None = None, model_name: str = "antelopev2", device: str | torch.device = "cpu",
                 det_size: int = 640, det_thresh: float = 0.5):
        if root is None:
            raise ValueError("reward 'face': no root given; pass root=... (the insightface folder that holds "
                             f"models/{model_name}) or use backend='dlib'")
        folder = Path(root).expanduser() / "models" / model_name
        if not folder.is_dir() or not any(folder.glob("*.onnx")):
            raise ValueError(f"reward 'face': root={str(root)!r} has no insightface model pack at {folder} "
                             "(a folder of .onnx files); download it yourself, it is never fetched here")
        self.root, self.model_name, self.folder = str(Path(root).expanduser()), model_name, folder
        self.device = torch.device(device)
        self.det_size, self.det_thresh = int(det_size), float(det_thresh)
        self._app = None

    def load(self):
        if self._app is None:
            app_module = require("insightface.app", "face")
            cuda = self.device.type == "cuda"
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
            app = app_module.FaceAnalysis(name=self.model_name, root=self.root, providers=providers,
                                          allowed_modules=["detection", "recognition"])
            app.prepare(ctx_id=(self.device.index or 0) if cuda else -1, det_thresh=self.det_thresh,
                        det_size=(self.det_size, self.det_size))
            self._app = app
        return self._app

    def detect(self, image: np.ndarray) -> DetectedFaces:
        app = self.load()
        faces = [f for f in app.get(np.ascontiguousarray(np.asarray(image)[..., ::-1])) if f.embedding is not None]
        if not faces:
            return self._empty()
        boxes = np.array([f.bbox for f in faces], np.float32).reshape(len(faces), 4)
        embeddings = np.array([f.normed_embedding for f in faces], np.float32)
        return DetectedFaces(boxes, embeddings.reshape(len(faces), -1))


FACE_BACKENDS = {"dlib": DlibFaceBackend, "insightface": InsightFaceBackend}


def make_face_backend(backend: str | FaceBackend, device: str | torch.device = "cpu", **options) -> FaceBackend:
    """A backend by name ("dlib", "insightface") with its options, or the instance given."""
    if isinstance(backend, FaceBackend):
        if options:
            raise ValueError(f"reward 'face': options {sorted(options)} are for a backend by name, not an instance")
        return backend
    if backend not in FACE_BACKENDS:
        raise ValueError(f"reward 'face': backend must be one of {', '.join(FACE_BACKENDS)}, got {backend!r}")
    if backend == "insightface":
        options["device"] = device
    try:
        return FACE_BACKENDS[backend](**options)
    except TypeError as err:
        raise ValueError(f"reward 'face': bad option for backend {backend!r} ({err})") from None


@register_reward("face")
class FaceReward(SubjectReward):
    """Multi-ID face reward: per-reference face similarity under Hungarian matching, per sampled frame,
    R = mean_f [(1 - alpha) mean_k s_fk + alpha min_k s_fk] (ID-Crafter eq. 7 and S.12).

    Options: backend ("dlib" | "insightface" | a FaceBackend), alpha (weight of the worst subject,
    0.5; ID-Crafter Tab. S.7: 0 = mean only, 1 = min only), mode (the older name: "mean" = alpha 0,
    "mean_min" = 0.5, "min" = 1), stride / max_frames (frame sampling, see `sample_frames`), clip_min
    (similarity floor, 0), device, and the backend's own options (dlib: upsample, num_jitters;
    insightface: root, model_name, det_size, det_thresh).
    Components: face, face_mean (mean_f mean_k s_fk), face_min (mean_f min_k s_fk).
    """

    name = "face"

    def __init__(self, backend: str | FaceBackend = "dlib", alpha: float | None = None, mode: str | None = None,
                 stride: int = 1, max_frames: int | None = 8, clip_min: float = 0.0,
                 device: str | torch.device = "cpu", **backend_options):
        super().__init__(device)
        self.alpha = check_alpha(self.name, alpha, mode, default=0.5)
        self.stride, self.max_frames = check_frame_options(self.name, stride, max_frames)
        self.clip_min = float(clip_min)
        self.backend = make_face_backend(backend, device, **backend_options)
        # References repeat across the samples of a group (and across steps): embed each once.
        self._ref_cache: OrderedDict[str, np.ndarray | None] = OrderedDict()

    def reference_embedding(self, image: np.ndarray) -> np.ndarray | None:
        """Embedding [D] of the largest face in a reference, None when it has none."""
        image = np.ascontiguousarray(image)
        key = hashlib.sha1(image.tobytes() + str(image.shape).encode()).hexdigest()
        if key not in self._ref_cache:
            faces = self.backend.detect(image)
            best = faces.largest()
            self._ref_cache[key] = None if best is None else faces.embeddings[best]
            if len(self._ref_cache) > 256:
                self._ref_cache.popitem(last=False)
        return self._ref_cache[key]

    def sample_frame_scores(self, video: np.ndarray, refs: list[np.ndarray], warnings: Counter) -> np.ndarray:
        """Per-frame, per-reference scores [F, R] of one video uint8 [F, H, W, 3] (F: the sampled frames)."""
        frames = sample_frames(video, self.stride, self.max_frames)
        scores = np.zeros((len(frames), len(refs)), np.float64)
        if not refs:
            warnings["no reference images"] += 1
            return scores
        ref_emb = [self.reference_embedding(r) for r in refs]
        found = [k for k, e in enumerate(ref_emb) if e is not None]
        if len(found) < len(refs):
            warnings["no face in a reference"] += len(refs) - len(found)
        dets = []
        for frame in frames:
            faces = self.backend.detect(frame)
            if len(faces) == 0:
                warnings["no face in a frame"] += 1
            dets.append(faces.embeddings)
        if found:
            refs_matrix = np.stack([ref_emb[k] for k in found]).astype(np.float64)
            scores[:, found] = frame_identity_scores(refs_matrix, dets, self.clip_min)
        return scores

    def sample_scores(self, video: np.ndarray, refs: list[np.ndarray], warnings: Counter) -> np.ndarray:
        """Per-reference scores [R] of one video, averaged over the sampled frames."""
        scores = self.sample_frame_scores(video, refs, warnings)
        return scores.mean(0) if len(scores) else np.zeros(len(refs))

    def frame_scores(self, samples, prompts, refs, meta, warnings):
        return [self.sample_frame_scores(video, r, warnings) for video, r in zip(samples, refs)]
