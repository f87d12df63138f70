"""Writing curated samples and the run's report (docs/design.md 8.1, the last step of a run).

A kept candidate becomes one manifest line (docs/design.md 8) and its files, named by the
candidate's key under the output folder:

    videos/KEY.mp4 | images/KEY.png      the training target (the clip, or the target frame)
    masks/KEY_K.mp4 | masks/KEY_K.png    subject K's mask, aligned with the target (grey, 255 = subject)
    masks/KEY_K_face.png                 (MultiCrafter) the face mask: the body mask inside the face box
                                         of the target frame's keypoints, when the keypoints stage ran
    refs/KEY_K.png                       subject K's reference (subject on white, another frame)
    refs/KEY_K_face.png                  the face crop, when found (MultiCrafter App. C)

Every file is written atomically (`idcrafter.utils.io.atomic_write`, decoded before it takes its
name). A candidate that cannot make a valid line raises `SampleError` with a short reason, which
the runner counts in the funnel's `write` row. `report.json` holds the funnel (per stage: in,
kept, dropped by reason, seconds, items per second) and every drop; `funnel.png` draws it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from idcrafter.curate.core import Candidate
from idcrafter.utils.io import atomic_write

__all__ = ["SampleError", "face_box", "face_mask", "funnel_figure", "mask_frames", "split_subjects", "subject_bbox", "write_report", "write_sample",
           "write_samples"]


class SampleError(ValueError):
    """A candidate that cannot become a manifest line; the message is the funnel's reason."""


def mask_frames(masks: np.ndarray) -> np.ndarray:
    """(T, H, W) bool -> (T, H, W) uint8, 255 on the subject: what the data loader reads back as 1."""
    return np.where(np.asarray(masks, dtype=bool), 255, 0).astype(np.uint8)


def subject_bbox(boxes: np.ndarray, frame: int = 0) -> list[float] | None:
    """The subject's pixel box [x0, y0, x1, y1] in `frame` of the target, or in its first frame
    where it is present; None when it is present nowhere or the box is degenerate."""
    boxes = np.asarray(boxes, dtype=np.float64)
    present = np.flatnonzero(~np.isnan(boxes).any(axis=1))
    if not len(present):
        return None
    row = boxes[frame] if frame in present else boxes[present[0]]
    x0, y0, x1, y1 = (round(float(v), 2) for v in row)
    return [x0, y0, x1, y1] if x0 < x1 and y0 < y1 else None


def face_box(keypoints: np.ndarray, min_score: float = 0.3) -> np.ndarray | None:
    """(17, 3) COCO keypoints (x, y, score) of one person in one frame -> the pixel box
    [x0, y0, x1, y1] of the face: a square centred on the confident face points (nose, eyes, ears:
    indices 0-4), twice their largest spread on a side; None with fewer than two such points."""
    points = np.asarray(keypoints, np.float64)[:5]
    points = points[(points[:, 2] >= min_score) & np.isfinite(points[:, :2]).all(axis=1)]
    if len(points) < 2:
        return None
    centre = points[:, :2].mean(axis=0)
    half = max(float(np.ptp(points[:, 0])), float(np.ptp(points[:, 1])), 1.0)  # twice the spread: half = spread
    return np.array([centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half])


def face_mask(mask: np.ndarray, keypoints: np.ndarray | None, min_score: float = 0.3) -> np.ndarray | None:
    """(H, W) bool body mask and (17, 3) keypoints -> the body mask inside the face box (MultiCrafter
    App. C keeps "body and face masks"); None without a face box."""
    box = None if keypoints is None else face_box(keypoints, min_score)
    if box is None:
        return None
    height, width = mask.shape
    x0, y0 = max(int(np.floor(box[0])), 0), max(int(np.floor(box[1])), 0)
    x1, y1 = min(int(np.ceil(box[2])), width), min(int(np.ceil(box[3])), height)
    out = np.zeros_like(mask, dtype=bool)
    out[y0:y1, x0:x1] = mask[y0:y1, x0:x1]
    return out if out.any() else None


def _write_png(array: np.ndarray, path: Path) -> str:
    from idcrafter.utils.media import write_image

    write_image(np.asarray(array), path)
    return path.name


def write_sample(candidate: Candidate, kind: str, out: str | Path, masks: str = "mp4", face_masks: bool = False) -> dict[str, Any]:
    """Write `candidate`'s files under `out` and return its manifest line (paths relative to `out`).

    kind "video": the clip as mp4 at the clip's frame rate (`info["target_fps"]`), masks as mp4
    (`masks="mp4"`) or the first frame's as PNG; kind "image": the target frame as PNG, masks as
    PNG. Raises SampleError: "no subjects", "no prompt", "subject without reference",
    "descriptor not in prompt".
    """
    from idcrafter.utils.media import write_video

    if kind not in ("video", "image"):
        raise ValueError(f"kind must be 'video' or 'image', got {kind!r}")
    if masks not in ("mp4", "png"):
        raise ValueError(f"masks must be 'mp4' or 'png', got {masks!r}")
    out = Path(out)
    key = candidate.key
    if not candidate.subjects:
        raise SampleError("no subjects")
    if not candidate.prompt or not candidate.prompt.strip():
        raise SampleError("no prompt")
    for track in candidate.subjects:
        if track.reference is None:
            raise SampleError("subject without reference")
        if track.descriptor and track.descriptor not in candidate.prompt:
            raise SampleError("descriptor not in prompt")
    record: dict[str, Any] = {"id": key}
    if kind == "video":
        fps = float(candidate.info.get("target_fps") or candidate.fps)
        write_video(candidate.frames, out / "videos" / f"{key}.mp4", fps=fps)
        record.update(video=f"videos/{key}.mp4", fps=fps)
    else:
        record["image"] = "images/" + _write_png(candidate.frames[0], out / "images" / f"{key}.png")
    record["prompt"] = candidate.prompt
    subjects = []
    for k, track in enumerate(candidate.subjects):
        entry: dict[str, Any] = {"image": "refs/" + _write_png(track.reference, out / "refs" / f"{key}_{k}.png"),
                                 "category": track.category}
        if track.face is not None:
            _write_png(track.face, out / "refs" / f"{key}_{k}_face.png")
        if track.masks is not None:
            frames = mask_frames(track.masks)
            if kind == "video" and masks == "mp4":
                write_video(frames, out / "masks" / f"{key}_{k}.mp4", fps=record["fps"])
                entry["mask"] = f"masks/{key}_{k}.mp4"
            else:
                entry["mask"] = "masks/" + _write_png(np.repeat(frames[0][..., None], 3, -1), out / "masks" / f"{key}_{k}.png")
        if face_masks and track.masks is not None:
            face = track.info.get("face_mask")
            if face is None:  # from the target frame's keypoints (ViTPose), when the keypoints stage ran
                face = face_mask(np.asarray(track.masks[0], bool), None if track.keypoints is None else track.keypoints[0])
            if face is not None:
                _write_png(np.repeat(mask_frames(np.asarray(face)[None])[0][..., None], 3, -1),
                           out / "masks" / f"{key}_{k}_face.png")
        bbox = subject_bbox(track.boxes)
        if bbox is not None:
            entry["bbox"] = bbox
        if track.descriptor:
            entry["descriptor"] = track.descriptor
        subjects.append(entry)
    record["subjects"] = subjects
    return record


def split_subjects(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One manifest line per subject (`KEY-K`, same target and prompt): One-for-All trains on
    single-subject pairs only (One-for-All App. H), so a frame showing a face and a bag gives two."""
    return [{**record, "id": f"{record['id']}-{k}", "subjects": [subject]} for k, subject in enumerate(record["subjects"])]


def write_samples(candidate: Candidate, kind: str, out: str | Path, masks: str = "mp4", face_masks: bool = False,
                  per_subject: bool = False) -> list[dict[str, Any]]:
    """`write_sample`'s line, or with `per_subject` one line per subject (`split_subjects`)."""
    record = write_sample(candidate, kind, out, masks=masks, face_masks=face_masks)
    return split_subjects(record) if per_subject else [record]


def _throughput(row: dict[str, Any]) -> float | None:
    return round(row["in"] / row["seconds"], 3) if row["seconds"] > 0 else None


def write_report(out: str | Path, funnel: dict[str, dict[str, Any]], drops: list[dict[str, Any]],
                 extra: dict[str, Any] | None = None) -> Path:
    """`out/report.json`: {"funnel": {stage: {in, kept, dropped: {reason: n}, seconds, per_second}},
    "drops": [{"source", "key", "stage", "reason"}], **extra}; then `out/funnel.png`."""
    rows = {stage: {**row, "per_second": _throughput(row)} for stage, row in funnel.items()}
    report = {**(extra or {}), "funnel": rows, "drops": drops}
    path = Path(out) / "report.json"
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    funnel_figure(rows, Path(out) / "funnel.png", title=str((extra or {}).get("preset", "")))
    return path


def funnel_figure(funnel: dict[str, dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Two horizontal bars per stage: candidates in (light) and kept (dark), each stage's drop
    reasons written beside them; written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(funnel)
    fig, ax = plt.subplots(figsize=(9, 0.6 * max(2, len(stages)) + 1.2))
    y = np.arange(len(stages))[::-1]
    ins = [funnel[s]["in"] for s in stages]
    kept = [funnel[s]["kept"] for s in stages]
    # side by side: a splitting stage (shots) keeps more candidates than came in
    ax.barh(y + 0.2, ins, height=0.38, color="#c8d6e5", label="in")
    ax.barh(y - 0.2, kept, height=0.38, color="#2e86de", label="kept")
    top = max(ins + kept + [1])
    for yi, stage in zip(y, stages):
        dropped = funnel[stage]["dropped"]
        text = ", ".join(f"{reason}: {n}" for reason, n in sorted(dropped.items(), key=lambda kv: -kv[1]))
        ax.text(top * 1.02, yi, text, va="center", fontsize=8)
    ax.set_yticks(y, [f"{s}: {funnel[s]['in']} -> {funnel[s]['kept']}" for s in stages])
    ax.set_xlim(0, top * 2.2)  # room for the reasons right of the bars
    ax.set_xlabel("candidates")
    ax.set_title(f"curation funnel {title}".strip())
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)
