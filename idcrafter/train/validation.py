"""Validation samples during SFT (docs/design.md 6): every `--validate-every` steps the trainer
samples a fixed held-out set with the training model and writes them as one PNG strip per step
(`run/validation/step_XXXXXXXX.png`) and as images in TensorBoard (`validation/<i>`).

Strip layout: one row per sample; each row is the sample's reference images (fitted on a white
cell of the output size, blank cells where a sample has fewer references than the most in the
set), then `VALIDATION_FRAMES` evenly spaced frames of the video (one cell for an image). So the
strip is K * H pixels high and (max references + frames) * W wide. TensorBoard gets each row as an
image: `add_video` needs moviepy, which the project does not install.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Frames of a video shown per row (evenly spaced, first and last included).
VALIDATION_FRAMES = 4


def frame_indices(num_frames: int, count: int = VALIDATION_FRAMES) -> list[int]:
    """`count` evenly spaced indices into `num_frames` frames, first and last included (all of them
    when there are no more than `count`)."""
    if num_frames <= count:
        return list(range(num_frames))
    return [round(i * (num_frames - 1) / (count - 1)) for i in range(count)]


def reference_cell(path: str | Path, height: int, width: int) -> np.ndarray:
    """A reference image file fitted on a white height x width canvas: uint8 [H, W, 3]."""
    from idcrafter.utils.media import fit_on_canvas, load_rgb

    return np.asarray(fit_on_canvas(load_rgb(path), height, width), dtype=np.uint8)


def sample_row(refs: list[np.ndarray], frames: np.ndarray, ref_columns: int) -> np.ndarray:
    """One row of the strip: `ref_columns` reference cells (white past the sample's own), then the
    chosen frames of `frames` [T, H, W, 3] uint8 side by side: uint8 [H, (ref_columns + n) * W, 3]."""
    t, h, w, _ = frames.shape
    blank = np.full((h, w, 3), 255, dtype=np.uint8)
    cells = list(refs[:ref_columns]) + [blank] * (ref_columns - min(len(refs), ref_columns))
    cells += [frames[i] for i in frame_indices(t)]
    return np.concatenate(cells, axis=1)


def validation_rows(samples: list[np.ndarray], refs: list[list[str | Path]]) -> list[np.ndarray]:
    """The strip's rows: `samples` (uint8 [T, H, W, 3] videos or [H, W, 3] images) with their
    reference image files; every row has as many reference columns as the sample with most."""
    ref_columns = max((len(r) for r in refs), default=0)
    rows = []
    for sample, paths in zip(samples, refs):
        frames = sample[None] if sample.ndim == 3 else sample
        h, w = frames.shape[1:3]
        rows.append(sample_row([reference_cell(p, h, w) for p in paths], frames, ref_columns))
    return rows


def strip_path(folder: str | Path, step: int) -> Path:
    return Path(folder) / "validation" / f"step_{step:08d}.png"


def write_validation(folder: str | Path, step: int, rows: list[np.ndarray], writer=None) -> Path:
    """Write the rows as one PNG (atomically; a resumed run overwrites a step's strip) and, with a
    TensorBoard `writer`, each row as image `validation/<i>` at `step`. Returns the PNG path."""
    from idcrafter.utils.media import write_image

    path = write_image(np.concatenate(rows, axis=0), strip_path(folder, step))
    if writer is not None:
        for i, row in enumerate(rows):
            writer.add_image(f"validation/{i}", row, step, dataformats="HWC")
        writer.flush()
    return path
