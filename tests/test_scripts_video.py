"""scripts/infer.py and scripts/render_batch.py as users run them: real processes, real mp4s."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import pytest
from ports import free_port

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = [str(ROOT / "examples" / "subject_a.png"), str(ROOT / "examples" / "subject_b.png")]


def builtin_frames() -> int:
    """Frames of the built-in default model (the toy-world model when installed, else tiny)."""
    from idcrafter.video.defaults import builtin_config

    return builtin_config().num_frames


def run(*args, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


def read_mp4(path):
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def readme_main_command() -> list[str]:
    """The inference command exactly as README.md writes it."""
    lines = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()]
    command = next(line for line in lines if line.startswith("python scripts/infer.py --refs"))
    import shlex

    return shlex.split(command)[1:]


def test_readme_main_command_writes_a_playable_mp4(tmp_path):
    args = readme_main_command()
    out = tmp_path / "out.mp4"
    args[args.index("--out") + 1] = str(out)
    proc = run(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    frames = read_mp4(out)
    assert len(frames) == builtin_frames() and frames[0].shape == (64, 64, 3)
    # Requested size and frame count are honoured.
    out2 = tmp_path / "sized.mp4"
    proc = run("scripts/infer.py", "--refs", *EXAMPLES, "--prompt", "two things", "--out", str(out2),
               "--size", "32x48", "--frames", "5", "--steps", "2", "--seed", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    frames = read_mp4(out2)
    assert len(frames) == 5 and frames[0].shape == (32, 48, 3)
    # s/step and the share of each component, on one line of stderr.
    timing = [line for line in proc.stderr.splitlines() if line.startswith("timing: ")]
    assert len(timing) == 1 and " over 2 steps " in timing[0] and "transformer " in timing[0], proc.stderr[-2000:]


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    out = tmp_path / "x.mp4"
    proc = run("scripts/infer.py", "--refs", *EXAMPLES, "--prompt", "p", "--out", str(out), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["frames"] == builtin_frames() and plan["height"] == 64 and plan["max_subjects"] == 3
    assert not out.exists()


@pytest.fixture
def bad_files(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return {"corrupt": str(corrupt), "missing": str(tmp_path / "nope.png")}


@pytest.mark.parametrize(
    "case, extra, message",
    [
        ("missing image", ["--refs", "{missing}"], "does not exist"),
        ("corrupt image", ["--refs", "{corrupt}"], "cannot be read"),
        ("too many subjects", ["--refs", *EXAMPLES, *EXAMPLES], "at most 3"),
        ("frames not 4n+1", ["--frames", "8"], "4n+1"),
        ("size not multiple of 16", ["--size", "50x64"], "multiples of 16"),
        ("empty prompt", ["--prompt", " "], "prompt is empty"),
        ("unknown preset", ["--preset", "wan-99b"], "unknown"),
        ("bad size syntax", ["--size", "big"], "HEIGHTxWIDTH"),
    ],
)
def test_bad_input_exits_2_with_one_line(case, extra, message, bad_files, tmp_path, capsys):
    from idcrafter.cli import infer

    out = tmp_path / "out.mp4"
    args = {"--refs": [EXAMPLES[0]], "--prompt": ["a ball"], "--out": [str(out)]}
    i = 0
    while i < len(extra):  # the case's flags replace the defaults
        flag, values = extra[i], []
        i += 1
        while i < len(extra) and not extra[i].startswith("--"):
            values.append(extra[i].format(**bad_files))
            i += 1
        args[flag] = values
    argv = [x for flag, values in args.items() for x in (flag, *values)]
    assert infer.main(argv) == 2, case
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and message in err, err
    assert not out.exists() and list(tmp_path.glob("*.mp4")) == []


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    proc = run("scripts/infer.py", "--refs", str(tmp_path / "nope.png"), "--prompt", "x", "--out", str(tmp_path / "o.mp4"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def write_jobs(folder: Path, n: int = 6, bad_line: int = 3) -> Path:
    for src in EXAMPLES:
        shutil.copy(src, folder)
    lines = []
    for i in range(n):
        lines.append(json.dumps({"prompt": f"scene {i}", "refs": ["subject_a.png", "subject_b.png"][: 1 + i % 2],
                                 "output": f"video_{i}.mp4", "seed": i, "steps": 2}))
        if i + 1 == bad_line - 1:
            lines.append('{"prompt": "broken", "refs": "subject_a.png"')  # not JSON
    path = folder / "jobs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_batch_resumes_after_a_kill_and_never_renders_twice(tmp_path):
    jobs = write_jobs(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, "scripts/render_batch.py", "--jobs", str(jobs), "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.glob("video_*.mp4"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("video_*.mp4")}
    assert 2 <= len(first) < 6
    for name in first:  # whatever exists under a final name is complete
        assert len(read_mp4(out / name)) == builtin_frames()
    result = run(*cmd[1:])
    assert result.returncode == 1  # a bad line makes the run not fully ok
    finished = sorted(p.name for p in out.glob("video_*.mp4"))
    assert finished == [f"video_{i}.mp4" for i in range(6)]
    for name, mtime in first.items():
        assert (out / name).stat().st_mtime_ns == mtime  # not rendered twice
    summary = json.loads((out / "summary.json").read_text())
    assert [e["line"] for e in summary["invalid"]] == [3]
    assert sorted(summary["skipped"]) == sorted(first) and len(summary["rendered"]) == 6 - len(first)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_two_ranks_split_the_jobs(tmp_path):
    jobs = write_jobs(tmp_path, n=5, bad_line=0)
    out = tmp_path / "out"
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen(
            [sys.executable, "scripts/render_batch.py", "--jobs", str(jobs), "--out", str(out), "--no-progress"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    ranks = [json.loads((out / f"summary.rank{r}.json").read_text()) for r in (0, 1)]
    mine = [set(r["rendered"]) for r in ranks]
    assert mine[0] and mine[1] and not mine[0] & mine[1]
    assert mine[0] | mine[1] == {f"video_{i}.mp4" for i in range(5)}
    merged = json.loads((out / "summary.json").read_text())
    assert merged["counts"]["rendered"] == 5


def test_batch_webm_and_gif_outputs_play(tmp_path):
    shutil.copy(EXAMPLES[0], tmp_path)
    suffixes = {".webm": "vp9", ".gif": "gif"}
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"prompt": "scene", "refs": ["subject_a.png"], "output": f"clip{suffix}",
                                        "seed": 1, "steps": 2, "frames": 5, "size": [32, 48]}) + "\n"
                            for suffix in suffixes))
    out = tmp_path / "out"
    proc = run("scripts/render_batch.py", "--jobs", str(jobs), "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for suffix, codec in suffixes.items():
        with av.open(str(out / f"clip{suffix}")) as container:
            assert container.streams.video[0].codec_context.name == codec
        frames = read_mp4(out / f"clip{suffix}")
        assert len(frames) == 5 and {f.shape for f in frames} == {(32, 48, 3)}
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["rendered"]) == ["clip.gif", "clip.webm"] and summary["failed"] == []


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder this process cannot create files in, even as root: immutable when chattr works,
    else mode 0555; skipped when neither stops a write."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0 \
        if shutil.which("chattr") else False
    if not immutable:
        folder.chmod(0o555)
    try:
        probe = folder / "probe"
        try:
            probe.touch()
        except OSError:
            pass
        else:
            probe.unlink()
            pytest.skip("neither chattr +i nor chmod 0555 makes a folder unwritable here")
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("case, message", [
    ("missing job file", "job file not found"),
    ("empty job file", "no jobs in the file"),
    ("only bad lines", "no valid job (2 bad lines; line 1: "),
    ("out is a file", "is a file, not a folder"),
    ("read-only out", "cannot write in"),
    ("folder in a read-only out", "cannot write in"),
    ("unknown device", "--device 'tpu': not a device"),
    ("unknown dtype", "--dtype 'float8': use float32, bfloat16, float16"),
])
def test_batch_bad_input_exits_2_with_one_line_and_creates_nothing(case, message, tmp_path, request):
    jobs = write_jobs(tmp_path, n=1, bad_line=0)
    out, extra = tmp_path / "out", []
    if case == "missing job file":
        jobs = tmp_path / "missing.jsonl"
    elif case == "empty job file":
        jobs.write_text("\n\n")
    elif case == "only bad lines":
        jobs.write_text('{"prompt": "x"}\n[1, 2]\n')
    elif case == "out is a file":
        out.write_text("not a folder")
    elif case in ("read-only out", "folder in a read-only out"):
        out = request.getfixturevalue("read_only_dir")
        out = out / "sub" if case.startswith("folder") else out
    elif case == "unknown device":
        extra = ["--device", "tpu"]
    else:
        extra = ["--dtype", "float8"]
    before = tree(tmp_path)
    proc = run("scripts/render_batch.py", "--jobs", str(jobs), "--out", str(out), "--no-progress", *extra)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert tree(tmp_path) == before  # no output folder, no summary, no temporary file
