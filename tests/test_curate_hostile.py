"""Curation under hostile inputs and interruptions (docs/design.md 8.1): every bad video is a
reported drop with its reason and the run goes on; a run killed with SIGKILL and rerun gives the
same manifest as an uninterrupted run, nothing lost or doubled."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
from curate_data import shot_frames, write_raw

from idcrafter.curate import core
from idcrafter.curate.probe import input_key
from idcrafter.data.manifest import load_manifest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
STAGES = [
    {"name": "probe", "min_frames": 9, "min_side": 32, "max_seconds": 300.0},
    {"name": "shots", "num_frames": 9, "target_fps": 8.0, "min_shot_frames": 4, "max_clips": 1, "context_frames": 2},
    {"name": "blur"},
    {"name": "motion"},
    {"name": "annotate"},
]


def _settings(path: Path, delay: float = 0.0) -> Path:
    stages = [dict(s) for s in STAGES]
    stages[-1]["delay"] = delay
    path.write_text(json.dumps({"stages": stages}))
    return path


def _audio_only(path: Path) -> Path:
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=8000)
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 8000, i * 1024
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def _hostile_inputs(folder: Path) -> dict[str, str]:
    """{path: the reason the probe must give}; plus one good video (reason None)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    noisy = write_raw(folder / "noisy.mp4", rng.integers(0, 255, (40, 64, 64, 3), dtype=np.uint8))
    data = noisy.read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: int(len(data) * 0.6)])
    noisy.unlink()
    (folder / "zero.mp4").write_bytes(b"")
    (folder / "text.mp4").write_text("not a video\n")
    _audio_only(folder / "audio.mp4")
    write_raw(folder / "one_frame.mp4", shot_frames(num_frames=1))
    # ten minutes at 1 fps, 32 px: written in a fraction of a second, refused from its header
    write_raw(folder / "ten_minutes.mp4", np.zeros((600, 32, 32, 3), np.uint8), fps=1.0)
    write_raw(folder / "good.mp4", shot_frames(num_frames=48))
    (folder / "list.txt").write_text("gone.mp4\n")  # a list naming a file that is not there
    return {str(folder / "gone.mp4"): "missing", str(folder / "truncated.mp4"): "truncated", str(folder / "zero.mp4"): "unreadable",
            str(folder / "text.mp4"): "unreadable", str(folder / "audio.mp4"): "no video stream",
            str(folder / "one_frame.mp4"): "too short", str(folder / "ten_minutes.mp4"): "too long",
            str(folder / "good.mp4"): None}


def test_bad_inputs_are_dropped_with_their_reasons_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    from idcrafter.cli.curate import main

    monkeypatch.setitem(core.STAGES, "annotate", "curate_data:Annotate")
    expected = _hostile_inputs(tmp_path / "raw")
    out = tmp_path / "out"
    code = main([str(tmp_path / "raw"), str(tmp_path / "raw" / "list.txt"), "--out", str(out), "--backend", "toyworld",
                 "--settings", str(_settings(tmp_path / "s.json")), "--no-progress"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    reasons = {d["source"]: d["reason"] for d in report["drops"] if d["stage"] == "probe"}
    assert reasons == {src: why for src, why in expected.items() if why is not None}
    assert report["funnel"]["probe"]["dropped"] == {"missing": 1, "no video stream": 1, "too long": 1, "too short": 1,
                                                    "truncated": 1, "unreadable": 2}
    assert report["inputs"] == report["finished"] == 8
    samples, errors = load_manifest(out / "manifest.jsonl")
    assert errors == [] and len(samples) == 2  # the good video's two shots
    assert all(s.id.startswith(input_key(str(tmp_path / "raw" / "good.mp4"))) for s in samples)


def _run_script(tmp_path: Path) -> Path:
    script = tmp_path / "run_curate.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        "from idcrafter.curate import core\n"
        "core.STAGES['annotate'] = 'curate_data:Annotate'\n"
        "from idcrafter.cli.curate import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    return script


def _command(script: Path, raw: Path, out: Path, settings: Path) -> list[str]:
    return [sys.executable, str(script), str(raw), "--out", str(out), "--backend", "toyworld",
            "--settings", str(settings), "--no-progress"]


def finished_records(out: Path) -> int:
    """Inputs whose record is written: records/KEY.json, not the hidden temporary file
    (`.KEY.XXXX.tmp.json`) an atomic write holds before its rename, which `*.json` also matches."""
    return sum(1 for p in (out / "records").glob("*.json") if not p.name.startswith("."))


def test_kill_9_mid_run_then_rerun_gives_the_uninterrupted_manifest(tmp_path, monkeypatch):
    from idcrafter.cli.curate import main

    raw = tmp_path / "raw"
    for i in range(6):
        write_raw(raw / f"clip{i}.mp4", shot_frames(num_frames=48, seed=i))
    # the uninterrupted run, in this process (the stage delay changes nothing but the time)
    monkeypatch.setitem(core.STAGES, "annotate", "curate_data:Annotate")
    assert main([str(raw), "--out", str(tmp_path / "whole"), "--backend", "toyworld", "--settings",
                 str(_settings(tmp_path / "fast.json")), "--no-progress"]) == 0

    script = _run_script(tmp_path)
    settings = _settings(tmp_path / "s.json", delay=0.15)  # ~0.3 s an input: time to kill mid-run
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}

    out = tmp_path / "killed"
    proc = subprocess.Popen(_command(script, raw, out, settings), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and finished_records(out) < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = finished_records(out)
    assert 2 <= finished < 6, "the run was not killed mid-way"
    assert not (out / "manifest.jsonl").exists()  # assembled only at the end of a run

    again = subprocess.run(_command(script, raw, out, settings), env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"6 inputs, {finished} already finished" in again.stderr
    manifest = (out / "manifest.jsonl").read_text()
    assert manifest == (tmp_path / "whole" / "manifest.jsonl").read_text()
    samples, errors = load_manifest(out / "manifest.jsonl")
    assert errors == [] and len(samples) == 12 and len({s.id for s in samples}) == 12
    report = json.loads((out / "report.json").read_text())
    whole_report = json.loads((tmp_path / "whole" / "report.json").read_text())
    counts = lambda r: {s: (row["in"], row["kept"], row["dropped"]) for s, row in r["funnel"].items()}  # noqa: E731
    assert counts(report) == counts(whole_report)
    assert counts(report)["probe"] == (6, 6, {})
    from idcrafter.utils.media import verify_video

    # the temporary files of the input in flight at the kill are gone with its rerun
    assert [p.name for p in out.rglob(".*.tmp*")] == []
    for sample in samples:
        assert verify_video(sample.video) == (9, 64, 64)
        assert verify_video(sample.subjects[0].mask) == (9, 64, 64)


@pytest.mark.parametrize("garbage", [b"\x00" * 4096, b"ftypisom" + bytes(range(256)) * 8])
def test_probe_never_raises_on_garbage(tmp_path, garbage):
    from idcrafter.curate.core import Candidate
    from idcrafter.curate.probe import ProbeStage

    path = tmp_path / "g.mp4"
    path.write_bytes(garbage)
    (dropped,) = ProbeStage().process([Candidate(str(path), "g", 0.0)])
    assert dropped.reason == "unreadable"
