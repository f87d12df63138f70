"""MultiCrafter's evaluation table: CLIP-T, Face-Sim, DINO-I, CLIP-I, AES (`--protocol multicrafter`).

MultiCrafter (Sec. 5.1; supplement Tab. S-1 to S-3) reports five columns per method, as raw values
(CLIP-T about 0.27, Face-Sim 0.5, DINO-I 0.81, CLIP-I 0.85, AES 0.29: cosines, not x 100):

    CLIP-T   = cos(CLIP_img(output), CLIP_txt(prompt))
    CLIP-I   = mean_r cos(CLIP_img(output), CLIP_img(ref_r))
    DINO-I   = mean_r cos(DINO_cls(output), DINO_cls(ref_r))
    Face-Sim = mean_k s_k,   s = Hungarian(max(cos(ArcFace(ref faces), ArcFace(output faces)), 0)),
               a reference face left without a detected face scores 0
    AES      = HPS v2 = cos(HPS_img(output), HPS_txt(prompt))    (supp. Sec. D: "HPS v2 scores")

The text available of the paper names the metrics but not their models or details. Where it is silent
this follows UNO (Wu et al. 2025, its main baseline, supp. Tab. S-2), which takes DreamBench's metrics:
CLIP ViT-B/32 for CLIP-T / CLIP-I, DINO ViT-S/16's CLS token for DINO-I, on the whole image, the image
metrics averaged over the references. Face-Sim uses the Hungarian matching of MultiCrafter's
Multi-ID Alignment Reward (its abstract and Sec. 4.3: "a scoring mechanism to accurately assess
multi-subject fidelity based on the Hungarian matching algorithm"), here `idcrafter.rewards.identity`,
with ArcFace embeddings from insightface (a `root` model folder); dlib's descriptor is accepted as a
substitute (`backend=dlib`: its cosines are compressed, different people score 0.8-0.9, so its numbers
are not comparable with ArcFace ones). A reference in which no face is found (an object) is left out
of Face-Sim; a sample with no face reference has no Face-Sim (None).

The protocol is for images. A video is scored on `frames` evenly spaced frames (8; first and last
included), each frame as an image, and the frame values averaged: the per-frame value is exactly the
image protocol's, and a still image is a one-frame video.

Each column model is built from `--model-option NAME.KEY=VALUE` (`idcrafter.eval.protocols`): clip.path,
dino.path, face.backend (+ root, model_name, det_size, det_thresh / upsample, num_jitters), hps.path
(+ arch, tokenizer_path); every model also takes dtype and frames.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "VIDEO_FRAMES",
    "DinoCLS",
    "build_clip",
    "build_dino",
    "build_face",
    "build_hps",
    "face_sim",
    "mean_reference_cosine",
    "scored_frames",
]

VIDEO_FRAMES = 8


def scored_frames(frames: np.ndarray, count: int = VIDEO_FRAMES) -> list[np.ndarray]:
    """uint8 [F, H, W, 3] -> the frames scored: all when F <= count, else `count` evenly spaced ones
    (rounded linspace, first and last included). A still image (F = 1) is itself."""
    from idcrafter.rewards.common import sample_frames

    return list(sample_frames(np.asarray(frames), 1, int(count)))


def mean_reference_cosine(refs, outputs) -> float:
    """refs [R, D], outputs [F, D] unit embeddings -> mean over references and frames of the cosine."""
    return float((np.asarray(refs, np.float64) @ np.asarray(outputs, np.float64).T).mean())


def face_sim(refs: np.ndarray, dets: np.ndarray | None) -> tuple[float, list[int | None]]:
    """One image's Face-Sim: refs [R, D] reference face embeddings, dets [M, D] the output's faces ->
    (mean over references of the Hungarian-matched cosine clipped at 0, unmatched references 0;
    the detection assigned to each reference, None when unmatched). R = 0 is the caller's case."""
    from idcrafter.rewards.identity import (
        cosine_similarity_matrix,
        hungarian_assignment,
        hungarian_identity_scores,
    )

    refs = np.asarray(refs, np.float64)
    if dets is None or len(dets) == 0:
        return 0.0, [None] * len(refs)
    similarity = cosine_similarity_matrix(refs, np.asarray(dets, np.float64))
    return float(hungarian_identity_scores(similarity, 0.0).mean()), hungarian_assignment(similarity, 0.0)


def _options(name: str, options: Mapping[str, object], known: Sequence[str]) -> tuple[dict, int]:
    """The options of a column model minus `frames` -> (options, frames); ValueError for an unknown key."""
    unknown = sorted(set(options) - {*known, "frames"})
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted({*known, 'frames'}))}")
    opts = dict(options)
    frames = int(opts.pop("frames", VIDEO_FRAMES))
    if frames < 1:
        raise ValueError(f"{name}.frames must be >= 1, got {frames}")
    return opts, frames


def build_clip(options: Mapping[str, object], device: str = "cpu"):
    """CLIP-T and CLIP-I (options path=DIR: a transformers CLIP folder, dtype, frames).

    mc_clip_t = mean_f cos(image_f, prompt); mc_clip_i = mean_{r, f} cos(image_f, ref_r), None without references.
    """
    from idcrafter.rewards.clip import CLIPEmbedder

    opts, count = _options("clip", options, ("path", "dtype"))
    clip = CLIPEmbedder(opts["path"], device, opts.get("dtype"), reward="clip").load()

    def score(item, frames):
        images = clip.images(scored_frames(frames, count)).numpy()
        text = clip.texts([item.prompt]).numpy()
        refs = clip.images(list(item.refs)).numpy() if len(item.refs) else None
        return {"mc_clip_t": mean_reference_cosine(text, images),
                "mc_clip_i": None if refs is None else mean_reference_cosine(refs, images)}

    return score


class DinoCLS:
    """DINO features (transformers `ViTModel`, e.g. facebook/dino-vits16, or `Dinov2Model`) from a local
    folder: `images` -> unit CLS tokens of the last hidden state (after the final layer norm) [N, D]."""

    def __init__(self, path, device: str = "cpu", dtype=None):
        from transformers import AutoModel

        from idcrafter.rewards.common import load_image_processor, model_dtype, require_path

        path = require_path("dino", path, "a local DINO ViT folder saved with save_pretrained")
        self.model = AutoModel.from_pretrained(str(path), dtype=model_dtype(dtype), local_files_only=True)
        if self.model.config.model_type not in ("vit", "dinov2", "dinov2_with_registers", "dinov3_vit"):
            raise ValueError(f"dino.path {path}: model_type {self.model.config.model_type!r} is not a DINO ViT "
                             "(vit, dinov2, dinov2_with_registers, dinov3_vit)")
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.processor = load_image_processor(path)
        self.device = device

    def images(self, images: list[np.ndarray]) -> np.ndarray:
        import torch

        from idcrafter.rewards.common import unit_rows

        with torch.no_grad():
            pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
            hidden = self.model(pixel_values=pixels.to(self.device, self.model.dtype)).last_hidden_state
            return unit_rows(hidden[:, 0]).cpu().numpy()


def build_dino(options: Mapping[str, object], device: str = "cpu"):
    """DINO-I (options path=DIR: a DINO ViT folder, dtype, frames): mean_{r, f} cos(CLS(image_f), CLS(ref_r))."""
    opts, count = _options("dino", options, ("path", "dtype"))
    dino = DinoCLS(opts["path"], device, opts.get("dtype"))

    def score(item, frames):
        if not len(item.refs):
            return {"mc_dino_i": None}
        return {"mc_dino_i": mean_reference_cosine(dino.images(list(item.refs)), dino.images(scored_frames(frames, count)))}

    return score


def build_face(options: Mapping[str, object], device: str = "cpu"):
    """Face-Sim (options backend=insightface root=DIR [model_name, det_size, det_thresh], or backend=dlib
    [upsample, num_jitters]; frames). Per frame `face_sim` of the references' largest faces against every
    face detected, averaged over the frames; None when no reference holds a face."""
    from idcrafter.rewards.faces import make_face_backend

    opts, count = _options("face", options, ("backend", "root", "model_name", "det_size", "det_thresh", "upsample",
                                             "num_jitters"))
    backend = make_face_backend(str(opts.pop("backend")), device, **opts)
    if hasattr(backend, "load"):
        backend.load()  # a missing weight file or package fails here, skipping the column with its reason

    cache: dict[str, np.ndarray | None] = {}  # benchmark cases pair references from one pool: embed each once

    def reference(image: np.ndarray) -> np.ndarray | None:
        image = np.ascontiguousarray(image)
        key = hashlib.sha1(image.tobytes() + str(image.shape).encode()).hexdigest()
        if key not in cache:
            faces = backend.detect(image)
            cache[key] = None if len(faces) == 0 else faces.embeddings[faces.largest()]
        return cache[key]

    def score(item, frames):
        refs = [e for e in (reference(r) for r in item.refs) if e is not None]
        if not refs:
            return {"mc_face_sim": None}
        values = [face_sim(np.stack(refs), backend.detect(f).embeddings)[0] for f in scored_frames(frames, count)]
        return {"mc_face_sim": float(np.mean(values))}

    return score


def build_hps(options: Mapping[str, object], device: str = "cpu"):
    """AES = HPS v2 (options path=FILE: HPS_v2_compressed.pt, arch, tokenizer_path, dtype, frames; see
    `idcrafter.rewards.hps`): mean_f cos(HPS_img(image_f), HPS_txt(prompt))."""
    from idcrafter.rewards.hps import HPSScorer

    opts, count = _options("hps", options, ("path", "arch", "tokenizer_path", "dtype"))
    hps = HPSScorer(opts["path"], opts.get("arch", "ViT-H-14"), opts.get("tokenizer_path"), device, opts.get("dtype"),
                    reward="hps").load()

    def score(item, frames):
        return {"mc_aes": mean_reference_cosine(hps.texts([item.prompt]).numpy(),
                                                hps.images(scored_frames(frames, count)).numpy())}

    return score
