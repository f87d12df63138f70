"""The evaluation protocols and the models behind their columns.

A protocol is a fixed set of columns computed the way a published paper or benchmark computes them:

- `opens2v`: OpenS2V-Eval (ID-Crafter App. C evaluates on it): Aesthetics, Motion, FaceSim-Cur,
  GmeScore, NexusScore, NaturalScore, then the leaderboard's normalisation and totals
  (`idcrafter.eval.opens2v`).
- `multicrafter`: MultiCrafter's image table (Sec. 5.1): CLIP-T, Face-Sim, DINO-I, CLIP-I, AES (HPS v2).
- `one-for-all`: One-for-All's image table: FaceSim, GME-I, GME-T, FashionCLIP-I/T, DINO.
- `legacy`: the reward-based columns of `idcrafter.eval.metrics` (not a published protocol).

Every model-based column is produced by a *column model*: built from `--model-option NAME.KEY=VALUE`
options (local files only, never downloaded) and called once per sample,

    scorer(item: EvalItem, frames: uint8 [F, H, W, 3]) -> {column key: float | None}

returning a value (or None where the column does not apply to that sample) for each of its
`columns`. A column model whose options are missing, or whose files do not load, skips its columns
with a one-line reason; the other columns are still computed.

The builders are named by "module:function" and imported only when their options are given, so a
protocol's table can be listed, and its input checked, without importing any model code.
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["COLUMN_MODELS", "PROTOCOL_TABLES", "ColumnModel", "Scorer", "build_scorers", "evaluate_protocol",
           "model_options", "score_items"]

# (item, frames) -> {column: value}; see the module doc.
Scorer = Callable[..., Mapping[str, "float | None"]]


@dataclass(frozen=True)
class ColumnModel:
    """One model-based source of columns.

    option: the `--model-option` prefix (`aesthetics.clip=DIR` -> option "aesthetics").
    columns: the report columns it fills.
    needs: the options it requires, e.g. ("clip", "head"): when one is missing its columns are skipped.
    build: "module:function"; function(options: dict, device: str) -> Scorer. It raises ConfigError,
        FileFormatError, OSError, ValueError, ... when the files do not load (the column is skipped
        with that message).
    source: what the published protocol uses, for the skip reason and the report.
    """

    option: str
    columns: tuple[str, ...]
    needs: tuple[str, ...]
    build: str
    source: str

    def missing_reason(self) -> str:
        flags = " ".join(f"--model-option {self.option}.{k}=..." for k in self.needs)
        return f"needs {self.source}: pass {flags}"


# protocol -> its column models, in table order. Motion (OpenS2V) needs no model and is not listed.
COLUMN_MODELS: dict[str, tuple[ColumnModel, ...]] = {
    "opens2v": (
        ColumnModel("aesthetics", ("aesthetics",), ("clip", "head"), "idcrafter.eval.opens2v:build_aesthetics",
                    "CLIP ViT-L/14 and the LAION aesthetic head (get_aesscore.py)"),
        ColumnModel("smoothness", ("motion_smoothness",), ("path",), "idcrafter.eval.smoothness:build_smoothness",
                    "a local Qwen2.5-VL standing in for Q-Align (get_motion_smoothness.py, leaderboard v1.1)"),
        ColumnModel("facesim", ("facesim_cur", "facesim_arc"), ("root", "curricular"),
                    "idcrafter.eval.facesim:build_facesim",
                    "insightface detection + ArcFace and the CurricularFace IR-101 backbone (get_facesim.py)"),
        ColumnModel("naturalscore", ("naturalscore",), ("path",), "idcrafter.eval.naturalscore:build_naturalscore",
                    "a local Qwen2.5-VL / Qwen2-VL folder in place of GPT-4o (get_naturalscore.py)"),
        ColumnModel("gmescore", ("gmescore",), ("path",), "idcrafter.eval.gme:build_gmescore",
                    "GME-Qwen2-VL, a transformers Qwen2-VL folder (get_gmescore.py)"),
        ColumnModel("nexusscore", ("nexusscore", "nexusscore_idcrafter"), ("detector",), "idcrafter.eval.nexusscore:build_nexusscore",
                    "an image-guided detector and GME-Qwen2-VL (get_nexusscore.py; its YOLO-World is substituted by "
                    "OWLv2 image-guided detection: detector=DIR gme=DIR; --nexus idcrafter: Grounding-DINO "
                    "detector=DIR clip=DIR [sam=DIR])"),
    ),
    "multicrafter": (
        ColumnModel("clip", ("mc_clip_t", "mc_clip_i"), ("path",), "idcrafter.eval.multicrafter:build_clip",
                    "a CLIP folder (UNO / DreamBench: openai/clip-vit-base-patch32)"),
        ColumnModel("face", ("mc_face_sim",), ("backend",), "idcrafter.eval.multicrafter:build_face",
                    "ArcFace through insightface (backend=insightface root=DIR; backend=dlib substitutes dlib's "
                    "descriptor)"),
        ColumnModel("dino", ("mc_dino_i",), ("path",), "idcrafter.eval.multicrafter:build_dino",
                    "a DINO ViT folder (UNO / DreamBench: facebook/dino-vits16)"),
        ColumnModel("hps", ("mc_aes",), ("path",), "idcrafter.eval.multicrafter:build_hps",
                    "the HPS v2 checkpoint HPS_v2_compressed.pt (open_clip ViT-H-14)"),
    ),
    "one-for-all": (
        ColumnModel("facesim", ("ofa_facesim",), ("backend",), "idcrafter.eval.one_for_all:build_face",
                    "fal's AuraFace (insightface pack: backend=insightface root=DIR); backend=dlib substitutes "
                    "dlib's descriptor"),
        ColumnModel("fashionclip", ("ofa_fashionclip_i", "ofa_fashionclip_t"), ("path", "detector"),
                    "idcrafter.eval.one_for_all:build_fashionclip",
                    "FashionCLIP (a transformers CLIP folder) and Grounding-DINO crops"),
        ColumnModel("dino", ("ofa_dino",), ("path", "detector"), "idcrafter.eval.one_for_all:build_dino",
                    "DINOv2 and Grounding-DINO crops"),
        ColumnModel("gme", ("ofa_gme_i", "ofa_gme_t"), ("path", "detector"), "idcrafter.eval.gme:build_one_for_all",
                    "GME-Qwen2-VL (path=DIR) and Grounding-DINO crops (detector=DIR) (One-for-All App. D)"),
    ),
}


def model_options(protocol: str) -> tuple[str, ...]:
    """The `--model-option` prefixes a protocol understands."""
    return tuple(m.option for m in COLUMN_MODELS.get(protocol, ()))


def _load_builder(spec: str) -> Callable:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def build_scorers(protocol: str, options: Mapping[str, Mapping[str, object]], device: str = "cpu",
                  ) -> tuple[dict[str, Scorer], dict[str, str]]:
    """The scorers of a protocol's column models whose options are given -> (scorers by option name,
    skipped: column -> one-line reason for every column whose model is not built)."""
    from idcrafter.eval.metrics import SKIP_ERRORS, one_line

    scorers: dict[str, Scorer] = {}
    skipped: dict[str, str] = {}
    for model in COLUMN_MODELS.get(protocol, ()):
        opts = dict(options.get(model.option, {}))
        if any(k not in opts for k in model.needs):
            skipped.update({c: model.missing_reason() for c in model.columns})
            continue
        try:
            scorers[model.option] = _load_builder(model.build)(opts, device)
        except (*SKIP_ERRORS, RuntimeError, KeyError, pickle.UnpicklingError) as err:
            skipped.update({c: f"cannot load {model.option} ({one_line(err)})" for c in model.columns})
    return scorers, skipped


def score_items(items: Sequence, scorers: Mapping[str, Scorer], columns: Sequence[str],
                per_frames: Mapping[str, Callable[[np.ndarray], float | None]] | None = None,
                examples: int = 8, example_frames: int = 4, progress: bool = True, desc: str = "evaluate"):
    """Decode each item once and run every scorer on it.

    Returns (values: column -> one value or None per item, kinds: "video" / "image" per item,
    examples: (id, frames) for the summary strip). `per_frames` are model-free columns computed from
    the frames alone (OpenS2V's Motion). Only the `columns` listed are kept.
    """
    from tqdm.auto import tqdm

    from idcrafter.eval.metrics import _example_frames

    values: dict[str, list[float | None]] = {c: [] for c in columns}
    kinds: list[str] = []
    kept = []
    for item in tqdm(items, desc=desc, unit="sample", disable=not progress):
        frames = item.load()
        kinds.append("video" if len(frames) > 1 else "image")
        if len(kept) < examples:
            kept.append((item.id, _example_frames(frames, example_frames)))
        row: dict[str, float | None] = {}
        for key, fn in (per_frames or {}).items():
            row[key] = fn(frames)
        for scorer in scorers.values():
            row.update(scorer(item, frames))
        for c in columns:
            value = row.get(c)
            values[c].append(None if value is None else float(value))
    return values, kinds, kept


# The image protocols' tables: column key -> (title, what the paper computes). Their totals are not
# defined by the papers; each column's mean is reported as published (x 100 where the paper does).
PROTOCOL_TABLES: dict[str, dict[str, tuple[str, str]]] = {
    "opens2v": {  # the leaderboard's headers; the recipes are idcrafter.eval.opens2v's module doc and COLUMN_SOURCES
        "aesthetics": ("Aesthetics", "LAION aesthetic MLP on CLIP ViT-L/14, 32 frames"),
        "motion": ("Motion", "Farneback statistic (v1.1: motion amplitude)"),
        "motion_smoothness": ("MotionSmoothness", "1 - share of frames whose window quality jumps (v1.1)"),
        "facesim_cur": ("FaceSim-Cur", "CurricularFace cosine to the face reference, 32 frames"),
        "facesim_arc": ("FaceSim-Arc", "ArcFace cosine to the face reference, 32 frames (reported)"),
        "gmescore": ("GmeScore", "GME-Qwen2-VL frame-prompt similarity, 32 frames"),
        "nexusscore": ("NexusScore", "image-guided detection + GME retrieval"),
        "nexusscore_idcrafter": ("NexusScore (ID-Crafter)", "Grounded-SAM masks + CLIP cosine (reported)"),
        "naturalscore": ("NaturalScore", "VLM rating 1-5, three repeats"),
    },
    "multicrafter": {
        "mc_clip_t": ("CLIP-T", "CLIP image-text cosine of the output and the prompt (MultiCrafter Sec. 5.1)"),
        "mc_face_sim": ("Face-Sim", "ArcFace cosine (clipped at 0) of each reference face and the output face the "
                                    "Hungarian algorithm matches to it, unmatched 0, averaged over reference faces"),
        "mc_dino_i": ("DINO-I", "DINO CLS cosine of the output and each reference, averaged"),
        "mc_clip_i": ("CLIP-I", "CLIP image cosine of the output and each reference, averaged"),
        "mc_aes": ("AES", "HPS v2: cosine of the output and the prompt in the HPS v2 CLIP"),
    },
    "one-for-all": {
        "ofa_facesim": ("FaceSim", "face embedding cosine of the output and each person reference"),
        "ofa_gme_i": ("GME-I", "GME-Qwen2-VL image-image similarity to the references"),
        "ofa_gme_t": ("GME-T", "GME-Qwen2-VL image-text similarity to the prompt"),
        "ofa_fashionclip_i": ("FashionCLIP-I", "FashionCLIP image similarity to the garment references"),
        "ofa_fashionclip_t": ("FashionCLIP-T", "FashionCLIP image-text similarity"),
        "ofa_dino": ("DINO", "DINO cosine of Grounding-DINO crops of the output and the object references"),
    },
}


def evaluate_protocol(protocol: str, items: Sequence, scorers: Mapping[str, Scorer], examples: int = 8,
                      example_frames: int = 4, progress: bool = True, skipped: Mapping[str, str] | None = None):
    """Score generated images (or videos) with an image protocol's columns -> `idcrafter.eval.metrics.Report`
    (per-sample values and their means; no weighted total: the papers define none)."""
    from idcrafter.eval.metrics import TOTAL, Report

    table = PROTOCOL_TABLES[protocol]
    values, kinds, kept = score_items(items, scorers, tuple(table), examples=examples, example_frames=example_frames,
                                      progress=progress, desc=protocol)
    given = dict(skipped or {})
    out_skipped = {TOTAL: f"--protocol {protocol} has no total: the paper reports its columns side by side"}
    for key in table:
        if all(v is None for v in values[key]):
            values.pop(key)
            out_skipped[key] = given.get(key, f"no value for any sample ({table[key][1]})")
    # A scorer may count what it could not find (a subject without a box, ...) in its `warnings`.
    warnings = {name: dict(s.warnings) for name, s in scorers.items() if getattr(s, "warnings", None)}
    report = Report(ids=[item.id for item in items], columns=[k for k in table if k in values], values=values,
                    weights={}, skipped=out_skipped, warnings=warnings, kinds=kinds, examples=kept)
    report.extra[protocol] = {"titles": {k: t for k, (t, _) in table.items()},
                              "definitions": {k: d for k, (_, d) in table.items()}}
    return report
