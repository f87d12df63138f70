"""Benchmark columns, the OpenS2V-style weighted total, and `evaluate` (files never touched here).

Columns (a reward name from `idcrafter.rewards`, or a metric computed here):

    key         title         default weight   range mapped to [0, 1] for the total
    face        FaceSim       0.20             [0, 1]       (components face_mean, face_min)
    nexus       NexusScore    0.20             [0, 1]
    clip_text   CLIP-T        0.12             [0, 1]       (text relevance: OpenS2V's GmeScore weight)
    clip_image  CLIP-I        0                [0, 1]       (reported, not in the total)
    dino_image  DINO-I        0                [0, 1]       (reported, not in the total)
    aesthetic   Aesthetic     0.12             [0.4, 0.7]   (OpenS2V's 4-7 of the LAION 1-10 scale; the reward divides by 10)
    natural     NaturalScore  0.24             [0, 1]       (docs/design.md 7: VLM rating 1-5 as (x - 1) / 4)
    toyid       ToyID         0.20             [0, 1]       (toy world; FaceSim's weight: the toy world's ArcFace)
    motion      Motion        0.12             [0, 1] px    (mean optical-flow magnitude, pixels per frame)
    leakage     Leakage       0                [0, 1]       (docs/design.md 3.3; lower is better: 1 - x)

The weights are OpenS2V-Eval v1.0's Open-Domain total (OpenS2V-Nexus, Yuan et al. 2025, repository
PKU-YuanGroup/OpenS2V-Nexus, `eval/v1.0_backup/merge_result.py`; v1.1 splits Motion into smoothness
and amplitude): 0.12 Aesthetics + 0.12 Motion + 0.20 FaceSim + 0.12 GmeScore + 0.20 NexusScore
+ 0.24 NaturalScore, with CLIP-T in GmeScore's place and ToyID in FaceSim's.
OpenS2V min-max normalises each column with a fixed range and clips it. Here the rewards already
return about [0, 1] (the RL composite adds them unscaled, docs/design.md 7): NaturalScore's
(x - 1) / 4 is OpenS2V's [1, 5] range, Aesthetic keeps OpenS2V's [4, 7] as [0.4, 0.7], Motion
OpenS2V's [0, 1] pixels per frame; FaceSim and the similarities use [0, 1] (OpenS2V's NexusScore
range, [0, 0.05], belongs to its own formula, not to our cosine NexusScore).

    total = sum_k w_k n_k / sum_k w_k,   n_k = clip((x_k - low_k) / (high_k - low_k), 0, 1)

over the columns k that were computed (skipped ones drop out, the rest are renormalised). Per
sample, x_k is the sample's value; the aggregate total uses the column means of n_k (OpenS2V
averages per-sample clipped scores, then combines), so it equals the mean of the per-sample
totals when every sample has every column. `--weights name=w,...` replaces the defaults.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from idcrafter.eval.motion import motion_score
from idcrafter.rewards.base import RewardModel, parse_weights
from idcrafter.utils.errors import ConfigError, FileFormatError

__all__ = [
    "BUILTIN_METRICS",
    "COLUMNS",
    "Column",
    "DEFAULT_WEIGHTS",
    "EvalItem",
    "REWARD_METRICS",
    "Report",
    "SKIP_ERRORS",
    "TOTAL",
    "attention_leakage",
    "check_weights",
    "evaluate",
    "load_attention",
    "normalise",
    "one_line",
    "title",
    "weighted_total",
]

TOTAL = "total"
SKIP_ERRORS = (ValueError, ImportError, OSError)  # MissingDependencyError is an ImportError


@dataclass(frozen=True)
class Column:
    """A benchmark column: its reward / metric name, table title, default weight and range."""

    key: str
    title: str
    weight: float = 0.0
    low: float = 0.0
    high: float = 1.0
    higher_is_better: bool = True

    def __post_init__(self):
        if not self.high > self.low:
            raise ValueError(f"column {self.key}: high must exceed low, got [{self.low}, {self.high}]")


COLUMNS: dict[str, Column] = {c.key: c for c in (
    Column("face", "FaceSim", 0.20),
    Column("nexus", "NexusScore", 0.20),
    Column("clip_text", "CLIP-T", 0.12),
    Column("clip_image", "CLIP-I", 0.0),
    Column("dino_image", "DINO-I", 0.0),
    Column("aesthetic", "Aesthetic", 0.12, 0.4, 0.7),
    Column("natural", "NaturalScore", 0.24),
    Column("toyid", "ToyID", 0.20),
    Column("motion", "Motion", 0.12, 0.0, 1.0),
    Column("leakage", "Leakage", 0.0, higher_is_better=False),
)}
REWARD_METRICS = ("face", "nexus", "clip_text", "clip_image", "dino_image", "aesthetic", "natural", "toyid")
BUILTIN_METRICS = ("motion", "leakage")
DEFAULT_WEIGHTS: dict[str, float] = {k: c.weight for k, c in COLUMNS.items() if c.weight > 0}


def title(key: str) -> str:
    if key == TOTAL:
        return "Total"
    if key in COLUMNS:
        return COLUMNS[key].title
    from idcrafter.eval.protocols import PROTOCOL_TABLES

    for table in PROTOCOL_TABLES.values():
        if key in table:
            return table[key][0]
    return key


def normalise(key: str, value: float) -> float:
    """A column value mapped to [0, 1] for the total (clipped; flipped when lower is better)."""
    column = COLUMNS.get(key, Column(key, key))
    n = min(max((value - column.low) / (column.high - column.low), 0.0), 1.0)
    return n if column.higher_is_better else 1.0 - n


def weighted_total(values: Mapping[str, float | None], weights: Mapping[str, float]) -> float | None:
    """sum_k w_k n_k / sum_k w_k over the weighted columns present in `values`; None if there are none."""
    used = {k: w for k, w in weights.items() if w > 0 and values.get(k) is not None}
    if not used:
        return None
    return sum(w * normalise(k, values[k]) for k, w in used.items()) / sum(used.values())


def check_weights(spec: str | Mapping[str, float] | None, known: Sequence[str] = tuple(COLUMNS)) -> dict[str, float]:
    """--weights "face=0.2,motion=0.1" (or a mapping; None: the defaults) -> {key: weight}; ConfigError if bad."""
    if spec is None:
        return dict(DEFAULT_WEIGHTS)
    try:
        weights = parse_weights(spec)
    except ValueError as err:
        raise ConfigError(f"--weights: {err}") from None
    unknown = sorted(set(weights) - set(known))
    if unknown:
        raise ConfigError(f"--weights: unknown column {', '.join(unknown)}; known: {', '.join(known)}")
    return weights


# ------------------------------------------------------------------------------------ leakage
def attention_leakage(share: np.ndarray, masks: np.ndarray, grid: Sequence[int]) -> float:
    """docs/design.md 3.3 leakage of one sample from captured ref-restricted attention shares.

    Args:
        share: [N, L] or [layers, N, L], share(i, k) of target token i on subject k's references.
        masks: [N, H, W] or [N, T, H, W] subject masks in [0, 1] (H, W multiples of the token grid).
        grid: (h, w) or (t, h, w) target token grid, L = prod(grid).
    Returns:
        mean over layers and over tokens inside some mask of 1 - share(i, k(i)); 0 = no leakage.
    """
    import torch

    from idcrafter.core.regularization import leakage, masks_to_token_assignment

    share = torch.as_tensor(np.asarray(share, np.float32))
    if share.dim() == 2:
        share = share[None]
    assignment = masks_to_token_assignment(torch.as_tensor(np.asarray(masks, np.float32))[None], [int(g) for g in grid])
    return float(leakage([layer[None] for layer in share], assignment))


def load_attention(path: Path) -> dict[str, np.ndarray]:
    """An attention file `<id>.npz` with arrays `share`, `masks`, `grid` (see `attention_leakage`)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("share", "masks", "grid") if k not in data]
            if missing:
                raise FileFormatError(f"attention file {path}: missing array {', '.join(missing)} (needs share, masks, grid)")
            return {k: data[k] for k in ("share", "masks", "grid")}
    except FileFormatError:
        raise
    except Exception as err:  # zip / format errors come in many types
        raise FileFormatError(f"attention file {path} cannot be read ({err.__class__.__name__}: {err})") from None


# ------------------------------------------------------------------------------------ items
def read_image(path: Path) -> np.ndarray:
    """A generated still image -> uint8 [1, H, W, 3]."""
    from idcrafter.utils.media import load_rgb

    return np.asarray(load_rgb(path, "generated image"))[None].copy()


@dataclass
class EvalItem:
    """One benchmark sample with its generated media.

    frames: uint8 [F, H, W, 3] in memory, or None to decode `path` (mp4 or image) when evaluated.
    attention: None, an `.npz` path, or a dict with share / masks / grid (see `attention_leakage`).
    ref_paths: the references' paths as the benchmark file or manifest names them (OpenS2V picks the
        face reference by its folder, e.g. ".../man/..."), one per entry of `refs`.
    descriptors: the manifest's `descriptor` of each reference (None where it gives none), one per
        entry of `refs`, or empty (One-for-All's FashionCLIP-T reads the clothing descriptions).
    """

    id: str
    prompt: str
    refs: list[np.ndarray]
    categories: list[str] = field(default_factory=list)
    frames: np.ndarray | None = None
    path: Path | None = None
    attention: Path | Mapping[str, Any] | None = None
    ref_paths: list[str] = field(default_factory=list)
    descriptors: list[str | None] = field(default_factory=list)

    def load(self) -> np.ndarray:
        if self.frames is not None:
            return np.asarray(self.frames)
        if self.path is None:
            raise ValueError(f"sample {self.id}: neither frames nor a path")
        from idcrafter.data.manifest import is_video_path
        from idcrafter.utils.media import read_video

        return read_video(self.path) if is_video_path(self.path) else read_image(self.path)

    def leakage(self) -> float | None:
        if self.attention is None:
            return None
        data = load_attention(Path(self.attention)) if isinstance(self.attention, (str, Path)) else self.attention
        try:
            return attention_leakage(data["share"], data["masks"], data["grid"])
        except (ValueError, RuntimeError, IndexError) as err:
            where = self.attention if isinstance(self.attention, (str, Path)) else f"sample {self.id}"
            raise FileFormatError(f"attention file {where}: {str(err).splitlines()[0]}") from None


# ------------------------------------------------------------------------------------ report
@dataclass
class Report:
    """Per-sample values and aggregates of every computed column; what was skipped and why.

    values: column key -> one value per sample (None where the column does not apply, e.g. Motion
    of a still image). Column keys are metric names, reward component names (face_mean, ...) and
    `total`; `title(key)` gives the table header.
    """

    ids: list[str]
    columns: list[str]
    values: dict[str, list[float | None]]
    weights: dict[str, float]
    skipped: dict[str, str] = field(default_factory=dict)
    warnings: dict[str, dict[str, int]] = field(default_factory=dict)
    components: dict[str, list[str]] = field(default_factory=dict)
    kinds: list[str] = field(default_factory=list)
    examples: list[tuple[str, np.ndarray]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def main_columns(self) -> list[str]:
        """Columns that are not components of a reward (face_mean, ...)."""
        owned = {c for cs in self.components.values() for c in cs}
        return [k for k in self.columns if k not in owned]

    def mean(self, key: str) -> float | None:
        if key == TOTAL:
            return self.total()
        present = [v for v in self.values[key] if v is not None]
        return float(np.mean(present)) if present else None

    def count(self, key: str) -> int:
        return sum(v is not None for v in self.values[key])

    @property
    def used_weights(self) -> dict[str, float]:
        """The weights of the columns that entered the total."""
        return {k: w for k, w in self.weights.items() if w > 0 and k in self.values and self.count(k) > 0}

    def total(self) -> float | None:
        """Aggregate total: weights times the column means of the normalised per-sample values."""
        used = self.used_weights
        if not used:
            return None
        means = {k: float(np.mean([normalise(k, v) for v in self.values[k] if v is not None])) for k in used}
        return sum(used[k] * means[k] for k in used) / sum(used.values())

    @property
    def aggregates(self) -> dict[str, float | None]:
        return {k: self.mean(k) for k in self.columns}

    def row(self, i: int) -> dict[str, float | None]:
        return {k: self.values[k][i] for k in self.columns}


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{err.__class__.__name__}: {text[0]}" if text else err.__class__.__name__


def _component_key(reward: str, component: str) -> str:
    return component if component.startswith(reward) else f"{reward}_{component}"


def _example_frames(frames: np.ndarray, count: int, height: int = 96) -> np.ndarray:
    """Up to `count` evenly spaced frames, shrunk to at most `height` pixels high, for the summary strip."""
    index = np.unique(np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int))
    picked = frames[index]
    step = max(1, int(math.ceil(picked.shape[1] / height)))
    return picked[:, ::step, ::step].copy()


def evaluate(
    items: Sequence[EvalItem],
    rewards: Mapping[str, RewardModel | None],
    metrics: Sequence[str] = BUILTIN_METRICS,
    skipped: Mapping[str, str] | None = None,
    weights: str | Mapping[str, float] | None = None,
    extra_columns: Mapping[str, Sequence[float | None]] | None = None,
    flow: str = "lucas-kanade",
    batch_size: int = 4,
    examples: int = 8,
    example_frames: int = 4,
    progress: bool = True,
) -> Report:
    """Score generated samples with reward models and the built-in metrics.

    Args:
        items: the samples, in report order.
        rewards: column key -> reward model (`idcrafter.rewards.base.RewardModel` interface), or None
            for one that is not available (skipped; the reason from `skipped`). A reward
            that raises ValueError / ImportError (MissingDependencyError) / OSError, at any batch, is
            skipped with that one-line reason and contributes no values.
        metrics: built-in metrics to compute: "motion" and/or "leakage".
        skipped: column key -> reason, columns skipped before the call (listed in the report).
        weights: weights of the total (str "k=w,..." or a mapping; None: `DEFAULT_WEIGHTS`).
        extra_columns: precomputed per-sample columns (key -> one value per item) added as is.
        flow: optical-flow method of Motion ("lucas-kanade" or "farneback").
        batch_size: samples decoded and scored at once (memory: batch_size videos).
        examples, example_frames: samples (first ones) and frames per sample kept for the picture.
    """
    unknown = sorted(set(metrics) - set(BUILTIN_METRICS))
    if unknown:
        raise ConfigError(f"unknown built-in metric {', '.join(unknown)}; known: {', '.join(BUILTIN_METRICS)}")
    weights = check_weights(weights, known=sorted({*COLUMNS, *rewards, *(extra_columns or {})}))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    from tqdm.auto import tqdm

    n = len(items)
    skipped = dict(skipped or {})
    for key, model in rewards.items():
        if model is None:
            skipped.setdefault(key, "no model given")
    active = {k: m for k, m in rewards.items() if m is not None}
    values: dict[str, list[float | None]] = {}
    components: dict[str, list[str]] = {k: [] for k in active}
    warnings: dict[str, Counter] = {k: Counter() for k in active}
    builtin = {m: [None] * n for m in metrics}
    kinds: list[str] = []
    kept: list[tuple[str, np.ndarray]] = []

    def drop(key: str, reason: str) -> None:
        skipped[key] = reason
        active.pop(key, None)
        for column in [key, *components.pop(key, [])]:
            values.pop(column, None)
        warnings.pop(key, None)

    batches = range(0, n, batch_size)
    for start in tqdm(batches, desc="evaluate", unit="batch", disable=not progress):
        batch = items[start : start + batch_size]
        frames = [item.load() for item in batch]
        kinds += ["video" if len(f) > 1 else "image" for f in frames]
        for item, f in zip(batch, frames):
            if len(kept) < examples:
                kept.append((item.id, _example_frames(f, example_frames)))
        prompts = [item.prompt for item in batch]
        refs = [list(item.refs) for item in batch]
        meta = [{"categories": list(item.categories), "id": item.id} for item in batch]
        for key, model in list(active.items()):
            try:
                out = model(frames, prompts, refs, meta)
            except SKIP_ERRORS as err:
                drop(key, one_line(err) if start == 0 else f"failed at sample {start + 1}: {one_line(err)}")
                continue
            scores = out.scores.detach().cpu().numpy().astype(float)
            values.setdefault(key, [None] * n)[start : start + len(batch)] = scores.tolist()
            for name, value in out.components.items():
                if name in (key, getattr(model, "name", None)):
                    continue
                column = _component_key(key, name)
                if column not in components[key]:
                    components[key].append(column)
                values.setdefault(column, [None] * n)[start : start + len(batch)] = (
                    value.detach().cpu().numpy().astype(float).tolist())
            warnings[key].update(out.warnings)
        for j, (item, f) in enumerate(zip(batch, frames)):
            if "motion" in builtin:
                builtin["motion"][start + j] = motion_score(f, flow)
            if "leakage" in builtin:
                builtin["leakage"][start + j] = item.leakage()

    if "motion" in builtin:
        if all(v is None for v in builtin["motion"]):
            skipped["motion"] = "every sample is a still image (Motion needs 2 or more frames)"
        else:
            values["motion"] = builtin["motion"]
    if "leakage" in builtin:
        if all(v is None for v in builtin["leakage"]):
            skipped["leakage"] = "no attention shares (put <id>.npz with share, masks, grid next to each video)"
        else:
            values["leakage"] = builtin["leakage"]
    for key, column in (extra_columns or {}).items():
        if len(column) != n:
            raise ValueError(f"extra column {key}: {len(column)} values for {n} samples")
        values[key] = [None if v is None else float(v) for v in column]

    # Table order: the documented columns, then other rewards, then extra columns; components after their reward.
    owned = {c for cs in components.values() for c in cs}
    main = [k for k in COLUMNS if k in values] + [k for k in values if k not in COLUMNS and k not in owned]
    columns = [c for k in main for c in (k, *components.get(k, ()))]
    report = Report(ids=[item.id for item in items], columns=columns, values=values, weights=weights,
                    skipped=skipped, warnings={k: dict(c) for k, c in warnings.items() if c},
                    components={k: cs for k, cs in components.items() if cs}, kinds=kinds, examples=kept)
    if report.used_weights:
        values[TOTAL] = [weighted_total(report.row(i), weights) for i in range(n)]
        report.columns.append(TOTAL)
    else:
        report.skipped[TOTAL] = f"no column with a positive weight was computed (weights: {weights})"
    return report
