"""scripts/evaluate.py and idcrafter.eval: optical flow, columns, the weighted total, skipping, bad input."""

from __future__ import annotations

import ast
import csv
import json
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from idcrafter.eval.inputs import build_rewards, load_items, parse_model_options
from idcrafter.eval.metrics import (
    DEFAULT_WEIGHTS,
    EvalItem,
    check_weights,
    evaluate,
    normalise,
    weighted_total,
)
from idcrafter.eval.motion import farneback_flow, lucas_kanade_flow, motion_score
from idcrafter.eval.report import OUTPUT_FILES, write_report
from idcrafter.rewards.base import RewardModel, RewardOutput, register_reward
from idcrafter.utils.cli import InputError
from idcrafter.utils.deps import MissingDependencyError, is_available
from idcrafter.utils.errors import ConfigError, FileFormatError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "scripts" / "evaluate.py")


# ------------------------------------------------------------------------------------ helpers
def texture(h: int = 96, w: int = 112, seed: int = 0, smooth: float = 2.0) -> np.ndarray:
    """Smooth random texture in [0, 1]: trackable everywhere, no flat regions."""
    t = ndimage.gaussian_filter(np.random.default_rng(seed).random((h, w)), smooth)
    return (t - t.min()) / (t.max() - t.min())


def shifted_clip(dx: float, dy: float, frames: int = 4, h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    """uint8 [F, H, W, 3]: a texture moving by (dx, dy) pixels per frame (wrapping, so every pixel moves)."""
    base = texture(h, w, seed, smooth=3.0)
    clip = [ndimage.shift(base, (dy * f, dx * f), order=3, mode="grid-wrap") for f in range(frames)]
    return np.repeat((np.clip(np.stack(clip), 0, 1) * 255).round().astype(np.uint8)[..., None], 3, axis=-1)


def run_script(*args, timeout=120):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def square_ref(colour) -> np.ndarray:
    ref = np.full((32, 32, 3), 255, np.uint8)
    ref[6:26, 6:26] = colour
    return ref


def write_bench(folder: Path, n: int = 3, image_ids: tuple[int, ...] = ()) -> Path:
    """A benchmark manifest with n samples (references on disk) and generated files in folder/gen:
    <id>.mp4 (a moving texture, 5 frames) or, for indices in image_ids, <id>.png."""
    from idcrafter.utils.media import write_video

    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "gen").mkdir(exist_ok=True)
    lines = []
    for i in range(n):
        Image.fromarray(square_ref((200, 40 * i, 40))).save(folder / "refs" / f"r{i}.png")
        clip = shifted_clip(1.0 + i, 0.0, frames=5, seed=i)
        if i in image_ids:
            Image.fromarray(clip[0]).save(folder / "gen" / f"s{i}.png")
        else:
            write_video(clip, folder / "gen" / f"s{i}.mp4", fps=8)
        lines.append(json.dumps({"id": f"s{i}", "video": f"truth/{i}.mp4", "prompt": f"a square number {i}",
                                 "subjects": [{"image": f"refs/r{i}.png", "category": "object"}]}))
    (folder / "bench.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "bench.jsonl"


class TableReward(RewardModel):
    """Returns fixed scores per sample id (meta["id"]), components and a warning per sample."""

    name = "table"

    def __init__(self, scores: dict[str, float], components: dict[str, dict[str, float]] | None = None,
                 warning: str | None = None):
        super().__init__()
        self.table, self.components, self.warning, self.calls = scores, components or {}, warning, 0

    def __call__(self, samples, prompts, refs, meta=None):
        self.calls += 1
        ids = [m["id"] for m in meta]
        assert all(s.dtype == np.uint8 and s.ndim == 4 for s in samples)
        comps = {k: torch.tensor([v[i] for i in ids]) for k, v in self.components.items()}
        scores = torch.tensor([self.table[i] for i in ids])
        warnings = Counter({self.warning: len(ids)}) if self.warning else Counter()
        return RewardOutput(scores, {self.name: scores, **comps}, warnings)


class FailingReward(RewardModel):
    name = "failing"

    def __init__(self, error: Exception, fail_at_call: int = 1):
        super().__init__()
        self.error, self.fail_at_call, self.calls = error, fail_at_call, 0

    def score(self, samples, prompts, refs, meta, warnings):
        self.calls += 1
        if self.calls >= self.fail_at_call:
            raise self.error
        return [0.5] * len(samples)


def items(n: int = 4, frames: int = 3) -> list[EvalItem]:
    return [EvalItem(id=f"s{i}", prompt=f"p{i}", refs=[square_ref((255, 0, 0))], categories=["object"],
                     frames=shifted_clip(0.0, 0.0, frames=frames, seed=i)) for i in range(n)]


# ------------------------------------------------------------------------------------ optical flow
@pytest.mark.parametrize("dx, dy", [(1.5, -0.7), (3.0, 2.0), (-5.0, 4.0)])
def test_lucas_kanade_recovers_a_known_translation(dx, dy):
    base = texture()
    moved = ndimage.shift(base, (dy, dx), order=3, mode="grid-wrap")
    flow = lucas_kanade_flow(base, moved)
    assert flow.shape == (96, 112, 2) and flow.dtype == np.float32
    est = flow[16:-16, 16:-16].reshape(-1, 2).mean(axis=0)
    assert abs(est[0] - dx) <= 0.1 * abs(dx) and abs(est[1] - dy) <= 0.1 * abs(dy), est


def test_static_clip_has_zero_motion():
    clip = np.repeat(shifted_clip(0.0, 0.0, frames=1), 5, axis=0)
    assert motion_score(clip) == 0.0
    assert np.abs(lucas_kanade_flow(clip[0], clip[1])).max() == 0.0
    assert motion_score(clip[:1]) is None  # a still image has no motion


def test_motion_score_is_flow_magnitude_in_input_pixels():
    clip = shifted_clip(3.0, 4.0, frames=4)  # 5 px per frame
    assert motion_score(clip) == pytest.approx(5.0, rel=0.1)
    big = shifted_clip(1.5, 2.0, frames=3, h=192, w=320, seed=1)  # 2.5 px; flow runs at 0.4x size
    assert motion_score(big, max_side=128) == pytest.approx(2.5, rel=0.1)


@pytest.mark.skipif(not is_available("cv2"), reason="OpenCV not installed")
def test_farneback_agrees_on_a_translation():
    base = texture()
    flow = farneback_flow(base, ndimage.shift(base, (2.0, 3.0), order=3, mode="grid-wrap"))
    assert flow[16:-16, 16:-16].reshape(-1, 2).mean(axis=0) == pytest.approx([3.0, 2.0], rel=0.1)
    assert motion_score(shifted_clip(3.0, 4.0), method="farneback") == pytest.approx(5.0, rel=0.1)


# ------------------------------------------------------------------------------------ columns and total
def test_weighted_total_formula():
    weights = {"face": 0.2, "motion": 0.12, "aesthetic": 0.12, "leakage": 0.1}
    values = {"face": 0.5, "motion": 2.5, "aesthetic": 0.61, "leakage": 0.25, "clip_image": 0.9}
    # motion clipped at 1 px/frame; aesthetic (0.61 - 0.4) / 0.3; leakage enters as 1 - x
    expected = (0.2 * 0.5 + 0.12 * 1.0 + 0.12 * 0.7 + 0.1 * 0.75) / (0.2 + 0.12 + 0.12 + 0.1)
    assert weighted_total(values, weights) == pytest.approx(expected)
    assert normalise("aesthetic", 0.3) == 0.0 and normalise("leakage", 0.0) == 1.0
    # missing columns drop out and the rest are renormalised; nothing weighted -> None
    assert weighted_total({"face": 0.5, "motion": None}, weights) == pytest.approx(0.5)
    assert weighted_total({"clip_image": 0.9}, weights) is None
    # the defaults are OpenS2V-Eval v1.0 Open-Domain (+ ToyID in FaceSim's place)
    assert DEFAULT_WEIGHTS == {"face": 0.2, "nexus": 0.2, "clip_text": 0.12, "aesthetic": 0.12, "natural": 0.24,
                               "toyid": 0.2, "motion": 0.12}
    assert check_weights("face=1,motion=0") == {"face": 1.0, "motion": 0.0}
    for bad in ("face=0,motion=0", "face=-1", "bogus=1", "face"):
        with pytest.raises(ConfigError, match="^--weights: "):
            check_weights(bad)


def test_per_sample_table_and_aggregates_with_fake_rewards(tmp_path):
    face = TableReward({"s0": 0.2, "s1": 0.4, "s2": 0.6, "s3": 0.9},
                       {"face_mean": {"s0": 0.3, "s1": 0.5, "s2": 0.7, "s3": 1.0},
                        "face_min": {"s0": 0.1, "s1": 0.3, "s2": 0.5, "s3": 0.8}}, warning="no face in a frame")
    clip_t = TableReward({"s0": 0.25, "s1": 0.25, "s2": 0.5, "s3": 1.0})
    data = items(4)
    data[1].frames = shifted_clip(2.0, 0.0, frames=3)  # the only moving sample: Motion ~ 2 px
    data[3].frames = data[3].frames[:1]  # a still image: no Motion
    report = evaluate(data, {"face": face, "clip_text": clip_t}, metrics=("motion", "leakage"),
                      weights="face=0.5,clip_text=0.25,motion=0.25", batch_size=3, progress=False)
    assert face.calls == 2  # batches of 3: [s0 s1 s2], [s3]
    assert report.columns == ["face", "face_mean", "face_min", "clip_text", "motion", "total"]
    assert report.values["face_min"] == pytest.approx([0.1, 0.3, 0.5, 0.8])
    assert report.mean("face") == pytest.approx(0.525) and report.mean("clip_text") == pytest.approx(0.5)
    motion = report.values["motion"]
    assert motion[0] == 0.0 and motion[2] == 0.0 and motion[3] is None and motion[1] == pytest.approx(2.0, rel=0.1)
    assert report.count("motion") == 3 and report.kinds == ["video", "video", "video", "image"]
    # per sample: motion normalised with clip at 1 px/frame; the image has no motion -> renormalised
    totals = report.values["total"]
    assert totals[0] == pytest.approx((0.5 * 0.2 + 0.25 * 0.25 + 0.25 * 0.0) / 1.0)
    assert totals[1] == pytest.approx(0.5 * 0.4 + 0.25 * 0.25 + 0.25 * 1.0)
    assert totals[3] == pytest.approx((0.5 * 0.9 + 0.25 * 1.0) / 0.75)
    # aggregate: weights x column means of the normalised values
    assert report.total() == pytest.approx(0.5 * 0.525 + 0.25 * 0.5 + 0.25 * (1.0 / 3))
    assert report.skipped == {"leakage": "no attention shares (put <id>.npz with share, masks, grid next to each video)"}
    assert report.warnings == {"face": {"no face in a frame": 4}}

    paths = write_report(report, tmp_path / "out", inputs={"test": True})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(OUTPUT_FILES)
    rows = list(csv.DictReader(paths["per_sample.csv"].open()))
    assert [r["id"] for r in rows] == ["s0", "s1", "s2", "s3"]
    assert rows[3]["Motion"] == "" and float(rows[2]["FaceSim"]) == pytest.approx(0.6)
    assert list(rows[0]) == ["id", "kind", "FaceSim", "face_mean", "face_min", "CLIP-T", "Motion", "Total"]
    summary = json.loads(paths["summary.json"].read_text())
    assert summary["aggregate"]["Total"] == pytest.approx(report.total())
    assert summary["columns"]["Motion"]["count"] == 3 and summary["images"] == 1
    assert summary["weights_used"] == {"face": 0.5, "clip_text": 0.25, "motion": 0.25}
    assert summary["skipped"]["Leakage"].startswith("no attention shares")
    assert summary["warnings"] == {"face": {"no face in a frame": 4}}
    table = paths["table.md"].read_text()
    assert "| **mean** (4) | **0.5250** |" in table and "- Leakage: no attention shares" in table
    with Image.open(paths["summary.png"]) as img:
        assert img.size[0] >= 600 and img.size[1] > 400


def test_failing_rewards_are_skipped_with_reasons_and_leave_no_values():
    good = TableReward({f"s{i}": 0.5 for i in range(4)})
    missing = FailingReward(MissingDependencyError("optional dependency 'dlib' is not installed"))
    late = FailingReward(ValueError("reward 'nexus': path='/nope' does not exist\nsecond line"), fail_at_call=2)
    report = evaluate(items(4), {"face": missing, "nexus": late, "clip_text": good}, metrics=(),
                      skipped={"dino_image": "no model given"}, batch_size=2, progress=False)
    assert report.skipped["face"] == "MissingDependencyError: optional dependency 'dlib' is not installed"
    assert report.skipped["nexus"] == "failed at sample 3: ValueError: reward 'nexus': path='/nope' does not exist"
    assert report.skipped["dino_image"] == "no model given"
    assert report.columns == ["clip_text", "total"] and "nexus" not in report.values
    assert report.used_weights == {"clip_text": 0.12} and report.total() == pytest.approx(0.5)
    # nothing computed at all: the total is skipped too
    empty = evaluate(items(2), {"face": missing}, metrics=(), progress=False)
    assert empty.columns == [] and "total" in empty.skipped


def test_build_rewards_skips_what_cannot_be_built(monkeypatch):
    # independent of the built-in scorers: only the fakes registered here are looked up
    monkeypatch.setattr("idcrafter.rewards.base._load_builtin", lambda: None)
    ok, broken = f"fake_ok_{uuid.uuid4().hex[:8]}", f"fake_broken_{uuid.uuid4().hex[:8]}"

    @register_reward(ok)
    def _ok(device="cpu", value=0.5):
        return TableReward({"s0": value})

    @register_reward(broken)
    def _broken(device="cpu", path=None):
        raise ValueError(f"reward {broken!r}: no path given; pass path=...")

    rewards, skipped = build_rewards([ok, broken], {ok: {"value": 0.7}})
    assert list(rewards) == [ok] and rewards[ok].table == {"s0": 0.7}
    assert skipped == {broken: f"ValueError: reward {broken!r}: no path given; pass path=..."}
    _, skipped = build_rewards([ok], {ok: {"bogus": 1}})  # an option the factory does not take
    assert skipped[ok].startswith("TypeError")
    assert parse_model_options(["clip_text.path=/m/clip", "face.backend=dlib", "face.stride=2"]) == {
        "clip_text": {"path": "/m/clip"}, "face": {"backend": "dlib", "stride": 2}}
    with pytest.raises(InputError, match="unknown reward 'bogus'"):
        parse_model_options(["bogus.path=x"])


def test_leakage_column_from_attention_shares(tmp_path):
    # grid 2x2 tokens on 4x4 masks: subject 0 owns the left column of tokens, subject 1 the top-right token
    masks = np.zeros((2, 4, 4), np.float32)
    masks[0, :, :2] = 1
    masks[1, :2, 2:] = 1
    share = np.array([[0.9, 0.3, 0.8, 0.5],    # share on subject 0 for tokens (0,0) (0,1) (1,0) (1,1)
                      [0.1, 0.7, 0.2, 0.5]], np.float32)
    expected = np.mean([1 - 0.9, 1 - 0.7, 1 - 0.8])  # token (1,1) is background
    np.savez(tmp_path / "s0.npz", share=share, masks=masks, grid=np.array([2, 2]))
    data = items(2)
    data[0].attention = tmp_path / "s0.npz"
    report = evaluate(data, {}, metrics=("leakage",), weights="leakage=1", progress=False)
    assert report.values["leakage"] == [pytest.approx(expected), None]
    assert report.total() == pytest.approx(1 - expected)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    data[1].attention = tmp_path / "bad.npz"
    with pytest.raises(FileFormatError, match="bad.npz"):
        evaluate(data, {}, metrics=("leakage",), progress=False)


def test_eval_never_imports_the_video_branch_at_module_level():
    for path in (ROOT / "idcrafter" / "eval").glob("*.py"):
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = {a.name for n in top if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in top if isinstance(n, ast.ImportFrom) and n.module}
        bad = {m for m in names if m.startswith(("idcrafter.video", "idcrafter.toyworld", "mcimage"))}
        assert not bad, f"{path.name} imports {bad} at module level"


# ------------------------------------------------------------------------------------ files and the CLI
def test_load_items_matches_files_by_id_and_by_order(tmp_path):
    manifest = write_bench(tmp_path, n=3, image_ids=(2,))
    by_id = load_items(manifest, [tmp_path / "gen"])
    assert [i.path.name for i in by_id] == ["s0.mp4", "s1.mp4", "s2.png"]
    assert by_id[0].refs[0].shape == (32, 32, 3) and by_id[0].categories == ["object"]
    assert by_id[2].load().shape == (1, 64, 64, 3) and by_id[0].load().shape == (5, 64, 64, 3)
    ordered = load_items(manifest, [tmp_path / "gen" / n for n in ("s2.png", "s1.mp4", "s0.mp4")])
    assert [i.path.name for i in ordered] == ["s2.png", "s1.mp4", "s0.mp4"]


def test_cli_on_real_mp4s_with_the_optional_models_absent(tmp_path):
    manifest = write_bench(tmp_path, n=3, image_ids=(2,))
    out = tmp_path / "out"
    proc = run_script("--data", str(manifest), "--videos", str(tmp_path / "gen"), "--out", str(out),
                      "--metrics", "clip_text,nexus,aesthetic,natural,toyid,motion,leakage",
                      "--model-option", "nexus.path=/no/such/model", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)
    summary = json.loads((out / "summary.json").read_text())
    skipped = summary["skipped"]
    assert {"CLIP-T", "NexusScore", "Aesthetic", "NaturalScore", "Leakage", "FaceSim"} <= set(skipped)
    assert all(isinstance(r, str) and r and "\n" not in r for r in skipped.values())
    assert skipped["FaceSim"] == "not in --metrics"
    motion = summary["columns"]["Motion"]
    assert motion["count"] == 2 and motion["mean"] == pytest.approx(1.5, rel=0.15)  # 1 and 2 px per frame
    assert summary["aggregate"]["Total"] is not None and summary["videos"] == 2 and summary["images"] == 1
    assert (out / "table.md").read_text() in proc.stdout  # the table is printed too
    rows = list(csv.DictReader((out / "per_sample.csv").open()))
    assert [r["kind"] for r in rows] == ["video", "video", "image"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    manifest = write_bench(folder, n=3)
    (folder / "corrupt").mkdir()
    for i in range(3):
        target = folder / "corrupt" / f"s{i}.mp4"
        target.write_bytes((folder / "gen" / f"s{i}.mp4").read_bytes())
    (folder / "corrupt" / "s1.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    (folder / "partial").mkdir()
    (folder / "partial" / "s0.mp4").write_bytes((folder / "gen" / "s0.mp4").read_bytes())
    (folder / "bad.jsonl").write_text(manifest.read_text() + '{"id": "s9", "prompt": "x"}\n')
    return folder


BAD_INPUTS = {
    "count mismatch": (["--videos", "{b}/gen/s0.mp4", "{b}/gen/s1.mp4"], "2 files given but manifest"),
    "missing id": (["--videos", "{b}/partial"], "no <id>.mp4 or <id>.png for 2 of 3 samples"),
    "missing file": (["--videos", "{b}/gen/s0.mp4", "{b}/gen/s1.mp4", "{b}/gen/nope.mp4"], "nope.mp4 does not exist"),
    "unreadable video": (["--videos", "{b}/corrupt"], "s1.mp4"),
    "unknown metric": (["--videos", "{b}/gen", "--metrics", "face,bogus"], "unknown metric bogus"),
    "unknown reward option": (["--videos", "{b}/gen", "--model-option", "bogus.path=x"], "unknown reward 'bogus'"),
    "unknown weight": (["--videos", "{b}/gen", "--weights", "face=1,bogus=2"], "unknown column bogus"),
    "zero weights": (["--videos", "{b}/gen", "--weights", "face=0,motion=0"], "do not sum to a positive number"),
    "bad manifest": (["--videos", "{b}/gen", "--data", "{b}/bad.jsonl"], "line 4"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, bench, tmp_path):
    args, message = BAD_INPUTS[case]
    args = [a.format(b=bench) for a in args]
    if "--data" not in args:
        args += ["--data", str(bench / "bench.jsonl")]
    out = tmp_path / "out"
    proc = run_script(*args, "--out", str(out), "--no-progress")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert not out.exists() or not any(out.iterdir())


# ------------------------------------------------------------------------------------ --toyworld
@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    from idcrafter.toyworld.embedder import ToyIDEmbedder
    from idcrafter.video.config import IDCrafterConfig
    from idcrafter.video.pipeline import IDCrafterPipeline
    from idcrafter.video.presets import build_components

    folder = tmp_path_factory.mktemp("toy")
    pipe = IDCrafterPipeline.from_components(build_components(IDCrafterConfig.from_preset("toyworld"), seed=0))
    pipe.save_pretrained(folder / "model")
    torch.manual_seed(0)
    ToyIDEmbedder().save(folder / "toyid")
    return folder


def test_toyworld_mode_generates_writes_and_scores(toy_model, tmp_path, capsys):
    import importlib.util

    # by path: a pip package named `evaluate` may shadow scripts/evaluate.py on sys.path
    spec = importlib.util.spec_from_file_location("idcrafter_evaluate_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    out = tmp_path / "eval_toy"
    rc = script.main(["--toyworld", "--model", str(toy_model / "model"), "--samples", "2", "--steps", "1",
                      "--model-option", f"toyid.path={toy_model / 'toyid'}", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err[-2000:]
    assert sorted(p.name for p in (out / "videos").glob("*.mp4")) == ["held_out-00000.mp4", "held_out-00001.mp4"]
    rendered = json.loads((out / "videos" / "summary.json").read_text())  # rendered by the batch renderer
    assert sorted(rendered["rendered"]) == ["held_out-00000.mp4", "held_out-00001.mp4"] and rendered["failed"] == []
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 2 and summary["columns"]["Motion"]["count"] == 2
    assert {"toyid_matched", "toyid_shuffled", "toyid_truth"} <= set(summary["aggregate"])  # evaluate_model's
    if "ToyID" in summary["skipped"]:  # the toyid reward (idcrafter.rewards) could not be built
        assert "\n" not in summary["skipped"]["ToyID"] and summary["weights_used"] == {"motion": 0.12}
    else:
        assert 0.0 <= summary["aggregate"]["ToyID"] <= 1.0
        assert summary["weights_used"] == {"toyid": 0.2, "motion": 0.12}
    assert set(summary["toyworld"]["matched_vs_shuffled"]) >= {"gen_toyid_mean", "gen_shuffled_toyid_mean"}
    assert summary["skipped"]["FaceSim"].startswith("not part of this --toyworld run")
    assert "| held_out-00001 |" in printed.out


def test_toyworld_without_a_model_or_toyid_is_bad_input(toy_model, tmp_path):
    out = tmp_path / "out"
    proc = run_script("--toyworld", "--model", str(toy_model / "model"), "--out", str(out))
    assert proc.returncode == 2 and "toyid.path" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_script("--toyworld", "--model", str(tmp_path), "--out", str(out))
    assert proc.returncode == 2 and "not a Wan diffusers folder" in proc.stderr
    assert not out.exists()
