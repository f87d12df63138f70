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
import time
from pathlib import Path

import av
import imageio
import numpy as np
import pytest
from PIL import Image

from idcrafter.render import (
    WORK_DIR,
    Job,
    JobError,
    Summary,
    merge_summaries,
    parse_jobs,
    rank_and_world,
    render_batch,
    shard,
)
from idcrafter.utils import media
from idcrafter.utils.cli import InputError
from idcrafter.utils.errors import FileFormatError

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


def work_files(out: Path) -> list[Path]:
    """Files under the owner folders of the work folder, sorted."""
    return sorted(p for p in (out / WORK_DIR / "owners").rglob("*") if p.is_file())


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
        {**good, "output": "n.mp4", "steps": 10**9, "guidance_text": float("nan")},       # 22
        {**good, "output": "o.mp4", "guidance_image": 1e308},                            # 23
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
        21: r"'steps' must be a positive integer.*'guidance_image' must be a number in \[0, 100\]",
        22: r"'steps' must be at most 1000, got 1000000000.*'guidance_text' must be a number in \[0, 100\], got NaN",
        23: r"'guidance_image' must be a number in \[0, 100\], got 1e\+308",
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
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [WORK_DIR]
    temps = work_files(out)  # the dead process's folder: its lock and the partial output
    assert [t.relative_to(out / WORK_DIR).parts[2:] for t in temps] == [("job", "clip2.mp4"), ("owner.lock",)]
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


# ------------------------------------------------------------------------------- verified outputs


def moving_gradient(frames: int = 9, height: int = 32, width: int = 48) -> np.ndarray:
    """uint8 [F, H, W, 3]: smooth enough that any codec keeps it close, moving so frames differ."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    clip = [np.stack([(x * 255 / width + 12 * i) % 256, y * 255 / height, (x + y) * 255 / (height + width)], -1)
            for i in range(frames)]
    return np.stack(clip).astype(np.uint8)


def decode(path: Path) -> tuple[str, np.ndarray]:
    """(codec name, uint8 [F, H, W, 3]) as PyAV decodes the file."""
    with av.open(str(path)) as container:
        codec = container.streams.video[0].codec_context.name
        return codec, np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.mark.parametrize("suffix, codec", [(".mp4", "h264"), (".mov", "h264"), (".mkv", "h264"),
                                           (".webm", "vp9"), (".gif", "gif")])
def test_write_video_uses_the_codec_its_container_holds(tmp_path, suffix, codec):
    frames = moving_gradient()
    path = media.write_video(frames, tmp_path / f"clip{suffix}", fps=8)
    name, decoded = decode(path)
    assert name == codec and decoded.shape == (9, 32, 48, 3)
    assert np.abs(decoded.astype(int) - frames).mean() < 8  # the picture, not just a playable file
    assert media.verify_video(path, frames=9, size=(32, 48)) == (9, 32, 48)
    assert [p.name for p in tmp_path.iterdir()] == [f"clip{suffix}"]


def test_write_video_keeps_no_file_that_does_not_decode_to_its_frames(tmp_path, monkeypatch):
    encode = media.encode_video
    monkeypatch.setattr(media, "encode_video", lambda frames, path, fps: encode(frames[:-1], path, fps))
    with pytest.raises(media.OutputCheckError, match="decodes to 8 frames, expected 9"):
        media.write_video(moving_gradient(), tmp_path / "clip.mp4")
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary file


def test_suffixes_without_an_encoder_and_the_work_folder_are_bad_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(media, "_ENCODERS", {"libvpx-vp9": False})
    refs = make_refs(tmp_path / "refs")
    names = ["a.webm", "b.mp4", f"{WORK_DIR}/c.mp4", ".Render-Work/d.png", "sub/.render-work/e.mp4"]
    jobs, errors = parse_jobs(write_jobs(tmp_path / "jobs.jsonl", [{"prompt": "p", "refs": refs, "output": n}
                                                                     for n in names]))
    assert [j.output for j in jobs] == ["b.mp4", "sub/.render-work/e.mp4"]
    assert {e.line: e.message for e in errors} == {
        1: "output 'a.webm': .webm needs the libvpx-vp9 encoder, which this PyAV build does not have",
        3: f"output '{WORK_DIR}/c.mp4' is inside {WORK_DIR}, the folder where render_batch keeps its temporary files",
        4: f"output '.Render-Work/d.png' is inside {WORK_DIR}, the folder where render_batch keeps its temporary files",
    }


def test_an_output_that_does_not_decode_fails_and_is_rendered_again(tmp_path):
    from diffusers.utils import export_to_video

    jobs = [Job(prompt="p", refs=(), output="junk.mp4", frames=9, size=(32, 48), line=1),
            Job(prompt="p", refs=(), output="short.mp4", frames=9, size=(32, 48), line=2),
            Job(prompt="p", refs=(), output="junk.png", size=(16, 32), line=3, mode="image"),
            Job(prompt="p", refs=(), output="h264.webm", frames=5, size=(32, 48), line=4)]
    out = tmp_path / "out"

    def broken(job, tmp):
        if job.output == "junk.mp4":
            tmp.write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(300))
        elif job.output == "short.mp4":
            media.write_video(moving_gradient(5), tmp, fps=8)
        elif job.output == "junk.png":
            tmp.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
        else:  # H.264 whatever the suffix: FFmpeg writes a 262-byte .webm that nothing plays
            export_to_video(list(moving_gradient(5).astype(np.float32) / 255), str(tmp), fps=8)

    summary = render_batch(jobs, out, broken, progress=False)
    assert summary.rendered == [] and [f.line for f in summary.failed] == [1, 2, 3, 4]
    messages = [f.message for f in summary.failed]
    assert all(m.startswith("OutputCheckError: ") for m in messages)
    assert "does not decode as a video" in messages[0] and "decodes to 5 frames, expected 9" in messages[1]
    assert "does not decode as an image" in messages[2] and "does not decode as a video" in messages[3]
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]

    def good(job, tmp):
        if job.mode == "image":
            write_png(job, tmp)
        else:
            media.write_video(moving_gradient(job.frames, *job.size), tmp, fps=8)

    summary = render_batch(jobs, out, good, progress=False)
    assert summary.rendered == [j.output for j in jobs] and summary.skipped == [] and summary.ok
    assert [decode(out / name)[1].shape for name in ("junk.mp4", "short.mp4", "h264.webm")] == [
        (9, 32, 48, 3), (9, 32, 48, 3), (5, 32, 48, 3)]
    assert decode(out / "h264.webm")[0] == "vp9" and Image.open(out / "junk.png").size == (32, 16)


# ------------------------------------------------------------------------ listings, temps, locks


def test_finished_outputs_are_skipped_with_one_listing(tmp_path, monkeypatch):
    listed: list = []
    scandir, listdir = os.scandir, os.listdir
    monkeypatch.setattr(os, "scandir", lambda path=".": listed.append(path) or scandir(path))
    monkeypatch.setattr(os, "listdir", lambda path=".": listed.append(path) or listdir(path))

    def never(job, tmp):
        raise AssertionError(f"{job.output} is finished and must not be rendered")

    counts = {}
    for n in (10, 10_000):
        out = tmp_path / f"out{n}"
        out.mkdir()
        for i in range(n):
            (out / f"clip{i}.mp4").write_bytes(b"finished")
        jobs = [Job(prompt="p", refs=(), output=f"clip{i}.mp4", line=i + 1) for i in range(n)]
        listed.clear()
        summary = render_batch(jobs, out, never, progress=False)
        assert len(summary.skipped) == n and summary.rendered == [] and summary.failed == []
        of_root = [p for p in listed if not isinstance(p, int) and Path(p).resolve() == out.resolve()]
        assert len(of_root) == 1  # the output folder is listed once
        counts[n] = len(listed)
    assert counts[10_000] == counts[10]  # and nothing else is listed per job


def test_an_output_named_like_an_old_temporary_file_is_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    odd = media.write_video(moving_gradient(5), out / ".clip.abcdefgh.tmp.mp4", fps=8)
    before = odd.read_bytes()
    jobs = [Job(prompt="p", refs=(), output=".clip.abcdefgh.tmp.mp4", frames=5, size=(32, 48), line=1),
            Job(prompt="p", refs=(), output="clip.mp4", frames=5, size=(32, 48), line=2)]
    summary = render_batch(jobs, out, write_video, progress=False)
    assert summary.skipped == [".clip.abcdefgh.tmp.mp4"] and summary.rendered == ["clip.mp4"]
    assert summary.removed_temps == 0 and odd.read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == [".clip.abcdefgh.tmp.mp4", "clip.mp4", "summary.json"]


DEAD_RUN = """
import os
from idcrafter.render import Job, render_batch
from idcrafter.utils.io import atomic_write

def render(job, tmp):
    tmp.write_bytes(b"partial")
    with atomic_write(tmp) as nested:  # a writer's own temporary file, next to the one it was given
        nested.write_bytes(b"partial too")
        os._exit(9)

render_batch([Job(prompt="p", refs=(), output="dead.png", mode="image")], OUT, render, progress=False)
"""

LIVE_RUN = """
import time
from pathlib import Path
from idcrafter.render import Job, render_batch
from test_render_batch import write_png

def render(job, tmp):
    tmp.write_bytes(b"partial")
    Path(READY).touch()
    while not Path(RELEASE).exists():
        time.sleep(0.02)
    write_png(job, tmp)

render_batch([Job(prompt="p", refs=(), output="live.png", mode="image")], OUT, render, progress=False)
"""


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def test_dead_process_temps_are_removed_and_live_ones_kept(tmp_path):
    out, ready, release = tmp_path / "out", tmp_path / "ready", tmp_path / "release"
    live = run_python(LIVE_RUN.replace("OUT", repr(str(out))).replace("READY", repr(str(ready)))
                      .replace("RELEASE", repr(str(release))))
    try:
        wait_for(ready, live)
        dead = run_python(DEAD_RUN.replace("OUT", repr(str(out))))
        assert dead.wait(timeout=60) == 9
        owners = sorted((out / WORK_DIR / "owners").iterdir(), key=lambda p: not p.name.startswith(f"{live.pid}-"))
        assert len(owners) == 2 and owners[0].name.startswith(f"{live.pid}-")
        dead_files = sorted(p.relative_to(owners[1]).as_posix() for p in owners[1].rglob("*") if p.is_file())
        assert len(dead_files) == 3 and dead_files[1:] == ["job/dead.png", "owner.lock"]
        assert re.fullmatch(r"job/\.dead\.[a-z0-9_]{8}\.tmp\.png", dead_files[0])  # the writer's nested temp

        summary = render_batch([Job(prompt="p", refs=(), output=n, mode="image") for n in ("a.png", "b.png")], out, write_png,
                               progress=False)
        assert summary.removed_temps == 2 and summary.rendered == ["a.png", "b.png"]
        assert not owners[1].exists()  # the dead process's folder, nested temp and all
        assert (owners[0] / "job" / "live.png").read_bytes() == b"partial"  # the live one's is untouched
        assert json.loads((out / "summary.json").read_text())["processes"] == 1  # the live one has not reported
    finally:
        release.touch()
        _, stderr = live.communicate(timeout=60)
    assert live.returncode == 0, stderr
    merged = json.loads((out / "summary.json").read_text())
    assert merged["processes"] == 2 and sorted(merged["rendered"]) == ["a.png", "b.png", "live.png"]
    assert merged["removed_temps"] == 2 and merged["counts"]["jobs"] == 3
    assert Image.open(out / "live.png").size == (16, 16)
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "live.png", "summary.json"]


CONCURRENT_RUN = """
import json, os, time
from pathlib import Path
from idcrafter.render import parse_jobs, render_batch
from test_render_batch import write_png

def render(job, tmp):
    with open(LOG, "a") as log:
        log.write(f"{os.getpid()} {job.output}\\n")
    time.sleep(0.1)
    write_png(job, tmp)

jobs, errors = parse_jobs(JOBS)
Path(READY + str(os.getpid())).touch()
while not Path(GO).exists():
    time.sleep(0.01)
print(json.dumps(render_batch(jobs, OUT, render, progress=False, errors=errors).to_dict()))
"""


def test_two_processes_on_one_root_render_each_job_once(tmp_path):
    refs = make_refs(tmp_path / "refs")
    names = [f"img{i}.png" for i in range(10)]
    lines = [{"prompt": "p", "refs": refs, "output": n, "seed": i, "size": [16, 32]} for i, n in enumerate(names)]
    lines.insert(4, {"prompt": "p", "refs": refs, "output": "x.mp4", "frames": 2})  # line 5: bad
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", lines)
    out, log, go = tmp_path / "out", tmp_path / "renders.log", tmp_path / "go"
    code = (CONCURRENT_RUN.replace("JOBS", repr(str(jobs_file))).replace("OUT", repr(str(out)))
            .replace("LOG", repr(str(log))).replace("READY", repr(str(tmp_path / "ready-"))).replace("GO", repr(str(go))))
    procs = [run_python(code) for _ in range(2)]
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("ready-*"))) < 2:
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
        time.sleep(0.02)
    go.touch()
    own = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        own.append(json.loads(stdout))

    renders = [line.split() for line in log.read_text().splitlines()]
    assert sorted(name for _, name in renders) == names  # every job rendered exactly once
    assert {int(pid) for pid, _ in renders} == {p.pid for p in procs}  # and both processes worked
    rendered = [set(s["rendered"]) for s in own]
    assert not rendered[0] & rendered[1] and rendered[0] | rendered[1] == set(names)
    for s in own:  # each accounts for every job: rendered it, or found it finished by the other
        assert sorted(s["rendered"] + s["skipped"]) == names and s["failed"] == []
    merged = json.loads((out / "summary.json").read_text())
    assert merged["processes"] == 2 and sorted(merged["rendered"]) == names and merged["skipped"] == []
    assert merged["counts"] == {"jobs": 10, "rendered": 10, "skipped": 0, "failed": 0, "invalid": 1}
    assert [e["line"] for e in merged["invalid"]] == [5]
    assert sorted(p.name for p in out.iterdir()) == [*names, "summary.json"]
    assert {Image.open(out / n).size for n in names} == {(32, 16)}

    # a run after both have finished reports only what it did
    jobs, errors = parse_jobs(jobs_file)
    summary = render_batch(jobs, out, write_png, progress=False, errors=errors)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["processes"] == 1 and on_disk["counts"]["skipped"] == 10 and on_disk["counts"]["rendered"] == 0
    assert Summary.from_dict(on_disk) == summary


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp"])
def test_write_image_writes_what_decodes_at_its_size(tmp_path, suffix):
    path = media.write_image(moving_gradient(1, 24, 40)[0], tmp_path / f"still{suffix}")
    assert media.verify_image(path, size=(24, 40)) == (24, 40) and Image.open(path).size == (40, 24)
    assert [p.name for p in tmp_path.iterdir()] == [f"still{suffix}"]
    with pytest.raises(FileFormatError, match=r"\.xyz is not an image format PIL writes"):
        media.write_image(moving_gradient(1)[0], tmp_path / "still.xyz")
