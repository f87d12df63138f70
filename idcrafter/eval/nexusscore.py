"""OpenS2V-Eval's NexusScore (`get_nexusscore.py`), and ID-Crafter's Grounded-SAM + CLIP variant.

The benchmark's recipe (OpenS2V-Nexus, `eval/get_nexusscore.py`, Apache-2.0), re-implemented:

  1. 32 frames evenly spaced over the video (`sample_indices`);
  2. the subjects are the case's (reference image, class label) pairs, except (`nexus_subjects`):
     in a case whose id contains "face", "Man" / "Woman" references are skipped (FaceSim scores
     them); in one whose id contains "human", their label becomes "human";
  3. per frame and subject, the detector is prompted with the reference IMAGE; its boxes go through
     NMS at IoU 0.7, then scores > 0.5, then the best 100 (`select_boxes`); a (frame, subject) pair
     with at least one box counts in `frame_obj`; every box is cropped from the frame;
  4. GME embeddings (`idcrafter.eval.gme.GmeEmbedder`) of each crop, of its reference (as an image)
     and of its label (a text query with "Find an image that matches the given text.");
     retrieval = <crop, reference>, text = <crop, label>;
  5. a box is kept when its detector score > 0.6, text > 0.30 and retrieval != 0; the score is
     mean(kept retrievals) / frame_obj, 0 when none is kept (`nexus_retrieval_score`); a video without
     any box has no score (the benchmark's script writes none for it).
     (Dividing a mean by the number of detections makes the values small: the leaderboard maps
     [0, 0.05] to [0, 1] and leaves zeros out of the mean.)

Substituted model: the benchmark detects with YOLO-World (v2-L, image-prompt adapter) through
mmyolo / mmcv, which cannot be installed here. We use transformers' image-guided detection of OWLv2
(or OWL-ViT): the reference image is the query, the detector's score is the sigmoid of its
image-guided logit, boxes are converted to pixels of the frame and clipped to it (OWLv2's may reach
into the square padding it adds), and steps 3-5 are the benchmark's. Detection scores of the two detectors are not calibrated
alike, so the 0.5 / 0.6 thresholds select differently; numbers are comparable in recipe, not to the
digit. Crops are taken as PIL's `crop` takes the benchmark's float boxes (coordinates rounded).

`--nexus idcrafter` (ID-Crafter App. C): "Grounded-SAM generates a subject mask M for each frame f_t;
a CLIP-based image encoder computes the cosine similarity between the reference image and the masked
subject f_t (.) M"; the score is the average over the T frames. `IDCrafterNexusScorer`: per frame and
subject, Grounding-DINO's best box for the subject's category (`idcrafter.rewards.nexus`), SAM's mask
of that box (transformers `SamModel`; without a SAM folder the box itself is the mask), the frame
multiplied by the mask, CLIP cosine with the reference. Unspecified by the paper, our choices: a
subject not found in a frame scores 0 there; subjects are averaged; every frame is used (T) unless
`frames=N` samples N as the benchmark does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "BOX_CONF_MIN",
    "IDCrafterNexusScorer",
    "ImageGuidedDetector",
    "MAX_BOXES",
    "NEXUS_FRAMES",
    "NMS_THR",
    "NexusScorer",
    "SCORE_THR",
    "TEXT_SCORE_MIN",
    "build_nexusscore",
    "nexus_retrieval_score",
    "nexus_subjects",
    "pil_crop",
    "select_boxes",
]

NEXUS_FRAMES = 32  # get_nexusscore.py samples 32 frames
SCORE_THR, NMS_THR, MAX_BOXES = 0.5, 0.7, 100  # yoloworld_inference defaults
BOX_CONF_MIN, TEXT_SCORE_MIN = 0.6, 0.30  # the keep rule of a crop
PERSON_LABELS = ("Man", "Woman")
VARIANTS = ("benchmark", "idcrafter")


def nexus_subjects(sample_id: str, labels: Sequence[str]) -> list[tuple[int, str]]:
    """(reference index, label) of the subjects the benchmark looks for in a case (module doc, step 2)."""
    out = []
    for k, label in enumerate(labels):
        if label in PERSON_LABELS:
            if "face" in sample_id:
                continue
            if "human" in sample_id:
                label = "human"
        out.append((k, label))
    return out


def select_boxes(boxes: np.ndarray, scores: np.ndarray, score_thr: float = SCORE_THR, nms_thr: float = NMS_THR,
                 max_boxes: int = MAX_BOXES) -> np.ndarray:
    """Indices of the boxes the benchmark keeps, best first: greedy NMS (a box overlapping a better kept
    one by IoU > nms_thr is dropped), then scores > score_thr, then the best `max_boxes`.

    Args:
        boxes: float [N, 4] (x0, y0, x1, y1); scores: float [N].
    """
    from idcrafter.curate.detect import nms

    scores = np.asarray(scores, dtype=np.float64)
    keep = nms(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), scores, nms_thr) if len(scores) else np.zeros(0, int)
    keep = keep[scores[keep] > score_thr]
    return keep[np.argsort(-scores[keep], kind="stable")[:max_boxes]]


def nexus_retrieval_score(confidences: Sequence[float], text_scores: Sequence[float],
                          image_scores: Sequence[float], frame_obj: int) -> float:
    """The benchmark's NexusScore of a video from its crops (module doc, step 5).

    Args:
        confidences, text_scores, image_scores: one per crop (detector score, <crop, label>, <crop, reference>).
        frame_obj: the (frame, subject) pairs with at least one box.
    """
    kept = [float(r) for b, t, r in zip(confidences, text_scores, image_scores)
            if b > BOX_CONF_MIN and t > TEXT_SCORE_MIN and r != 0]
    return float(np.mean(kept)) / frame_obj if kept else 0.0


def pil_crop(frame: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """uint8 [H, W, 3] cropped to a float box inside the frame as PIL's `Image.crop` does (coordinates
    rounded). A box that rounds to nothing (a sliver on the frame's edge) gives the one pixel at its
    top-left corner, so that every counted box has a crop to embed."""
    height, width = frame.shape[:2]
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    x0, y0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
    x1, y1 = max(min(x1, width), x0 + 1), max(min(y1, height), y0 + 1)
    return np.ascontiguousarray(frame[y0:y1, x0:x1])


class ImageGuidedDetector:
    """OWLv2 / OWL-ViT image-guided detection (transformers) from a local folder: the stand-in for the
    benchmark's YOLO-World with image prompts.

    `raw(frames, query)` -> (boxes float64 [F, P, 4] in frame pixels, clipped; scores float64 [F, P]):
    every predicted box with sigmoid(image-guided logit). `detect(frames, query)` -> per frame the
    (boxes [n, 4], scores [n]) kept by `select_boxes`.
    """

    def __init__(self, path, device: str | torch.device = "cpu", dtype=None):
        from transformers import AutoConfig, Owlv2ForObjectDetection, OwlViTForObjectDetection

        from idcrafter.rewards.common import load_image_processor, model_dtype

        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        if config.model_type not in ("owlv2", "owlvit"):
            raise ValueError(f"nexusscore detector {str(path)!r} is a {config.model_type!r} model; "
                             "image-guided detection needs OWLv2 or OWL-ViT")
        cls = Owlv2ForObjectDetection if config.model_type == "owlv2" else OwlViTForObjectDetection
        self.device, self.dtype = torch.device(device), model_dtype(dtype)
        self.model = cls.from_pretrained(str(path), dtype=self.dtype, local_files_only=True)
        self.model = self.model.to(self.device).eval().requires_grad_(False)
        self.processor = load_image_processor(path)
        # OWLv2 pads each image to a square (bottom / right) before resizing: its boxes are fractions of
        # that square. OWL-ViT resizes without padding: fractions of the image itself.
        self.square = config.model_type == "owlv2"

    def _pixels(self, images) -> torch.Tensor:
        return self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device, self.dtype)

    @torch.no_grad()
    def raw(self, frames: Sequence[np.ndarray], query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        frames = [np.asarray(f, dtype=np.uint8) for f in frames]
        height, width = frames[0].shape[:2]
        pixels = self._pixels(frames)
        query_pixels = self._pixels([np.asarray(query, dtype=np.uint8)]).expand(len(frames), -1, -1, -1)
        out = self.model.image_guided_detection(pixel_values=pixels, query_pixel_values=query_pixels)
        scores = out.logits.float().amax(-1).sigmoid().double().cpu().numpy()
        cx, cy, w, h = out.target_pred_boxes.double().cpu().numpy().transpose(2, 0, 1)
        sx, sy = (max(height, width),) * 2 if self.square else (width, height)
        boxes = np.stack([(cx - w / 2) * sx, (cy - h / 2) * sy, (cx + w / 2) * sx, (cy + h / 2) * sy], -1)
        boxes = np.clip(boxes, 0, [width, height, width, height])
        return boxes, scores

    def detect(self, frames: Sequence[np.ndarray], query: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        boxes, scores = self.raw(frames, query)
        keeps = [select_boxes(b, s) for b, s in zip(boxes, scores)]
        return [(b[k], s[k]) for b, s, k in zip(boxes, scores, keeps)]


class NexusScorer:
    """The benchmark's NexusScore of one video (module doc): `scorer(item, frames)` -> {"nexusscore": x}.

    item.id decides the person rules, item.refs and item.categories are the references and their class
    labels (as the benchmark file gives them).
    """

    def __init__(self, embedder, detector: ImageGuidedDetector, frames: int | None = NEXUS_FRAMES):
        self.embedder, self.detector, self.frames = embedder, detector, frames

    def crops(self, item, frames: np.ndarray) -> tuple[list[tuple[int, str, float, np.ndarray]], int]:
        """Every box of every (sampled frame, subject) -> ([(reference index, label, score, crop)], frame_obj)."""
        from idcrafter.eval.opens2v import sample_indices

        frames = np.asarray(frames)
        picked = list(frames[sample_indices(len(frames), self.frames)])
        records, frame_obj = [], 0
        for k, label in nexus_subjects(item.id, list(item.categories)[: len(item.refs)]):
            for frame, (boxes, scores) in zip(picked, self.detector.detect(picked, item.refs[k])):
                frame_obj += int(len(boxes) > 0)
                records += [(k, label, float(s), pil_crop(frame, b)) for b, s in zip(boxes, scores)]
        return records, frame_obj

    def __call__(self, item, frames: np.ndarray) -> dict[str, float | None]:
        from idcrafter.eval.gme import QUERY_INSTRUCTION

        records, frame_obj = self.crops(item, frames)
        if not records:
            # No box in any frame (or no subject: a face case of one person): the benchmark's script fails on
            # the empty embedding batch and writes no score for the video (its demo output has none for
            # singleface_3). No value, then; boxes that are all rejected give 0, as there.
            return {"nexusscore": None}
        # Each reference and label is embedded once: the benchmark embeds one copy per crop, all equal.
        refs = sorted({k for k, *_ in records})
        labels = sorted({label for _, label, *_ in records})
        ref_emb = dict(zip(refs, self.embedder.image_embeddings([item.refs[k] for k in refs])))
        label_emb = dict(zip(labels, self.embedder.text_embeddings(labels, instruction=QUERY_INSTRUCTION)))
        crop_emb = self.embedder.image_embeddings([c for *_, c in records])
        image_scores = [float(crop_emb[i] @ ref_emb[k]) for i, (k, *_) in enumerate(records)]
        text_scores = [float(crop_emb[i] @ label_emb[label]) for i, (_, label, *_) in enumerate(records)]
        confidences = [s for _, _, s, _ in records]
        return {"nexusscore": nexus_retrieval_score(confidences, text_scores, image_scores, frame_obj)}


class IDCrafterNexusScorer:
    """ID-Crafter's NexusScore (module doc): mean over subjects of mean over frames of
    cos(CLIP(reference), CLIP(frame * mask)), 0 in a frame where the subject is not found.

    Args:
        detector: `idcrafter.rewards.nexus.GroundingDINODetector`; clip: `idcrafter.rewards.clip.CLIPEmbedder`;
        segmenter: `idcrafter.curate.segment.SamSegmenter` or None (the box is the mask).
    """

    def __init__(self, detector, clip, segmenter=None, frames: int | None = None):
        self.detector, self.clip, self.segmenter, self.frames = detector, clip, segmenter, frames

    def masks(self, frames: np.ndarray, boxes: list[np.ndarray]) -> list[np.ndarray]:
        """frames uint8 [F, H, W, 3], per frame boxes int [k, 4] -> per frame bool [k, H, W]."""
        if self.segmenter is not None:
            return self.segmenter.segment(frames, boxes)
        out = []
        for b in boxes:
            m = np.zeros((len(b), *frames.shape[1:3]), bool)
            for i, (x0, y0, x1, y1) in enumerate(np.asarray(b, dtype=np.int64).reshape(-1, 4)):
                m[i, y0:y1, x0:x1] = True
            out.append(m)
        return out

    def __call__(self, item, frames: np.ndarray) -> dict[str, float | None]:
        from collections import Counter

        from idcrafter.eval.opens2v import sample_indices

        if not item.refs:
            return {"nexusscore_idcrafter": None}
        frames = np.asarray(frames)
        frames = frames[sample_indices(len(frames), self.frames)]
        cats = [" ".join(str(c).lower().split()).rstrip(".") or "object" for c in item.categories]
        cats = cats if len(cats) == len(item.refs) else ["object"] * len(item.refs)
        found = self.detector.detect(list(frames), dict(Counter(cats)))
        # Per frame, subject k takes its category's next best box (distinct boxes for a shared category).
        boxes, owners = [], []
        for per_frame in found:
            taken: Counter = Counter()
            frame_boxes, frame_owners = [], []
            for k, c in enumerate(cats):
                bs = per_frame.get(c, (np.zeros((0, 4), np.int64), None))[0]
                if taken[c] < len(bs):
                    frame_boxes.append(bs[taken[c]])
                    frame_owners.append(k)
                taken[c] += 1
            boxes.append(np.asarray(frame_boxes, np.int64).reshape(-1, 4))
            owners.append(frame_owners)
        masks = self.masks(frames, boxes)
        masked = [(f, k, frames[f] * m[:, :, None]) for f, (ks, ms) in enumerate(zip(owners, masks))
                  for k, m in zip(ks, ms)]
        scores = np.zeros((len(frames), len(item.refs)))
        if masked:
            emb = self.clip.images(list(item.refs) + [x for *_, x in masked]).double()
            ref_emb, crop_emb = emb[: len(item.refs)], emb[len(item.refs):]
            for i, (f, k, _) in enumerate(masked):
                scores[f, k] = float(crop_emb[i] @ ref_emb[k])
        return {"nexusscore_idcrafter": float(scores.mean(axis=0).mean())}


def build_nexusscore(options: Mapping[str, object], device: str = "cpu"):
    """The NexusScore column model (`idcrafter.eval.protocols`).

    variant=benchmark (default): detector=DIR (OWLv2 / OWL-ViT), gme=DIR (GME-Qwen2-VL), frames (32), and the
    GME options of `idcrafter.eval.gme.embedder_from_options` (min_image_tokens, max_image_tokens, batch_size).
    variant=idcrafter (`--nexus idcrafter`): detector=DIR (Grounding-DINO), clip=DIR (CLIP), sam=DIR
    (optional), box_threshold (0.35), frames (all). dtype for all models.
    """
    from idcrafter.utils.errors import ConfigError

    variant = str(options.get("variant", "benchmark"))
    if variant not in VARIANTS:
        raise ConfigError(f"nexusscore.variant={variant!r}: known variants are {', '.join(VARIANTS)}")
    needed = ("gme",) if variant == "benchmark" else ("clip",)
    missing = [k for k in needed if k not in options]
    if missing:
        raise ConfigError(f"the {variant} NexusScore needs --model-option nexusscore.{missing[0]}=DIR")
    dtype = options.get("dtype")
    if variant == "benchmark":
        from idcrafter.eval.gme import embedder_from_options

        frames = int(options.get("frames", NEXUS_FRAMES))
        return NexusScorer(embedder_from_options(options, device, "gme"),
                           ImageGuidedDetector(options["detector"], device, dtype), frames)
    from idcrafter.rewards.clip import CLIPEmbedder
    from idcrafter.rewards.nexus import GroundingDINODetector

    detector = GroundingDINODetector(options["detector"], device, dtype, float(options.get("box_threshold", 0.35)),
                                     reward="nexusscore").load()
    clip = CLIPEmbedder(options["clip"], device, dtype, reward="nexusscore", option="clip").load()
    segmenter = None
    if "sam" in options:
        from idcrafter.curate.segment import SamSegmenter

        segmenter = SamSegmenter(str(options["sam"]), device=device, dtype=dtype)
        segmenter.load()
    frames = int(options["frames"]) if "frames" in options else None
    return IDCrafterNexusScorer(detector, clip, segmenter, frames)
