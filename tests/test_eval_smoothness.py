"""OpenS2V-Eval v1.1 Motion Smoothness (idcrafter.eval.smoothness): the benchmark's windows and
artifact count against hand-worked cases, the window quality score of a tiny random Qwen2.5-VL saved
and loaded by path against an independent forward, and the column through scripts/evaluate.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from idcrafter.eval.smoothness import (
    LEVEL_WEIGHTS,
    artifact_frames,
    motion_smoothness,
    sliding_windows,
)


def test_sliding_windows_follow_the_benchmark_including_its_edge_quirks():
    # window 3 over 5 frames: left 1, right 1. t = 0 is below `left`: its window [0, 0, 1] is replaced by
    # frame 0 three times; t = 4 is clamped to [3, 4] and padded at the front (start != 0) -> [3, 3, 4].
    assert sliding_windows(5, 3) == [[0, 0, 0], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 3, 4]]
    # window 5 over 4 frames: left 2, right 2. t = 0, 1 -> frame 0 five times; t = 2 -> [0..3] padded at
    # the end (start == 0) -> [0, 1, 2, 3, 3]; t = 3 -> [1, 2, 3] padded at the front twice.
    assert sliding_windows(4, 5) == [[0] * 5, [0] * 5, [0, 1, 2, 3, 3], [1, 1, 1, 2, 3]]
    assert sliding_windows(1, 3) == [[0, 0, 0]]
    # window 4 (even): left 1, right 2
    assert sliding_windows(4, 4)[1] == [0, 1, 2, 3] and sliding_windows(4, 4)[3] == [2, 2, 2, 3]
    with pytest.raises(ValueError):
        sliding_windows(0, 3)


def test_artifact_frames_and_smoothness_by_hand():
    scores = [0.50, 0.51, 0.60, 0.60, 0.30, 0.30, 0.31]
    # jumps: |0.01| no, |0.09| at 1->2 yes, 0 no, |0.30| at 3->4 yes, 0 no, |0.01| no
    assert artifact_frames(scores).tolist() == [1, 2, 3, 4]
    assert motion_smoothness(scores) == pytest.approx(1 - 4 / 7)
    assert motion_smoothness([0.5] * 9) == 1.0
    # the threshold is strict (>): a jump of exactly the threshold (0.25, exact in binary) is not an artifact
    assert artifact_frames([0.5, 0.75], threshold=0.25).tolist() == []
    assert artifact_frames([0.5, 0.75 + 2**-20], threshold=0.25).tolist() == [0, 1]
    assert artifact_frames([0.0, 0.5, 0.0]).tolist() == [0, 1, 2]
    with pytest.raises(ValueError):
        motion_smoothness([])


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    from idcrafter.video.vlm import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("smooth") / "qwen", seed=3)


def frames_with_a_cut(count: int = 6, h: int = 40, w: int = 56) -> np.ndarray:
    """uint8 [count, h, w, 3]: a gradient that slides, then a hard cut to a different picture."""
    x = np.linspace(0, 255, w)[None, :, None]
    y = np.linspace(0, 255, h)[:, None, None]
    out = []
    for t in range(count):
        if t < count // 2:
            img = np.concatenate([np.broadcast_to((x + 20 * t) % 256, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                                  np.full((h, w, 1), 90.0)], axis=-1)
        else:
            img = np.concatenate([np.broadcast_to(255 - y, (h, w, 1)), np.full((h, w, 1), 30.0 * t),
                                  np.broadcast_to(x, (h, w, 1))], axis=-1)
        out.append(img)
    return np.asarray(out).astype(np.uint8)


def test_window_score_matches_an_independent_forward(tiny_vlm):
    import torch
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration

    from idcrafter.eval.smoothness import QualityScorer
    from idcrafter.rewards.natural import load_image_text_processor

    scorer = QualityScorer(tiny_vlm)
    frames = frames_with_a_cut()
    # Independently: the chat text written out by hand, each frame padded to a square by hand with the
    # processor's mean colour, the stock processor and model, the next-token logits of " excellent" ...
    processor = load_image_text_processor(tiny_vlm)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_vlm).eval()
    fill = [int(m * 255) for m in processor.image_processor.image_mean]
    words = ("excellent", "good", "fair", "poor", "bad")
    ids = [processor.tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in words]

    def square(f):
        h, w = f.shape[:2]
        side = max(h, w)
        canvas = np.empty((side, side, 3), np.uint8)
        canvas[:] = fill
        top, left = (side - h) // 2, (side - w) // 2
        canvas[top:top + h, left:left + w] = f
        return Image.fromarray(canvas)

    def by_hand(window):
        text = ("<|im_start|>user\n" + "<|vision_start|><|image_pad|><|vision_end|>" * len(window)
                + "How would you rate the quality of this video?<|im_end|>\n<|im_start|>assistant\n"
                + "The quality of the video is")
        inputs = processor(text=[text], images=[square(f) for f in window], return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1, ids].double()
        return float(torch.softmax(logits, -1) @ torch.tensor(LEVEL_WEIGHTS, dtype=torch.float64))

    windows = sliding_windows(len(frames), 3)
    expected = [by_hand(frames[idx]) for idx in windows]
    got = [scorer.window_score(frames[idx]) for idx in windows]
    assert np.abs(np.array(got) - np.array(expected)).max() < 1e-6
    assert all(0.0 <= s <= 1.0 for s in got)
    assert np.ptp(expected) > 1e-4  # the windows do score differently
    assert scorer(frames) == pytest.approx(motion_smoothness(expected))
    assert scorer(frames[:1]) is None  # a still image has no Motion Smoothness


def test_evaluate_cli_leaderboard_v1_1_reports_motion_smoothness(tiny_vlm, tmp_path):
    from PIL import Image

    from idcrafter.cli import evaluate as script
    from idcrafter.eval.smoothness import QualityScorer
    from idcrafter.utils.media import read_video, write_video

    (tmp_path / "gen").mkdir()
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(tmp_path / "ref.png")
    write_video(frames_with_a_cut(8, 48, 64), tmp_path / "gen" / "s0.mp4", fps=8)
    (tmp_path / "bench.jsonl").write_text(json.dumps({"id": "s0", "video": "t.mp4", "prompt": "a thing", "subjects": [
        {"image": "ref.png", "category": "object"}]}) + "\n")
    out = tmp_path / "out"
    assert script.main(["--data", str(tmp_path / "bench.jsonl"), "--videos", str(tmp_path / "gen"), "--out", str(out),
                        "--no-progress", "--leaderboard", "v1.1", "--model-option", f"smoothness.path={tiny_vlm}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    expected = QualityScorer(tiny_vlm)(read_video(tmp_path / "gen" / "s0.mp4"))
    assert summary["columns"]["MotionSmoothness"]["mean"] == pytest.approx(expected)
    assert summary["opens2v"]["version"] == "v1.1"
    assert summary["opens2v"]["normalised"]["motion_smoothness"] == pytest.approx(min(abs(expected), 1.0))
    assert "motion_smoothness" not in summary["opens2v"]["totals"]["Open-Domain"]["missing"]
    assert "aesthetics" in summary["opens2v"]["totals"]["Open-Domain"]["missing"]
    # without the option, the column is skipped with the flag to pass
    bare = tmp_path / "bare"
    assert script.main(["--data", str(tmp_path / "bench.jsonl"), "--videos", str(tmp_path / "gen"), "--out", str(bare),
                        "--no-progress", "--leaderboard", "v1.1"]) == 0
    skipped = json.loads((bare / "summary.json").read_text())["skipped"]
    assert "--model-option smoothness.path=" in skipped["MotionSmoothness"]
    with pytest.raises(SystemExit) as exit_info:  # argparse's one-line error
        script.main(["--data", str(tmp_path / "bench.jsonl"), "--videos", str(tmp_path / "gen"), "--out",
                     str(tmp_path / "x"), "--leaderboard", "v2"])
    assert exit_info.value.code == 2 and not (tmp_path / "x").exists()
