"""scripts/infer.py image mode and scripts/render_batch.py image jobs as users run them: real processes, real PNGs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = [str(ROOT / "examples" / "subject_a.png"), str(ROOT / "examples" / "subject_b.png")]


def run(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_infer_image_mode_writes_a_png_of_the_requested_size(tmp_path):
    out = tmp_path / "out.png"
    proc = run("scripts/infer.py", "--preset", "tiny-one-for-all", "--refs", *EXAMPLES, "--categories", "face", "upper",
               "--prompt", "a man <face>with short hair</face> in <upper>a red hoodie</upper>",
               "--out", str(out), "--size", "32x48", "--steps", "2", "--seed", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == f"wrote {out}"
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (48, 32) and img.mode == "RGB"
        pixels = np.asarray(img)
    assert pixels.std() > 0  # a decoded image, not a blank canvas
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # no temporary file left


def test_readme_image_command_runs(tmp_path):
    import shlex

    lines = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()]
    command = next(line for line in lines if line.startswith("python scripts/infer.py --mode image"))
    args = shlex.split(command)[1:]
    args[args.index("--out") + 1] = str(tmp_path / "out.png")
    proc = run(*args, "--dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads(proc.stdout)
    assert (plan["mode"], plan["height"], plan["width"], plan["ccpa"]) == ("image", 64, 64, True)
    assert not (tmp_path / "out.png").exists()


@pytest.fixture
def bad_files(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    floats = tmp_path / "float.tif"
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(floats)  # PIL mode "F"
    return {"corrupt": str(corrupt), "missing": str(tmp_path / "nope.png"), "float": str(floats)}


@pytest.mark.parametrize(
    "case, extra, message",
    [
        ("fewer categories than refs", ["--categories", "face"], "1 categories for 2 references"),
        ("more categories than refs", ["--categories", "face", "upper", "bag"], "3 categories for 2 references"),
        ("unknown category", ["--categories", "face", "spaceship"], "unknown category 'spaceship'"),
        ("markup without reference", ["--prompt", "a man with <bag>a red bag</bag>"],
         "descriptor markup <bag> names a category with no reference"),
        ("float image", ["--refs", "{float}", "{float}"], "unsupported image mode 'F'"),
        ("not an image", ["--refs", "{corrupt}", "{corrupt}"], "cannot be read"),
        ("missing ref", ["--refs", "{missing}", "{missing}"], "does not exist"),
        ("output suffix", ["--out", "{tmp}/out.gif"], "must end in .png"),
        ("size not multiple of 16", ["--size", "40x64"], "multiples of 16"),
        ("unknown preset", ["--preset", "tiny-one-for-all", "--mode", "image", "--preset", "flux-99b"], "unknown"),
        ("video option", ["--frames", "9"], "--frames is not an option of image mode"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, extra, message, bad_files, tmp_path):
    args = {"--preset": ["tiny-one-for-all"], "--refs": EXAMPLES, "--categories": ["face", "upper"],
            "--prompt": ["a man <face>with short hair</face>"], "--out": [str(tmp_path / "out.png")]}
    i = 0
    while i < len(extra):  # the case's flags replace the defaults
        flag, values = extra[i], []
        i += 1
        while i < len(extra) and not extra[i].startswith("--"):
            values.append(extra[i].format(tmp=tmp_path, **bad_files))
            i += 1
        args[flag] = values
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run("scripts/infer.py", *[x for flag, values in args.items() for x in (flag, *values)])
    assert proc.returncode == 2, (case, proc.stderr[-2000:])
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and message in err, (case, err)
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before, case


def test_image_option_in_video_mode_is_refused(tmp_path):
    proc = run("scripts/infer.py", "--refs", EXAMPLES[0], "--categories", "face", "--prompt", "x",
               "--out", str(tmp_path / "o.mp4"))
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --categories is not an option of video mode (add --mode image)"


def test_render_batch_image_jobs(tmp_path):
    for src in EXAMPLES:
        shutil.copy(src, tmp_path)
    refs = ["subject_a.png", "subject_b.png"]
    lines = [
        # 1: an image job by its suffix, markup naming its categories
        {"prompt": "a man <face>with hair</face>", "refs": refs, "categories": ["face", "upper"],
         "output": "img/a.png", "size": "32x48", "steps": 2, "seed": 1, "guidance_text": 4.0},
        # 2-4: bad lines, reported with their numbers
        {"prompt": "x", "refs": refs[:1], "categories": ["spaceship"], "output": "b.png"},
        {"prompt": "x <bag>a bag</bag>", "refs": refs[:1], "categories": ["face"], "output": "c.png"},
        {"prompt": "x", "refs": refs[:1], "categories": ["face"], "output": "d.png", "guidance_image": 2.0},
        # 5: valid line, but One-for-All needs a category per reference: fails at render time
        {"prompt": "x", "refs": refs[:1], "output": "e.jpg", "steps": 2, "size": "32x32"},
    ]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    proc = run("scripts/render_batch.py", "--jobs", str(jobs), "--out", str(out), "--no-progress",
               "--image-preset", "tiny-one-for-all")
    assert proc.returncode == 1, proc.stderr[-2000:]  # bad lines make the run not fully ok
    with Image.open(out / "img" / "a.png") as img:
        assert img.size == (48, 32) and img.format == "PNG"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rendered"] == ["img/a.png"]
    invalid = {e["line"]: e["message"] for e in summary["invalid"]}
    assert sorted(invalid) == [2, 3, 4]
    assert "unknown category 'spaceship'" in invalid[2]
    assert "<bag> names a category with no reference" in invalid[3]
    assert "'guidance_image' is a video key" in invalid[4]
    assert [(f["line"], f["output"]) for f in summary["failed"]] == [(5, "e.jpg")]
    assert "need a category per reference" in summary["failed"][0]["message"]
    assert sorted(p.name for p in out.iterdir()) == ["img", "summary.json"]  # nothing half-written
