"""idcrafter.data on real files: manifest validation and its CLI, frame sampling and decoding,
buckets and mask alignment, the dataset with skipped samples, collate, the bucket sampler, and
the feature cache."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from idcrafter.data import (
    DEFAULT_BUCKETS,
    Bucket,
    BucketBatchSampler,
    CacheMismatchError,
    FeatureCache,
    VideoDataset,
    VideoTooShort,
    buckets_for_area,
    build_cache,
    cache_fingerprint,
    collate,
    cover_crop_box,
    load_clip,
    load_manifest,
    nearest_bucket,
    probe_video,
    resize_and_crop,
    resize_and_crop_masks,
    sample_frame_indices,
)
from idcrafter.data.validate import main as validate_main
from idcrafter.utils.cli import InputError
from idcrafter.utils.errors import FileFormatError
from idcrafter.utils.media import read_video, write_video

ROOT = Path(__file__).resolve().parents[1]

# Small buckets so the dataset tests stay fast; sources are 64x128 (-> 32x64), 96x96, 128x64 (-> 64x32).
TINY_BUCKETS = (Bucket(32, 64), Bucket(64, 32), Bucket(48, 48))
SRC_FPS = 30


def square_x(frame: int) -> int:
    """Left edge of the moving square in source frame `frame` of the test video."""
    return 8 + 4 * frame


def moving_square(num: int, value: int = 255) -> np.ndarray:
    """[num, 64, 128, 3] uint8: black, a 16x16 square at rows 24:40 moving right 4 px a frame."""
    frames = np.zeros((num, 64, 128, 3), np.uint8)
    for i in range(num):
        frames[i, 24:40, square_x(i) : square_x(i) + 16] = value
    return frames


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A data folder: videos (good, short, corrupt), a mask video, references and masks."""
    root = tmp_path_factory.mktemp("data")
    (root / "videos").mkdir()
    (root / "refs").mkdir()
    (root / "masks").mkdir()
    write_video(moving_square(20), root / "videos" / "good.mp4", fps=SRC_FPS)
    write_video(moving_square(20), root / "masks" / "good_a.mp4", fps=SRC_FPS)
    write_video(np.full((16, 96, 96, 3), 90, np.uint8), root / "videos" / "square.mp4", fps=SRC_FPS)
    write_video(moving_square(5), root / "videos" / "short.mp4", fps=SRC_FPS)
    (root / "videos" / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    # RGBA reference with a transparent border: it must come out on white
    ref = np.zeros((40, 30, 4), np.uint8)
    ref[10:30, 5:25] = (200, 30, 30, 255)
    Image.fromarray(ref, "RGBA").save(root / "refs" / "a.png")
    Image.fromarray(np.full((50, 50, 3), 60, np.uint8)).save(root / "refs" / "b.png")
    (root / "refs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    # still mask for subject b of good.mp4: the region right of column 96
    mask_b = np.zeros((64, 128), np.uint8)
    mask_b[:, 96:] = 255
    Image.fromarray(mask_b, "L").save(root / "masks" / "good_b.png")
    # an image sample 128x64 with a bright rectangle and its mask
    still = np.zeros((128, 64, 3), np.uint8)
    still[32:96, 16:48] = 255
    Image.fromarray(still).save(root / "still.png")
    Image.fromarray(still[..., 0], "L").save(root / "masks" / "still.png")
    return root


def write_manifest(path: Path, records: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def good_records() -> list[dict]:
    return [
        {
            "id": "two", "video": "videos/good.mp4", "prompt": "the white square and a bar", "fps": 30, "split": "train",
            "subjects": [
                {"image": "refs/a.png", "mask": "masks/good_a.mp4", "category": "square", "bbox": [8, 24, 24, 40],
                 "descriptor": "the white square"},
                {"image": "refs/b.png", "mask": "masks/good_b.png", "category": "bar"},
            ],
        },
        {"id": "one", "video": "videos/good.mp4", "prompt": "a square", "split": "train",
         "subjects": [{"image": "refs/b.png", "category": "square"}]},
        {"id": "still", "image": "still.png", "prompt": "a rectangle", "split": "val",
         "subjects": [{"image": "refs/a.png", "mask": "masks/still.png", "category": "rectangle"}]},
    ]


# ---------------------------------------------------------------------------------------- manifest


def bad_manifest(files: Path) -> tuple[Path, dict[int, str]]:
    """A manifest mixing good lines with one of each kind of bad line; expected {line: reason}."""
    good = good_records()
    subject = {"image": "refs/a.png", "category": "x"}

    def sample(i, **changes):
        record = {"id": f"s{i}", "video": "videos/good.mp4", "prompt": "p", "subjects": [subject]}
        record.update(changes)
        return {k: v for k, v in record.items() if v is not None}

    records = [
        good[0],  # 1
        "",  # 2 blank: skipped
        '{"id": "x", "video": ',  # 3
        "[1, 2]",  # 4
        sample(5, id=None),  # 5
        sample(6, prompt=None),  # 6
        sample(7, image="still.png"),  # 7 both
        sample(8, video=None),  # 8 neither
        sample(9, subjects=None),  # 9
        sample(10, subjects=[]),  # 10
        sample(11, subjects={"image": "refs/a.png"}),  # 11
        sample(12, subjects=[{"category": "x"}]),  # 12
        sample(13, video="videos/nope.mp4"),  # 13
        sample(14, subjects=[{"image": "refs/nope.png", "category": "x"}]),  # 14
        sample(15, subjects=[{**subject, "mask": "masks/nope.png"}]),  # 15
        {**good[1], "id": "two"},  # 16 duplicate of line 1
        sample(17, caption="typo"),  # 17
        sample(18, subjects=[{**subject, "maks": "masks/good_b.png"}]),  # 18
        sample(19, subjects=[{**subject, "bbox": [1, 2, 3]}]),  # 19
        sample(20, subjects=[{**subject, "bbox": [5, 2, 3, 4]}]),  # 20
        sample(21, fps=-3),  # 21
        sample(22, fps="30"),  # 22
        good[2],  # 23
        sample(24, subjects=[{**subject, "descriptor": "a red hat"}]),  # 24: CCPA places a phrase of the prompt
    ]
    expected = {
        3: "not valid JSON",
        4: "must be a JSON object",
        5: "id is missing",
        6: "prompt is missing",
        7: "exactly one of 'video' or 'image', got both",
        8: "exactly one of 'video' or 'image', got neither",
        9: "subjects is missing",
        10: "subjects is empty",
        11: "subjects must be a list",
        12: "subjects[0].image is missing",
        13: "video 'videos/nope.mp4' does not exist",
        14: "subjects[0].image 'refs/nope.png' does not exist",
        15: "subjects[0].mask 'masks/nope.png' does not exist",
        16: "id 'two' is already used by line 1",
        17: "unknown key 'caption'",
        18: "subjects[0]: unknown key 'maks'",
        19: "subjects[0].bbox must be 4 numbers",
        20: "needs x0 < x1 and y0 < y1",
        21: "fps must be a positive number",
        22: "fps must be a positive number",
        24: "subjects[0].descriptor 'a red hat' does not occur in the prompt",
    }
    return write_manifest(files / "bad.jsonl", records), expected


def test_manifest_reports_every_bad_line(files):
    path, expected = bad_manifest(files)
    samples, errors = load_manifest(path)
    assert [s.id for s in samples] == ["two", "still"]
    assert [e.line for e in errors] == sorted(expected)
    for error in errors:
        assert expected[error.line] in error.message, (error.line, error.message)
        assert str(error).startswith(f"line {error.line}: ")
    two = samples[0]
    assert two.video == files / "videos" / "good.mp4" and two.video.is_absolute()
    assert two.subjects[0].mask == files / "masks" / "good_a.mp4" and two.subjects[1].bbox is None
    assert two.subjects[0].bbox == (8.0, 24.0, 24.0, 40.0) and two.fps == 30.0 and two.line == 1
    assert samples[1].image == files / "still.png" and samples[1].is_video is False

    # without file checks the three missing-file lines pass, every other error stays
    samples, errors = load_manifest(path, check_files=False)
    assert {e.line for e in errors} == set(expected) - {13, 14, 15}
    assert len(samples) == 5


def test_manifest_unreadable_raises(files):
    with pytest.raises(InputError, match="manifest not found"):
        load_manifest(files / "missing.jsonl")
    with pytest.raises(InputError, match="is a folder, not a manifest"):
        load_manifest(files)


def test_validate_cli_counts_and_exit_codes(files, capsys):
    good = write_manifest(files / "good.jsonl", good_records())
    bad, expected = bad_manifest(files)
    binary = files / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")

    assert validate_main([str(good)]) == 0
    out = capsys.readouterr().out
    assert "3 good samples, 0 bad lines" in out and "videos: 2, images: 1" in out
    assert "per sample: 1: 2, 2: 1" in out and "with masks: 3 subjects in 2 samples" in out
    assert "splits: train: 2, val: 1" in out

    assert validate_main([str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"{len(expected)} bad lines" in out
    for line, reason in expected.items():
        assert f"line {line}: " in out and reason in out
    assert validate_main([str(bad), "--no-check-files"]) == 1

    # as users run it: real processes, exit codes 0 / 1 / 2, a one-line error without a traceback
    cases = {0: [str(good)], 1: [str(bad)], 2: [str(files / "missing.jsonl")], 3: [str(binary)]}
    procs = {
        k: subprocess.Popen(
            [sys.executable, "-m", "idcrafter.data.validate", *args], cwd=ROOT, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for k, args in cases.items()
    }
    # docs/design.md 2: the data package does not pull in the video model code (nor diffusers) on import
    procs["import"] = subprocess.Popen(
        [sys.executable, "-c", "import sys, idcrafter.data, idcrafter.data.validate; "
         "print(sorted(m for m in sys.modules if m.startswith(('idcrafter.video', 'mcimage', 'diffusers'))))"],
        cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    results = {k: (p.wait(timeout=120), *p.communicate()) for k, p in procs.items()}
    assert results["import"][:2] == (0, "[]\n"), results["import"]
    assert results[0][0] == 0 and "3 good samples" in results[0][1]
    assert results[1][0] == 1 and "line 3: not valid JSON" in results[1][1]
    for k in (2, 3):
        rc, out, err = results[k]
        assert rc == 2 and out == "" and "Traceback" not in err
        assert err.count("\n") == 1 and err.startswith("error: ")
    assert "manifest not found" in results[2][2] and "cannot read the manifest" in results[3][2]


# ---------------------------------------------------------------------------------- frame sampling


def test_sample_frame_indices_numbers():
    # 30 fps -> 16 fps: stride 1.875; positions 0, 1.875, 3.75, 5.625, 7.5, 9.375, 11.25, 13.125, 15
    assert sample_frame_indices(16, 30, 16, 9) == [0, 2, 4, 6, 8, 9, 11, 13, 15]
    assert sample_frame_indices(100, 30, 16, 9, start=10) == [10, 12, 14, 16, 18, 19, 21, 23, 25]
    assert sample_frame_indices(20, 24, 16, 9) == [0, 2, 3, 5, 6, 8, 9, 11, 12]
    assert sample_frame_indices(9, 16, 16, 9) == list(range(9))
    assert sample_frame_indices(3, 8, 16, 5) == [0, 1, 1, 2, 2]  # slower source: frames repeat
    assert sample_frame_indices(8, 30, 16, 5) == [0, 2, 4, 6, 7]  # 7.5 rounds to 8, clipped to 7
    assert sample_frame_indices(1, 30, 16, 1) == [0]


def test_sample_frame_indices_errors():
    for bad in (0, 8, 10, 80):
        with pytest.raises(ValueError, match="4n\\+1"):
            sample_frame_indices(100, 30, 16, bad)
    with pytest.raises(VideoTooShort, match="has 15 frames.*need 16") as info:
        sample_frame_indices(15, 30, 16, 9)
    assert (info.value.num_source_frames, info.value.needed) == (15, 16)
    assert isinstance(info.value, FileFormatError)
    with pytest.raises(VideoTooShort):
        sample_frame_indices(20, 30, 16, 9, start=5)
    assert sample_frame_indices(20, 30, 16, 9, start=4)[-1] == 19
    with pytest.raises(ValueError, match="positive"):
        sample_frame_indices(20, 0, 16, 9)


def test_load_clip_decodes_the_sampled_frames(files):
    good = files / "videos" / "good.mp4"
    info = probe_video(good)
    assert (info.height, info.width, info.num_frames, info.fps) == (64, 128, 20, 30.0)
    clip = load_clip(good, 9, 16)
    assert clip.shape == (9, 64, 128, 3) and clip.dtype == np.uint8
    np.testing.assert_array_equal(clip, read_video(good)[[0, 2, 4, 6, 8, 9, 11, 13, 15]])
    np.testing.assert_array_equal(load_clip(good, 5, 16, start=3, source_fps=16), read_video(good)[3:8])
    with pytest.raises(VideoTooShort, match="short.mp4.*has 5 frames"):
        load_clip(files / "videos" / "short.mp4", 9, 16)
    with pytest.raises(FileFormatError, match="corrupt.mp4 cannot be decoded"):
        load_clip(files / "videos" / "corrupt.mp4", 9, 16)
    with pytest.raises(ValueError, match="4n\\+1"):
        load_clip(good, 8, 16)
    still = load_clip(files / "still.png", 9, 16)
    assert still.shape == (1, 128, 64, 3)


# ----------------------------------------------------------------------------------------- buckets


def test_buckets_choices():
    ratios = [832 / 480, 480 / 832, 1.0, 720 / 544, 544 / 720]
    assert buckets_for_area(480 * 832, ratios) == DEFAULT_BUCKETS
    for b in DEFAULT_BUCKETS:
        assert b.height % 16 == 0 and b.width % 16 == 0
        assert abs(b.height * b.width / (480 * 832) - 1) < 0.03
    assert nearest_bucket(1080, 1920) == Bucket(480, 832)
    assert nearest_bucket(1920, 1080) == Bucket(832, 480)
    assert nearest_bucket(1000, 1000) == Bucket(624, 624)
    assert nearest_bucket(480, 640) == Bucket(544, 720)
    assert nearest_bucket(640, 480) == Bucket(720, 544)
    assert nearest_bucket(1000, 1400) == Bucket(544, 720)  # 1.4 is nearer 1.32 than 1.73 in log scale
    assert nearest_bucket(64, 128, TINY_BUCKETS) == Bucket(32, 64)


def test_resize_and_crop_shapes_and_geometry():
    crop = cover_crop_box(100, 200, Bucket(64, 64))
    assert crop.scale == pytest.approx(0.64) and crop.resized == (64, 128) and crop.box == (0, 32, 64, 96)
    assert crop.source_box() == pytest.approx((50.0, 0.0, 150.0, 100.0))
    frames = np.random.default_rng(0).integers(0, 255, (3, 90, 160, 3), dtype=np.uint8)
    assert resize_and_crop(frames, Bucket(480, 832)).shape == (3, 480, 832, 3)
    assert resize_and_crop(frames, Bucket(624, 624)).shape == (3, 624, 624, 3)
    assert resize_and_crop(frames[:, :30, :40], Bucket(64, 64)).dtype == np.uint8


@pytest.mark.parametrize("source, bucket", [((100, 200), Bucket(64, 64)), ((30, 40), Bucket(64, 96)),
                                            ((120, 90), Bucket(48, 48))])
def test_masks_stay_aligned_with_frames(source, bucket):
    h, w = source
    frames = np.zeros((2, h, w, 3), np.uint8)
    masks = np.zeros((2, h, w), np.float32)
    top, left, size = h // 3, w // 2, max(h, w) // 6
    frames[0, top : top + size, left : left + size] = 255
    masks[0, top : top + size, left : left + size] = 1
    # a square across the crop's edge (bottom or right): partly cropped away
    frames[1, h - size :, int(w * 0.7) : int(w * 0.7) + size] = 255
    masks[1, h - size :, int(w * 0.7) : int(w * 0.7) + size] = 1
    out_frames = resize_and_crop(frames, bucket)
    out_masks = resize_and_crop_masks(masks, bucket)
    assert out_masks.shape == (2, bucket.height, bucket.width) and set(np.unique(out_masks)) <= {0.0, 1.0}
    for f in range(2):
        bright = out_frames[f, ..., 0] >= 128
        covered = out_masks[f] > 0
        assert bright.sum() > 0
        assert (bright == covered).mean() > 0.995  # the same pixels up to a boundary row
        assert (covered & (out_frames[f, ..., 0] < 64)).sum() == 0 and (bright & ~covered).sum() <= bright.sum() * 0.05


# ----------------------------------------------------------------------------------------- dataset


@pytest.fixture()
def dataset_samples(files):
    records = [
        *good_records(),
        {"id": "corrupt", "video": "videos/corrupt.mp4", "prompt": "x", "subjects": [{"image": "refs/a.png", "category": "x"}]},
        {"id": "short", "video": "videos/short.mp4", "prompt": "x", "subjects": [{"image": "refs/a.png", "category": "x"}]},
        {"id": "badref", "video": "videos/good.mp4", "prompt": "x", "subjects": [{"image": "refs/broken.png", "category": "x"}]},
        {"id": "square", "video": "videos/square.mp4", "prompt": "x", "subjects": [{"image": "refs/a.png", "category": "x"}]},
    ]
    samples, errors = load_manifest(write_manifest(files / "train.jsonl", records))
    assert errors == []
    return samples


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_dataset_items(dataset_samples):
    ds = VideoDataset(dataset_samples, num_frames=9, fps=16, buckets=TINY_BUCKETS, ref_size=(32, 24))
    item = ds[0]
    assert item["id"] == "two" and item["prompt"] == "the white square and a bar"
    assert item["categories"] == ["square", "bar"] and item["descriptors"] == ["the white square", None]
    assert item["bucket"] == (32, 64)
    video, refs, masks = item["video"], item["refs"], item["masks"]
    assert video.shape == (3, 9, 32, 64) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1 and video.min() < -0.9 and video.max() > 0.9
    assert refs.shape == (2, 3, 32, 24) and refs.min() >= -1 and refs.max() <= 1
    assert torch.allclose(refs[0, :, 0, 0], torch.ones(3))  # transparent corner composited on white
    assert item["subject_mask"].tolist() == [True, True] and item["subject_has_mask"].tolist() == [True, True]
    assert masks.shape == (2, 9, 32, 64) and masks.dtype == torch.float32
    assert set(masks.unique().tolist()) == {0.0, 1.0}

    # the mask video follows the square through the sampled source frames, on the video's pixels
    for f, source_frame in enumerate([0, 2, 4, 6, 8, 9, 11, 13, 15]):
        cols = masks[0, f].nonzero()[:, 1].float()
        assert cols.mean().item() == pytest.approx((square_x(source_frame) + 8) / 2 - 0.5, abs=0.6)
        bright = video[0, f] > 0
        assert (bright == (masks[0, f] > 0)).float().mean() > 0.99
    # the still mask (columns 96: of 128) is the same on every frame
    assert torch.equal(masks[1], masks[1, :1].expand(9, -1, -1))
    assert masks[1, 0, :, 48:].all() and not masks[1, 0, :, :48].any()

    one = ds[1]
    assert one["masks"] is None and one["refs"].shape == (1, 3, 32, 24)
    still = ds[2]
    assert still["bucket"] == (64, 32) and still["video"].shape == (3, 1, 64, 32)
    assert still["masks"].shape == (1, 1, 64, 32)
    assert torch.equal(still["masks"][0, 0] > 0, still["video"][0, 0] > 0)
    assert ds.failures == {}


def test_dataset_skips_and_counts_failures(dataset_samples):
    ds = VideoDataset(dataset_samples, num_frames=9, fps=16, buckets=TINY_BUCKETS, ref_size=(32, 24))
    records = _Records()
    logger = logging.getLogger("idcrafter.data.dataset")
    logger.addHandler(records)
    try:
        ids = [s.id for s in ds.samples]
        for _ in range(2):  # a second epoch: counted again, logged once
            for name in ("corrupt", "short", "badref"):
                assert ds[ids.index(name)] is None
    finally:
        logger.removeHandler(records)
    assert set(ds.failures) == {"corrupt", "short", "badref"}
    assert "cannot be decoded" in ds.failures["corrupt"]
    assert "has 5 frames" in ds.failures["short"] and "broken.png cannot be read" in ds.failures["badref"]
    assert ds.num_failures == 6 and len(records.messages) == 3
    # the good samples around them are untouched, never substituted
    assert ds[ids.index("square")]["id"] == "square" and ds[0]["id"] == "two"

    keys = ds.bucket_ids()
    assert keys[ids.index("corrupt")] is None
    assert keys[0] == keys[1] == (9, 32, 64) and keys[2] == (1, 64, 32) and keys[ids.index("square")] == (9, 48, 48)


def test_dataset_refuses_rather_than_truncates(files):
    subject = {"image": "refs/a.png", "category": "x"}
    records = [
        {"id": "many", "video": "videos/good.mp4", "prompt": "x", "subjects": [subject] * 4},
        {"id": "tall-mask", "video": "videos/good.mp4", "prompt": "x",
         "subjects": [{**subject, "mask": "still.png"}]},  # 128x64 mask on a 64x128 video
    ]
    samples, errors = load_manifest(write_manifest(files / "refuse.jsonl", records))
    assert errors == []
    ds = VideoDataset(samples, num_frames=9, buckets=TINY_BUCKETS, ref_size=(32, 24), max_subjects=3)
    assert ds[0] is None and ds[1] is None
    assert "4 subjects, more than max_subjects=3" in ds.failures["many"]
    assert "mask" in ds.failures["tall-mask"] and "aspect ratio" in ds.failures["tall-mask"]
    with pytest.raises(ValueError, match="4n\\+1"):
        VideoDataset(samples, num_frames=8)


def test_collate_pads_subjects_and_drops_failures(dataset_samples):
    ds = VideoDataset(dataset_samples, num_frames=9, fps=16, buckets=TINY_BUCKETS, ref_size=(32, 24))
    ids = [s.id for s in ds.samples]
    batch = collate([ds[1], ds[ids.index("corrupt")], ds[0]])
    assert batch["ids"] == ["one", "two"] and batch["prompts"] == ["a square", "the white square and a bar"]
    assert batch["num_skipped"] == 1 and batch["bucket"] == (32, 64)
    assert batch["video"].shape == (2, 3, 9, 32, 64)
    assert batch["refs"].shape == (2, 2, 3, 32, 24) and torch.all(batch["refs"][0, 1] == 0)
    assert batch["subject_mask"].tolist() == [[True, False], [True, True]]
    assert batch["has_masks"].tolist() == [False, True]
    assert batch["masks"].shape == (2, 2, 9, 32, 64)
    assert batch["masks"][0].sum() == 0 and torch.equal(batch["masks"][1], ds[0]["masks"])
    assert collate([ds[1]])["masks"] is None
    assert collate([ds[ids.index("corrupt")], ds[ids.index("short")]]) is None
    assert collate([None]) is None
    with pytest.raises(ValueError, match="mixes buckets"):
        collate([ds[0], ds[ids.index("square")]])

    loader = torch.utils.data.DataLoader(ds, batch_sampler=BucketBatchSampler(ds, 2, drop_last=False), collate_fn=collate)
    seen = []
    for b in loader:
        if b is not None:
            assert b["video"].shape[0] == len(b["ids"])
            seen += b["ids"]
    assert sorted(seen) == ["one", "square", "still", "two"]  # corrupt: no bucket; short, badref: skipped


def test_failure_log_with_workers_and_size_cache(dataset_samples, tmp_path, monkeypatch):
    log, sizes = tmp_path / "failures.jsonl", tmp_path / "sizes.json"
    ds = VideoDataset(dataset_samples, num_frames=9, fps=16, buckets=TINY_BUCKETS, ref_size=(32, 24),
                      failure_log=log, size_cache=sizes)
    keys = ds.bucket_ids()
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=BucketBatchSampler(keys, 1, drop_last=False), collate_fn=collate, num_workers=2
    )
    batches = list(loader)
    # workers keep their own `failures`; the main process counts the skipped samples per batch
    assert sum(b is None for b in batches) == 2 and sorted(b["ids"][0] for b in batches if b) == [
        "one", "square", "still", "two"]
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted(r["id"] for r in logged) == ["badref", "corrupt", "short"]
    assert {r["id"]: r["line"] for r in logged}["short"] == 5

    # a second launch reads the sizes from the size cache instead of the headers
    stored = json.loads(sizes.read_text())
    assert stored[str(ds.samples[0].media)][:2] == [64, 128]
    import idcrafter.data.dataset as dataset_module

    real = dataset_module.media_size

    def no_probe(path, **kwargs):
        assert str(path) not in stored, f"{path} was probed again"
        return real(path, **kwargs)

    monkeypatch.setattr(dataset_module, "media_size", no_probe)
    again = VideoDataset(dataset_samples, num_frames=9, fps=16, buckets=TINY_BUCKETS, size_cache=sizes)
    assert again.bucket_ids() == keys


def test_random_clip_start(dataset_samples):
    good = dataset_samples[1].video  # 20 frames at 30 fps: a 9-frame 16 fps clip can start at 0..4
    clips = [torch.from_numpy(resize_and_crop(load_clip(good, 9, 16, start=s), Bucket(32, 64))) for s in range(5)]

    def start_of(ds, epoch):
        ds.set_epoch(epoch)
        video = ((ds[1]["video"] + 1) * 127.5).round().permute(1, 2, 3, 0).to(torch.uint8)
        return [s for s, c in enumerate(clips) if torch.equal(c, video)]

    kwargs = dict(num_frames=9, fps=16, buckets=TINY_BUCKETS, ref_size=(32, 24), clip_start="random")
    a, b = VideoDataset(dataset_samples, **kwargs, seed=3), VideoDataset(dataset_samples, **kwargs, seed=3)
    starts = [start_of(a, e) for e in range(6)]
    assert all(len(s) == 1 for s in starts) and starts == [start_of(b, e) for e in range(6)]
    assert len({s[0] for s in starts}) > 1
    with pytest.raises(ValueError, match="feature cache"):
        VideoDataset(dataset_samples, **kwargs, cache=object())


# ----------------------------------------------------------------------------------------- sampler


def test_bucket_batch_sampler():
    keys = ["a"] * 12 + ["b"] * 9 + ["c"] * 3 + [None] * 2
    keys = [keys[i] for i in np.random.default_rng(1).permutation(len(keys))]

    def order(epoch=0, **kw):
        s = BucketBatchSampler(keys, 4, seed=7, **kw)
        s.set_epoch(epoch)
        return list(s)

    full = order()
    assert full == order() and full != order(epoch=1) and order(epoch=1) == order(epoch=1)
    assert full != BucketBatchSampler(keys, 4, seed=8).batches()
    assert all(len(b) == 4 and len({keys[i] for i in b}) == 1 for b in full)
    assert len(full) == 5  # a: 3, b: 2 (one left over), c: none

    # ranks: same count each, disjoint, together every full batch of the global order
    ranks = [BucketBatchSampler(keys, 4, num_replicas=2, rank=r, seed=7).batches() for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 2
    flat = [i for r in ranks for b in r for i in b]
    assert len(flat) == len(set(flat)) == 16

    ranks = [BucketBatchSampler(keys, 4, num_replicas=3, rank=r, seed=7, drop_last=False) for r in range(3)]
    batches = [s.batches(epoch=2) for s in ranks]
    assert [len(b) for b in batches] == [3, 3, 3]  # 3 + 3 + 1 batches over 3 ranks: 7 -> padded to 9
    covered = {i for r in batches for b in r for i in b}
    assert covered == {i for i, k in enumerate(keys) if k is not None}
    assert all(len({keys[i] for i in b}) == 1 for r in batches for b in r)
    exact = [BucketBatchSampler(keys, 3, num_replicas=4, rank=r, drop_last=False).batches() for r in range(4)]
    flat = [i for r in exact for b in r for i in b]  # 4 + 3 + 1 = 8 batches: no padding needed
    assert len(flat) == len(set(flat)) == 24

    # resuming part-way through an epoch sees exactly the tail, then later epochs start at 0
    resumed = BucketBatchSampler(keys, 4, seed=7, skip_batches=3)
    resumed.set_epoch(1)
    assert len(resumed) == len(order(epoch=1)) - 3
    assert list(resumed) == order(epoch=1)[3:]
    resumed.set_epoch(2)
    assert list(resumed) == order(epoch=2)
    with pytest.raises(ValueError):
        BucketBatchSampler(keys, 4, num_replicas=2, rank=2)


# ------------------------------------------------------------------------------------------- cache


def test_feature_cache_round_trip(tmp_path):
    fp = cache_fingerprint({"vae": "tiny-vae", "text": "tiny-t5"}, 9, TINY_BUCKETS, (32, 24))
    cache = FeatureCache(tmp_path / "cache", fingerprint=fp, shard_size=2)
    tensors = {
        f"s{i}": {"latents": torch.randn(4, 3, 4, 8), "ref_latents": torch.randn(i + 1, 4, 1, 4, 3).bfloat16(),
                  "vlm_mask": torch.tensor([True, i % 2 == 0])}
        for i in range(3)
    }
    for sample_id, value in tensors.items():
        cache.put(sample_id, value)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["index.json", "shard-00000.safetensors"]
    assert "s2" in cache and len(cache) == 3  # buffered, not yet on disk
    cache.flush()
    names = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert names == ["index.json", "shard-00000.safetensors", "shard-00001.safetensors"]  # no temp files

    reopened = FeatureCache(tmp_path / "cache", fingerprint=fp)
    assert reopened.ids() == ["s0", "s1", "s2"] and "s9" not in reopened and reopened.get("s9") is None
    for sample_id, value in tensors.items():
        got = reopened.get(sample_id)
        assert got.keys() == value.keys()
        for key in value:
            assert got[key].dtype == value[key].dtype and torch.equal(got[key], value[key])
    assert FeatureCache(tmp_path / "cache").fingerprint == fp  # no fingerprint: adopt the stored one

    with pytest.raises(CacheMismatchError, match="other settings.*num_frames\":17"):
        FeatureCache(tmp_path / "cache", fingerprint=cache_fingerprint({"vae": "tiny-vae", "text": "tiny-t5"}, 17,
                                                                       TINY_BUCKETS, (32, 24)))
    with pytest.raises(ValueError, match="fingerprint"):
        FeatureCache(tmp_path / "fresh").put("x", {"latents": torch.zeros(1)})

    # several writers fill one folder; a reader merges their indexes
    with FeatureCache(tmp_path / "cache", fingerprint=fp, writer="rank1") as other:
        other.put("r1", {"latents": torch.ones(2)})
    merged = FeatureCache(tmp_path / "cache", fingerprint=fp)
    assert merged.ids() == ["r1", "s0", "s1", "s2"] and torch.equal(merged.get("r1")["latents"], torch.ones(2))
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]


def test_build_cache_and_cached_dataset(dataset_samples, tmp_path):
    kwargs = dict(num_frames=9, fps=16, buckets=TINY_BUCKETS, ref_size=(32, 24))
    pixels = VideoDataset(dataset_samples, **kwargs)
    fp = cache_fingerprint({"vae": "pool8"}, 9, TINY_BUCKETS, (32, 24))
    cache = FeatureCache(tmp_path / "cache", fingerprint=fp)

    def encode(item):  # stands in for the VAE: 8x spatial average pooling
        latents = torch.nn.functional.avg_pool3d(item["video"], (1, 8, 8))
        return {"latents": latents, "ref_latents": item["refs"][:, :, None, ::8, ::8]}

    counts = build_cache(pixels, encode, cache, progress=False)
    assert counts == {"written": 4, "existing": 0, "failed": 3}
    assert set(pixels.failures) == {"corrupt", "short", "badref"}
    assert build_cache(pixels, encode, cache, progress=False)["existing"] == 4  # a rerun resumes

    cached = VideoDataset(dataset_samples, **kwargs, cache=FeatureCache(tmp_path / "cache", fingerprint=fp))
    item = cached[0]
    assert "video" not in item and "refs" not in item
    assert torch.equal(item["latents"], encode(pixels[0])["latents"]) and item["latents"].shape == (3, 9, 4, 8)
    assert torch.equal(item["masks"], pixels[0]["masks"])  # masks still come from the files
    batch = collate([cached[1], cached[0]])
    assert batch["latents"].shape == (2, 3, 9, 4, 8) and "video" not in batch
    assert batch["ref_latents"].shape == (2, 2, 3, 1, 4, 3) and torch.all(batch["ref_latents"][0, 1] == 0)
    assert batch["masks"].shape == (2, 2, 9, 32, 64)
    ids = [s.id for s in cached.samples]
    assert cached[ids.index("short")] is None and "not in the feature cache" in cached.failures["short"]
