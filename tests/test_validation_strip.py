"""The validation strip (idcrafter.train.validation): frame choice, row layout, PNG and TensorBoard."""

from __future__ import annotations

import numpy as np
from PIL import Image

from idcrafter.train.validation import frame_indices, strip_path, validation_rows, write_validation


def test_frame_indices_are_evenly_spaced_with_both_ends():
    assert frame_indices(9) == [0, 3, 5, 8]
    assert frame_indices(81) == [0, 27, 53, 80]
    assert frame_indices(3) == [0, 1, 2] and frame_indices(1) == [0]


def test_rows_hold_references_then_frames(tmp_path):
    """A sample with one reference gets a white cell where the other has its second reference;
    a video shows 4 of its frames, an image itself."""
    refs = []
    for k, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        refs.append(tmp_path / f"ref{k}.png")
        Image.new("RGB", (8, 16), colour).save(refs[-1])  # tall: fitted in the middle of a 16 x 16 cell
    video = np.stack([np.full((16, 16, 3), 10 * f, dtype=np.uint8) for f in range(9)])
    rows = validation_rows([video, video[0] + 1], [refs, refs[:1]])
    assert [r.shape for r in rows] == [(16, 16 * (2 + 4), 3), (16, 16 * (2 + 1), 3)]
    first = rows[0]
    assert first[8, 8].tolist() == [255, 0, 0] and first[8, 1].tolist() == [255, 255, 255]  # red, white margin
    assert first[8, 16 + 8].tolist() == [0, 0, 255]
    assert [int(first[0, 16 * (2 + j), 0]) for j in range(4)] == [0, 30, 50, 80]  # frames 0, 3, 5, 8
    assert (rows[1][:, 16:32] == 255).all() and (rows[1][:, 32:] == 1).all()


def test_write_validation_png_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 256, (16, 48, 3), dtype=np.uint8) for _ in range(3)]
    writer = SummaryWriter(str(tmp_path / "tb"))
    path = write_validation(tmp_path, 7, rows, writer)
    writer.close()
    assert path == strip_path(tmp_path, 7) == tmp_path / "validation" / "step_00000007.png"
    with Image.open(path) as im:
        np.testing.assert_array_equal(np.asarray(im), np.concatenate(rows))
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["validation/0", "validation/1", "validation/2"]
    assert [(e.step, e.width, e.height) for e in events.Images("validation/2")] == [(7, 48, 16)]
