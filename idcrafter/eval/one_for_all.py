"""One-for-All's image table (`--protocol one-for-all`): FaceSim, FashionCLIP-I, FashionCLIP-T and DINO.

One-for-All (Sec. 4.1 "Evaluation data and metrics", App. D) scores each generated image against its
references (a face and garments or a bag, each with a category: face, upper, lower, dress, bag) and
its prompt. Its evaluation code is not public; the recipe below follows App. D's definitions, and
every choice the paper leaves open is stated here. GME-I / GME-T are computed elsewhere.

FaceSim ("a pre-trained face recognition model (fal, 2024)": fal's AuraFace-v1, an ArcFace-type
  insightface model pack, glintr100 + SCRFD). The face references are those whose category is a
  face or a person (`is_face_category`); each one's embedding is that of the largest face detected
  in it. In the output, the largest face is compared with the reference (cosine, not clipped);
  several face references are matched one-to-one with the output's faces by the Hungarian algorithm.
  A reference without a detectable face is left out; an output without a face scores 0 for each
  reference; both are counted in the warnings. A sample without a face reference has no value.
  `facesim.backend=insightface facesim.root=DIR` (the folder holding models/auraface, or another pack by
  `facesim.model_name`) is the paper's model; `facesim.backend=dlib` substitutes dlib's ResNet descriptor
  (its cosines are compressed to about 0.8-1; the ranking holds, the numbers are not comparable).

FashionCLIP-I and DINO ("average subject consistency ... based on FashionCLIP / DINO and
  GroundingDINO"): for each subject reference r (garments and bags; face references too with
  `faces=true`), Grounding-DINO is run on the output with r's category as its text ("upper" reads
  "upper garment"), the best-scoring box above `box_threshold` is cropped, and the crop's
  embedding is compared with r's (cosine). References sharing a category take that many boxes,
  matched one-to-one by the Hungarian algorithm. A reference whose subject is not found scores 0
  (counted in the warnings): a missing garment is a consistency failure, and leaving it out would
  reward a model that drops subjects. The sample's value is the mean over its subject references;
  a sample without one has no value. FashionCLIP is a CLIP ViT-B/32 (transformers `CLIPModel`,
  image embeddings after the projection); DINO is DINOv2 (`Dinov2Model`, the layer-normed CLS token).

FashionCLIP-T ("text-image consistency with a focus on fashion-related attributes, i.e., clothing
  descriptions"): the cosine of the whole output's FashionCLIP embedding with each clothing
  description, averaged. The descriptions are the manifest's `descriptor` of each non-face reference
  (One-for-All's item descriptions, App. C); a sample without any falls back to its full prompt
  (descriptor markup removed), counted in the warnings. CLIP reads at most 77 tokens.

A video (not the paper's case) is scored on up to `MAX_FRAMES` evenly spaced frames and averaged.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "DETECTION_TEXT",
    "FACE_CATEGORIES",
    "MAX_FRAMES",
    "FaceSimScorer",
    "GroundedSimilarity",
    "build_dino",
    "build_face",
    "build_fashionclip",
    "category_key",
    "clothing_texts",
    "detection_text",
    "face_references",
    "grounded_scores",
    "is_face_category",
    "scored_frames",
    "subject_references",
]

MAX_FRAMES = 8
# Category words that name a person's face (One-for-All's "face"; OpenS2V's man / woman / ... labels).
FACE_CATEGORIES = frozenset({"face", "person", "human", "man", "woman", "boy", "girl", "people", "child"})
# What Grounding-DINO reads for a category: One-for-All's garment slots are not words it knows alone.
DETECTION_TEXT = {"upper": "upper garment", "lower": "lower garment", "upper_garment": "upper garment",
                  "lower_garment": "lower garment"}


def category_key(category: str) -> str:
    """'Upper Garment.' -> 'upper garment' (lower case, single spaces, no final period)."""
    return " ".join(str(category).lower().split()).rstrip(".").strip()


def is_face_category(category: str) -> bool:
    return category_key(category) in FACE_CATEGORIES


def detection_text(category: str) -> str:
    """The Grounding-DINO text of a category: 'upper' -> 'upper garment', 'bag' -> 'bag'."""
    key = category_key(category)
    return DETECTION_TEXT.get(key.replace(" ", "_"), key) or "object"


def face_references(categories: Sequence[str]) -> list[int]:
    """Indices of the face references."""
    return [k for k, c in enumerate(categories) if is_face_category(c)]


def subject_references(categories: Sequence[str], faces: bool = False) -> list[int]:
    """Indices of the references FashionCLIP-I / DINO score: the non-face ones, or all with `faces`."""
    return [k for k, c in enumerate(categories) if faces or not is_face_category(c)]


def scored_frames(frames: np.ndarray, max_frames: int = MAX_FRAMES) -> np.ndarray:
    """uint8 [F, H, W, 3] -> the frames scored: all of them up to `max_frames`, else that many evenly
    spaced (np.linspace truncated to int); an image is its one frame."""
    frames = np.asarray(frames)
    if len(frames) <= max_frames:
        return frames
    return frames[np.linspace(0, len(frames) - 1, max_frames).astype(int)]


def clothing_texts(prompt: str, categories: Sequence[str], descriptors: Sequence[str | None]) -> tuple[list[str], bool]:
    """FashionCLIP-T's texts -> (texts, from_descriptors): the descriptors of the non-face references,
    or, when there is none, the prompt with any `<category>...</category>` markup removed."""
    texts = [d.strip() for k, d in enumerate(descriptors)
             if d and d.strip() and k < len(categories) and not is_face_category(categories[k])]
    if texts:
        return texts, True
    from idcrafter.core.categories import parse_descriptor_markup

    try:
        clean, _ = parse_descriptor_markup(prompt)
    except ValueError:  # '<' used as ordinary text, or tags of other categories: keep the prompt as written
        clean = prompt
    return [clean], False


def grounded_scores(similarity: np.ndarray) -> np.ndarray:
    """References of one category x the crops found for it: cosine float [R, M] -> per-reference
    scores [R]: the Hungarian one-to-one matching (maximum total cosine, not clipped), 0 for a
    reference left without a crop (M < R). With R = 1 it is the cosine with the best box's crop."""
    from idcrafter.rewards.identity import hungarian_identity_scores

    return np.asarray(hungarian_identity_scores(np.asarray(similarity, np.float64), clip_min=None), np.float64)


class GroundedSimilarity:
    """FashionCLIP-I / DINO of one sample: Grounding-DINO crops of the output vs the references.

    Args:
        detector: `idcrafter.rewards.nexus.GroundingDINODetector`.
        embedder: `idcrafter.rewards.clip.CLIPEmbedder` or `DINOEmbedder` (unit embeddings).
        faces: score the face references too.
    """

    def __init__(self, detector, embedder, faces: bool = False, max_frames: int = MAX_FRAMES):
        self.detector, self.embedder = detector, embedder
        self.faces, self.max_frames = bool(faces), int(max_frames)
        self.warnings: Counter = Counter()

    def frame_scores(self, frame: np.ndarray, refs: Sequence[np.ndarray], categories: Sequence[str],
                     ref_emb) -> np.ndarray:
        """One output frame uint8 [H, W, 3] -> float [R] scores of the references given (all scored)."""
        from idcrafter.rewards.identity import cosine_similarity_matrix
        from idcrafter.rewards.nexus import crop_box

        texts = [detection_text(c) for c in categories]
        scores = np.zeros(len(refs), np.float64)
        for text in dict.fromkeys(texts):
            members = [k for k, t in enumerate(texts) if t == text]
            # One Grounding-DINO call per category, with that category alone as the text (App. D's crops).
            boxes, _ = self.detector.detect([frame], {text: len(members)})[0][text]
            if len(boxes) < len(members):
                self.warnings["subject not found in the output (scores 0)"] += len(members) - len(boxes)
            if len(boxes) == 0:
                continue
            crops = self.embedder.images([crop_box(frame, b) for b in boxes])
            sim = cosine_similarity_matrix(ref_emb[members].double(), crops.double()).numpy()
            scores[members] = grounded_scores(sim)
        return scores

    def __call__(self, item, frames: np.ndarray) -> float | None:
        """mean over frames and subject references; None without a subject reference."""
        chosen = subject_references(item.categories, self.faces) if item.categories else list(range(len(item.refs)))
        if not chosen:
            return None
        refs = [item.refs[k] for k in chosen]
        categories = [item.categories[k] if item.categories else "object" for k in chosen]
        ref_emb = self.embedder.images(list(refs))
        per_frame = [self.frame_scores(f, refs, categories, ref_emb).mean() for f in scored_frames(frames, self.max_frames)]
        return float(np.mean(per_frame))


def _check_model_type(path, expected: str, option: str) -> None:
    """ValueError unless the folder's config names `expected` (transformers loads another architecture's
    folder with freshly initialised weights and only a warning: the scores would be noise)."""
    from transformers import AutoConfig

    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{option}={path}: no config.json (a transformers folder saved with save_pretrained)")
    try:
        kind = AutoConfig.from_pretrained(str(path), local_files_only=True).model_type
    except ValueError:  # a config.json without a known model_type
        kind = "unknown"
    if kind != expected:
        raise ValueError(f"{option}={path}: a {kind} model folder, expected {expected}")


GROUNDED_OPTIONS = ("path", "detector", "box_threshold", "faces", "dtype")


def _check_options(options: Mapping[str, object], column: str) -> None:
    """ValueError for an option the column model does not take (a typo would silently use the default)."""
    unknown = sorted(set(options) - set(GROUNDED_OPTIONS))
    if unknown:
        raise ValueError(f"unknown option {column}.{unknown[0]}; known: {', '.join(GROUNDED_OPTIONS)}")


def _detector(options: Mapping[str, object], device: str, column: str):
    from idcrafter.rewards.nexus import GroundingDINODetector

    _check_options(options, column)
    threshold = options.get("box_threshold", 0.35)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ValueError(f"{column}.box_threshold={threshold!r}: expected a number")
    _check_model_type(options["detector"], "grounding-dino", f"{column}.detector")
    detector = GroundingDINODetector(options["detector"], device, options.get("dtype"),
                                     box_threshold=float(threshold), reward=column)
    return detector.load()  # a folder that does not load skips the column now, not at the first sample


def _flag(options: Mapping[str, object], key: str, column: str) -> bool:
    value = options.get(key, False)
    if not isinstance(value, bool):  # --model-option parses true / false to bool
        raise ValueError(f"{column}.{key}={value!r}: expected true or false")
    return value


def build_fashionclip(options: Mapping[str, object], device: str = "cpu"):
    """FashionCLIP-I and FashionCLIP-T (`idcrafter.eval.protocols`): options path=DIR (a transformers
    CLIP folder: FashionCLIP), detector=DIR (Grounding-DINO), box_threshold (0.35), faces (false)."""
    from idcrafter.rewards.clip import CLIPEmbedder

    clip = CLIPEmbedder(options["path"], device, options.get("dtype"), reward="fashionclip")
    _check_options(options, "fashionclip")
    _check_model_type(clip.path, "clip", "fashionclip.path")
    clip.load()
    grounded = GroundedSimilarity(_detector(options, device, "fashionclip"), clip,
                                  faces=_flag(options, "faces", "fashionclip"))

    def score(item, frames):
        texts, described = clothing_texts(item.prompt, item.categories, getattr(item, "descriptors", []))
        if not described:
            grounded.warnings["no clothing descriptions: FashionCLIP-T used the full prompt"] += 1
        text = clip.texts(texts)
        image = clip.images(list(scored_frames(frames)))
        return {"ofa_fashionclip_i": grounded(item, frames),
                "ofa_fashionclip_t": float((image.double() @ text.double().T).mean())}

    score.warnings = grounded.warnings
    return score


def build_dino(options: Mapping[str, object], device: str = "cpu"):
    """DINO (`idcrafter.eval.protocols`): options path=DIR (a DINOv2 folder), detector=DIR
    (Grounding-DINO), box_threshold (0.35), faces (false)."""
    from idcrafter.rewards.clip import DINOEmbedder

    dino = DINOEmbedder(options["path"], device, options.get("dtype"), reward="dino")
    _check_options(options, "dino")
    _check_model_type(dino.path, "dinov2", "dino.path")
    dino.load()
    grounded = GroundedSimilarity(_detector(options, device, "dino"), dino, faces=_flag(options, "faces", "dino"))

    def score(item, frames):
        return {"ofa_dino": grounded(item, frames)}

    score.warnings = grounded.warnings
    return score


class FaceSimScorer:
    """One-for-All's FaceSim of one sample (see the module doc) with a `idcrafter.rewards.faces`
    backend (`detect(image) -> DetectedFaces` of unit embeddings)."""

    def __init__(self, backend, max_frames: int = MAX_FRAMES):
        self.backend, self.max_frames = backend, int(max_frames)
        self.warnings: Counter = Counter()

    def reference_embeddings(self, refs: Sequence[np.ndarray]) -> np.ndarray:
        """The largest face's embedding of each reference that has one -> float [K, D]."""
        found = []
        for ref in refs:
            faces = self.backend.detect(np.ascontiguousarray(ref))
            best = faces.largest()
            if best is None:
                self.warnings["no face in a face reference (left out)"] += 1
            else:
                found.append(faces.embeddings[best])
        dim = len(found[0]) if found else int(getattr(self.backend, "dim", 0))
        return np.asarray(found, np.float64).reshape(len(found), dim)

    def frame_score(self, frame: np.ndarray, ref_emb: np.ndarray) -> float:
        """Mean over the face references of the cosine with their face in `frame` (0 where none)."""
        from idcrafter.rewards.identity import cosine_similarity_matrix

        faces = self.backend.detect(np.ascontiguousarray(frame))
        if len(faces) == 0:
            self.warnings["no face in the output (scores 0)"] += 1
            return 0.0
        if len(ref_emb) == 1:  # the paper's case: the largest face of the output against the reference
            emb = faces.embeddings[faces.largest()][None]
            return float(cosine_similarity_matrix(ref_emb, emb.astype(np.float64))[0, 0])
        sim = cosine_similarity_matrix(ref_emb, faces.embeddings.astype(np.float64))
        return float(grounded_scores(sim).mean())

    def __call__(self, item, frames: np.ndarray) -> float | None:
        chosen = face_references(item.categories)
        if not chosen:
            return None
        ref_emb = self.reference_embeddings([item.refs[k] for k in chosen])
        if len(ref_emb) == 0:
            return None
        return float(np.mean([self.frame_score(f, ref_emb) for f in scored_frames(frames, self.max_frames)]))


def build_face(options: Mapping[str, object], device: str = "cpu"):
    """FaceSim (`idcrafter.eval.protocols`): options backend=insightface root=DIR [model_name=auraface,
    det_size, det_thresh] (the paper's AuraFace), or backend=dlib [upsample, num_jitters] (a substitute)."""
    from idcrafter.rewards.faces import make_face_backend

    opts = {k: v for k, v in options.items() if k != "backend"}
    if options["backend"] == "insightface":
        opts.setdefault("model_name", "auraface")
    backend = make_face_backend(str(options["backend"]), device, **opts)
    if hasattr(backend, "load"):
        backend.load()  # missing weights or packages skip the column now
    scorer = FaceSimScorer(backend)

    def score(item, frames):
        return {"ofa_facesim": scorer(item, frames)}

    score.warnings = scorer.warnings
    return score
