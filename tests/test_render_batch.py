"""Batch rendering: job-file validation, crash safety and resume, sharding over ranks, merged summaries.

The renderers here are real: they write real mp4 files (diffusers' `export_to_video`, imageio-ffmpeg)
and real PNGs (PIL), and the crash is a real process dying mid-write.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import imageio
import numpy as np
import pytest
from PIL import Image

from idcrafter.render import (
    Job,
    JobError,
    Summary,
    merge_summaries,
    parse_jobs,
    rank_and_world,
    render_batch,
    shard,
)
from idcrafter.utils.cli import InputError

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------ real renderers


def write_video(job: Job, tmp: Path) -> None:
    """A real mp4 of `job.frames` random frames at `job.size`, seeded by `job.seed`."""
    from diffusers.utils import export_to_video

    h, w = job.size or (32, 32)
    rng = np.random.default_rng(job.seed)
    frames = rng.random((job.frames or 5, h, w, 3), dtype=np.float32)
    export_to_video(list(frames), str(tmp), fps=8)


def write_png(job: Job, tmp: Path) -> None:
    h, w = job.size or (16, 16)
    rng = np.random.default_rng(job.seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp)


def video_shape(path: Path) -> tuple[int, int, int]:
    with imageio.get_reader(str(path), "ffmpeg") as reader:
        frames = [frame for frame in reader]
    return (len(frames), *frames[0].shape[:2])


def make_refs(folder: Path, names=("man.png", "dog.png")) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (16, 16), (40 * i, 100, 200)).save(folder / name)
    return [f"{folder.name}/{name}" for name in names]


def write_jobs(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def run_python(code: str, env: dict | None = None, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]), **(env or {})}
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def finished(out: Path, suffix: str) -> list[str]:
    """Files under their final names (temporary names start with a dot)."""
    return sorted(p.name for p in out.iterdir() if p.suffix == suffix and not p.name.startswith("."))


# ------------------------------------------------------------------------------------------ parsing


def test_parse_reports_every_bad_line(tmp_path):
    refs = make_refs(tmp_path / "jobs" / "refs")
    good = {"prompt": "a man walks his dog", "refs": refs}
    lines = [
        {**good, "output": "a.mp4", "size": [480, 832], "frames": 81, "seed": 3},        # 1 good
        "",                                                                              # 2 blank
        '{"prompt": "oops", "refs": [',                                                  # 3
        {"refs": refs, "output": "b.mp4"},                                               # 4
        {**good, "prompt": "  ", "output": "c.mp4"},                                     # 5
        {"prompt": "p", "output": "d.mp4"},                                              # 6
        {"prompt": "p", "refs": "refs/man.png", "output": "e.mp4"},                      # 7
        {"prompt": "p", "refs": ["refs/man.png", "refs/cat.png"], "output": "f.mp4"},    # 8
        {**good},                                                                        # 9
        {**good, "output": "g.mp4", "frames": 10},                                       # 10
        {**good, "output": "h.mp4", "size": [480, 830]},                                 # 11
        {**good, "output": "a.mp4"},                                                     # 12
        {**good, "output": "i.mp4", "sead": 1},                                          # 13
        {**good, "output": "face.png", "mode": "image", "size": "512x768",               # 14 good
         "categories": ["face", "bag"], "guidance_text": 6, "negative_prompt": "blur"},
        "   ",                                                                           # 15 blank
        {**good, "output": "j.mp4", "size": "33x64"},                                    # 16
        {**good, "output": "k.mp4", "mode": "image"},                                    # 17
        {**good, "output": "l.mp4", "categories": ["face"]},                             # 18
        '["not", "an", "object"]',                                                       # 19
        {**good, "output": "../x.mp4"},                                                  # 20
        {**good, "output": "m.mp4", "steps": 0, "guidance_image": -1},                   # 21
    ]
    jobs, errors = parse_jobs(write_jobs(tmp_path / "jobs" / "jobs.jsonl", lines))

    assert [j.line for j in jobs] == [1, 14]
    video, image = jobs
    assert video.refs == tuple(tmp_path / "jobs" / r for r in refs)  # relative to the job file
    assert (video.size, video.frames, video.seed, video.mode) == ((480, 832), 81, 3, "video")
    assert (image.size, image.mode, image.categories) == ((512, 768), "image", ("face", "bag"))
    assert (image.guidance_text, image.guidance_image, image.negative_prompt) == (6.0, None, "blur")

    expected = {
        3: r"not valid JSON",
        4: r"missing 'prompt'",
        5: r"'prompt' is empty",
        6: r"missing 'refs'",
        7: r"'refs' must be a list",
        8: r"ref 'refs/cat.png' not found",
        9: r"missing 'output'",
        10: r"frames=10 is not 4n\+1 \(e\.g\. 9 or 13\)",
        11: r"size 480x830: .*multiples of 16",
        12: r"output 'a\.mp4' is already used by line 1",
        13: r"unknown key 'sead'",
        16: r"size 33x64",
        17: r"output 'k\.mp4' must end in one of \.png",
        18: r"1 categories for 2 refs",
        19: r"must be a JSON object, got list",
        20: r"escapes the output root",
        21: r"'steps' must be a positive integer.*'guidance_image' must be a non-negative number",
    }
    assert [e.line for e in errors] == sorted(expected)
    for error in errors:
        assert re.search(expected[error.line], error.message), (error.line, error.message)
        assert "\n" not in error.message
    assert str(errors[0]).startswith("line 3: ")

    with pytest.raises(InputError, match="job file not found"):
        parse_jobs(tmp_path / "missing.jsonl")


def test_outputs_escaping_the_root_are_bad_lines(tmp_path):
    refs = make_refs(tmp_path / "refs")
    out = tmp_path / "out"
    out.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (out / "link").symlink_to(outside, target_is_directory=True)
    names = ["../x.mp4", "/tmp/x.mp4", "a/../../x.mp4", "link/x.mp4", "a/../ok.mp4", "sub/dir/ok.mp4"]
    path = write_jobs(tmp_path / "jobs.jsonl", [{"prompt": "p", "refs": refs, "output": n} for n in names])

    jobs, errors = parse_jobs(path, out_root=out)
    assert [j.output for j in jobs] == ["ok.mp4", "sub/dir/ok.mp4"]
    assert {e.line: e.message for e in errors} == {
        1: "output '../x.mp4' escapes the output root",
        2: "output '/tmp/x.mp4' is an absolute path; give a name relative to the output root",
        3: "output 'a/../../x.mp4' escapes the output root",
        4: f"output 'link/x.mp4' resolves to {outside.resolve() / 'x.mp4'}, outside the output root {out.resolve()}",
    }

    # without the root at parse time the symlink escape is caught when rendering, and nothing is written
    jobs, errors = parse_jobs(path)
    assert [j.line for j in jobs] == [4, 5, 6] and [e.line for e in errors] == [1, 2, 3]
    with pytest.raises(InputError, match="outside the output root"):
        jobs[0].output_path(out)
    assert jobs[2].output_path(out) == out.resolve() / "sub" / "dir" / "ok.mp4"
    summary = render_batch(jobs, out, write_video, progress=False, errors=errors)
    assert [(f.line, f.output) for f in summary.failed] == [(4, "link/x.mp4")]
    assert sorted(summary.rendered) == ["ok.mp4", "sub/dir/ok.mp4"]
    assert list(outside.iterdir()) == [] and not (tmp_path / "x.mp4").exists()
    with pytest.raises(InputError, match="escapes the output root"):
        Job(prompt="p", refs=(), output="a/../../x.mp4")


# ----------------------------------------------------------------------------------- crash + resume

CRASH_RUN = """
import os, sys
from pathlib import Path
from idcrafter.render import parse_jobs, render_batch
from test_render_batch import write_video

calls = 0
def render(job, tmp):
    global calls
    calls += 1
    if calls == 3:  # die mid-write: partial bytes under the temporary name, no clean-up
        tmp.write_bytes(b"\\x00\\x00\\x00\\x18ftypisom partial")
        os._exit(9)
    write_video(job, tmp)

jobs, errors = parse_jobs(sys.argv[1])
render_batch(jobs, sys.argv[2], render, progress=False, errors=errors)
"""


def test_crash_mid_write_then_resume(tmp_path):
    refs = make_refs(tmp_path / "refs")
    lines = [{"prompt": f"clip {i}", "refs": refs, "output": f"clip{i}.mp4", "seed": i,
              "frames": 5 if i % 2 else 9, "size": [32, 48]} for i in range(6)]
    lines.insert(3, {"prompt": "bad", "refs": refs, "output": "bad.mp4", "frames": 8})  # line 4
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", lines)
    out = tmp_path / "out"

    proc = run_python(CRASH_RUN.replace("sys.argv[1]", repr(str(jobs_file))).replace("sys.argv[2]", repr(str(out))))
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 9, stderr

    assert finished(out, ".mp4") == ["clip0.mp4", "clip1.mp4"]  # nothing looks finished for clip2
    temps = [p for p in out.iterdir() if p.name.startswith(".")]
    assert len(temps) == 1 and re.fullmatch(r"\.clip2\.[a-z0-9_]{8}\.tmp\.mp4", temps[0].name)
    assert temps[0].read_bytes().endswith(b"partial")
    assert not (out / "summary.json").exists()
    assert video_shape(out / "clip0.mp4") == (9, 32, 48) and video_shape(out / "clip1.mp4") == (5, 32, 48)
    mtimes = {name: (out / name).stat().st_mtime_ns for name in ("clip0.mp4", "clip1.mp4")}

    calls = []

    def render(job, tmp):
        calls.append(job.output)
        write_video(job, tmp)

    jobs, errors = parse_jobs(jobs_file)
    summary = render_batch(jobs, out, render, progress=False, errors=errors)

    assert calls == ["clip2.mp4", "clip3.mp4", "clip4.mp4", "clip5.mp4"]
    assert {name: (out / name).stat().st_mtime_ns for name in mtimes} == mtimes
    assert finished(out, ".mp4") == [f"clip{i}.mp4" for i in range(6)]
    assert sorted(p.name for p in out.iterdir()) == [f"clip{i}.mp4" for i in range(6)] + ["summary.json"]
    for i in range(6):
        assert video_shape(out / f"clip{i}.mp4") == (5 if i % 2 else 9, 32, 48)
    assert summary.skipped == ["clip0.mp4", "clip1.mp4"] and summary.rendered == calls
    assert summary.removed_temps == 1 and summary.failed == []
    assert summary.invalid == [JobError(4, "frames=8 is not 4n+1 (e.g. 5 or 9)")] and not summary.ok
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["counts"] == {"jobs": 6, "rendered": 4, "skipped": 2, "failed": 0, "invalid": 1}
    assert on_disk["invalid"] == [{"line": 4, "message": "frames=8 is not 4n+1 (e.g. 5 or 9)"}]
    assert Summary.from_dict(on_disk) == summary


def test_one_failing_job_does_not_stop_the_rest(tmp_path):
    refs = make_refs(tmp_path / "refs")
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", [
        {"prompt": f"p{i}", "refs": refs, "output": f"img{i}.png", "mode": "image", "seed": i} for i in range(4)
    ])
    jobs, errors = parse_jobs(jobs_file)
    out = tmp_path / "out"

    def flaky(job, tmp):
        if job.seed == 1:
            tmp.write_bytes(b"half a png")
            raise ValueError("decoder ran out of memory")
        if job.seed == 2:
            return  # forgets to write: must not leave an empty "finished" file
        write_png(job, tmp)

    summary = render_batch(jobs, out, flaky, progress=False)
    assert summary.rendered == ["img0.png", "img3.png"]
    assert [(f.line, f.output, f.message) for f in summary.failed] == [
        (2, "img1.png", "ValueError: decoder ran out of memory"),
        (3, "img2.png", "RuntimeError: the renderer wrote nothing to the temporary output"),
    ]
    assert sorted(p.name for p in out.iterdir()) == ["img0.png", "img3.png", "summary.json"]
    assert Image.open(out / "img3.png").size == (16, 16)

    summary = render_batch(jobs, out, write_png, progress=False)
    assert summary.rendered == ["img1.png", "img2.png"] and summary.skipped == ["img0.png", "img3.png"]
    assert summary.ok


# -------------------------------------------------------------------------------------------- ranks


def test_shard_is_disjoint_and_complete():
    for n in range(10):
        jobs = [Job(prompt="p", refs=(), output=f"{i}.mp4", line=i + 1) for i in range(n)]
        for world in range(1, 5):
            shares = [shard(jobs, r, world) for r in range(world)]
            flat = [j.line for s in shares for j in s]
            assert sorted(flat) == list(range(1, n + 1)) and len(set(flat)) == len(flat)
            assert shard(jobs, 0, world) == shares[0]  # deterministic
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError):
        shard([], 2, 2)


def test_rank_and_world_from_launcher_env():
    assert rank_and_world({}) == (0, 1)
    assert rank_and_world({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4)
    assert rank_and_world({"LOCAL_RANK": "1", "WORLD_SIZE": "2"}) == (1, 2)
    with pytest.raises(InputError, match="RANK=2 WORLD_SIZE=2"):
        rank_and_world({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(InputError, match="WORLD_SIZE='two'"):
        rank_and_world({"WORLD_SIZE": "two"})


RANK_RUN = """
from idcrafter.render import parse_jobs, rank_and_world, render_batch
from test_render_batch import write_png

rank, world = rank_and_world()
jobs, errors = parse_jobs(JOBS)
render_batch(jobs, OUT, write_png, rank=rank, world_size=world, errors=errors)
"""


def test_two_ranks_split_the_jobs_and_merge(tmp_path):
    refs = make_refs(tmp_path / "refs")
    lines = [{"prompt": f"p{i}", "refs": refs, "output": f"r/img{i}.png", "mode": "image", "seed": i,
              "size": [16, 32]} for i in range(7)]
    lines.insert(2, {"prompt": "p", "refs": refs, "output": "r/img0.png", "mode": "image"})  # line 3: duplicate
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", lines)
    out = tmp_path / "out"
    code = RANK_RUN.replace("JOBS", repr(str(jobs_file))).replace("OUT", repr(str(out)))

    procs = [run_python(code, env={"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r)}) for r in range(2)]
    for proc in procs:
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr

    parts = [json.loads((out / f"summary.rank{r}.json").read_text()) for r in range(2)]
    assert [p["ranks"] for p in parts] == [[0], [1]]
    mine = [set(p["rendered"]) for p in parts]
    assert mine[0].isdisjoint(mine[1])
    assert mine[0] | mine[1] == {f"r/img{i}.png" for i in range(7)}
    assert [len(m) for m in mine] == [4, 3]
    assert sorted(p.name for p in (out / "r").iterdir()) == sorted(f"img{i}.png" for i in range(7))
    assert Image.open(out / "r" / "img6.png").size == (32, 16)
    assert not (out / "summary.json").exists()

    merged = merge_summaries(out)
    assert merged.counts() == {"jobs": 7, "rendered": 7, "skipped": 0, "failed": 0, "invalid": 1}
    assert merged.ranks == [0, 1] and merged.missing_ranks == []
    assert merged.invalid == [JobError(3, "output 'r/img0.png' is already used by line 1")]
    assert json.loads((out / "summary.json").read_text())["counts"]["rendered"] == 7

    # a rank that never reported makes the merged summary not ok
    (out / "summary.rank1.json").unlink()
    merged = merge_summaries(out)
    assert merged.missing_ranks == [1] and merged.counts()["rendered"] == 4 and not merged.ok
