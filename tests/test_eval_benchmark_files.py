"""The published OpenS2V-Eval files read as published, rendered by id and scored by id.

tests/data/opens2v/*.json are cases copied verbatim from OpenS2V-Nexus eval/demo_result/input_json
(Apache-2.0); real photos shipped in packages stand in for the benchmark's images.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from idcrafter.eval.benchmark_files import (
    case_jobs,
    check_images,
    find_videos,
    read_benchmark,
    select_cases,
    write_stand_in_images,
)
from idcrafter.utils.errors import ConfigError, FileFormatError

DATA = Path(__file__).parent / "data" / "opens2v"
OPEN = DATA / "Open-Domain_Eval.json"


def test_reads_the_three_published_files_in_order():
    cases = read_benchmark(OPEN)
    assert [c.id for c in cases] == ["singleobj_1", "singlehuman_1", "singleface_1", "multiobject_1", "humanobj_1",
                                     "faceobj_1", "multiface_1", "multihuman_1", "singleface_2", "humanobj_2"]
    humanobj = cases[4]
    assert humanobj.img_paths == ("Images/humanobj/human/man/celebrity/1.jpg",
                                  "Images/humanobj/thing/animal/bird/1.jpg", "Images/humanobj/environment/park/1.jpg")
    assert humanobj.class_label == ("Man", "Bird", "Park")
    assert humanobj.synthesis_flag == "Wrong"
    assert humanobj.prompt == json.loads(OPEN.read_text())["humanobj_1"]["prompt"]
    assert [c.id for c in read_benchmark(DATA / "Human-Domain_Eval.json")] == ["singlehuman_1", "singleface_1"]
    assert [c.class_label for c in read_benchmark(DATA / "SingleObject_Eval.json")] == [("Cup",), ("Camera",)]


def test_face_reference_is_the_first_image_in_a_face_folder():
    by_id = {c.id: c for c in read_benchmark(OPEN)}
    assert by_id["faceobj_1"].face_reference() == "Images/humanobj/human/crop_man/commoner/5.jpg"
    assert by_id["multiface_1"].face_reference() == "Images/multiface/crop_woman/1.jpg"
    assert by_id["multihuman_1"].face_reference() == "Images/multihuman/man/1.jpg"
    assert by_id["singleobj_1"].face_reference() is None


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON (line 1 column 2"),
    ("[]", "a JSON object of cases by id, got list"),
    ("{}", "no cases"),
    ('{"a": {"prompt": "p", "img_paths": [], "class_label": []}}', "case 'a': 'img_paths' must be a non-empty list"),
    ('{"a": {"prompt": "p", "img_paths": ["x.jpg"], "class_label": ["A", "B"]}}', "case 'a': 2 class_label for 1 img_paths"),
    ('{"a": {"img_paths": ["x.jpg"], "class_label": ["A"]}}', "case 'a': 'prompt' must be a non-empty string (missing)"),
    ('{"a": {"prompt": "p", "img_paths": ["../x.jpg"], "class_label": ["A"]}}', "must be relative to the images root"),
    ('{"../a": {"prompt": "p", "img_paths": ["x.jpg"], "class_label": ["A"]}}', "cannot be a file name"),
    ('{"a": 3, "b": 4}', "case 'a': must be a JSON object, got int (and 1 more bad cases)"),
])
def test_bad_files_are_one_line_naming_file_case_and_problem(tmp_path, content, message):
    path = tmp_path / "Open-Domain_Eval.json"
    path.write_text(content)
    with pytest.raises(FileFormatError) as info:
        read_benchmark(path)
    text = str(info.value)
    assert text.startswith(str(path)) and message in text and "\n" not in text


def test_missing_file_is_a_file_format_error(tmp_path):
    with pytest.raises(FileFormatError, match="no such benchmark file"):
        read_benchmark(tmp_path / "nope.json")


def test_select_cases_by_id_and_limit():
    cases = read_benchmark(OPEN)
    assert [c.id for c in select_cases(cases, OPEN, ["humanobj_2", "singleobj_1"])] == ["humanobj_2", "singleobj_1"]
    assert [c.id for c in select_cases(cases, OPEN, limit=3)] == ["singleobj_1", "singlehuman_1", "singleface_1"]
    with pytest.raises(ConfigError, match=r"no case singleobj_99 in the file \(10 cases"):
        select_cases(cases, OPEN, ["singleobj_1", "singleobj_99"])
    with pytest.raises(ConfigError, match="named more than once"):
        select_cases(cases, OPEN, ["singleobj_1", "singleobj_1"])
    with pytest.raises(ConfigError, match="limit must be >= 1"):
        select_cases(cases, OPEN, limit=0)


def test_stand_in_images_resolve_and_missing_ones_are_named(tmp_path):
    from PIL import Image

    cases = read_benchmark(OPEN)
    assert write_stand_in_images(cases, tmp_path) == 20  # 20 distinct images among the 10 cases (some shared)
    check_images(cases, tmp_path, OPEN)
    face = Image.open(tmp_path / "Images/multiface/crop_woman/1.jpg")
    photo = Image.open(tmp_path / "Images/singleobject/cup/52.jpg")
    # face folders: insightface's Tom Hanks (112x112) then t1.jpg in turn; the rest: skimage's astronaut first
    assert face.size in ((112, 112), (1280, 886)) and photo.size == (512, 512)
    assert Image.open(tmp_path / "Images/singlehuman/man/15.png").size == (112, 112)
    (tmp_path / "Images/humanobj/thing/animal/bird/1.jpg").unlink()
    (tmp_path / "Images/multiface/scene/1.jpg").unlink()
    with pytest.raises(FileFormatError) as info:
        check_images(cases, tmp_path, OPEN)
    assert str(info.value) == (f"{OPEN}: case humanobj_1: image Images/humanobj/thing/animal/bird/1.jpg does not exist "
                               f"under {tmp_path} (2 images missing)")


def test_jobs_name_outputs_by_case_id(tmp_path):
    cases = read_benchmark(OPEN)[3:5]
    jobs = case_jobs(cases, tmp_path, seed=3, steps=2)
    assert [j.output for j in jobs] == ["multiobject_1.mp4", "humanobj_1.mp4"]
    assert jobs[1].refs == tuple(tmp_path / p for p in cases[1].img_paths)
    assert jobs[1].categories == ("Man", "Bird", "Park") and jobs[1].prompt == cases[1].prompt
    assert (jobs[0].seed, jobs[0].steps, jobs[0].mode) == (3, 2, "video")


def test_find_videos_names_missing_cases(tmp_path):
    cases = read_benchmark(OPEN)[:3]
    (tmp_path / "singleobj_1.mp4").write_bytes(b"x")
    with pytest.raises(FileFormatError) as info:
        find_videos(cases, tmp_path, OPEN)
    assert str(info.value) == f"{tmp_path}: no <id>.mp4 for 2 of 3 cases of {OPEN}: singlehuman_1, singleface_1"
    for name in ("singlehuman_1", "singleface_1"):
        (tmp_path / f"{name}.mp4").write_bytes(b"x")
    assert find_videos(cases, tmp_path, OPEN) == [tmp_path / f"{c.id}.mp4" for c in cases]


# ------------------------------------------------------------------------------ the command-line tools

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, f"scripts/{script}", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """Two Open-Domain cases (one and three references) rendered by the built-in toy model."""
    root = tmp_path_factory.mktemp("opens2v")
    write_stand_in_images(read_benchmark(OPEN), root / "images")
    proc = run_script("render_batch.py", "--opens2v", OPEN, "--images-root", root / "images", "--out", root / "videos",
                      "--cases", "singleobj_1", "humanobj_1", "--steps", "2", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root


def test_render_batch_renders_cases_by_id(rendered):
    from idcrafter.utils.media import read_video

    videos = rendered / "videos"
    assert sorted(p.name for p in videos.glob("*.mp4")) == ["humanobj_1.mp4", "singleobj_1.mp4"]
    summary = json.loads((videos / "summary.json").read_text())
    assert sorted(summary["rendered"]) == ["humanobj_1.mp4", "singleobj_1.mp4"] and summary["failed"] == []
    frames = read_video(videos / "humanobj_1.mp4")
    assert frames.shape == (5, 64, 64, 3)  # the toy model's default clip: 5 frames of 64x64


@pytest.mark.parametrize("extra, message", [
    (["--cases", "singleobj_1", "multiobject_9"], "Open-Domain_Eval.json: no case multiobject_9 in the file"),
    (["--limit", "4"], "Open-Domain_Eval.json: case multiobject_1: image Images/multiobject/monitor/1.jpg does not exist"),
    (["--jobs", "x.jsonl"], "give either --jobs FILE, or --opens2v FILE with --images-root DIR"),
])
def test_render_batch_bad_cases_are_one_line_before_any_work(tmp_path, extra, message):
    cases = read_benchmark(OPEN)
    write_stand_in_images(cases[:3], tmp_path / "images")  # the first three cases' images only
    out = tmp_path / "out"
    proc = run_script("render_batch.py", "--opens2v", OPEN, "--images-root", tmp_path / "images", "--out", out, *extra)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not out.exists()


def test_evaluate_scores_the_rendered_cases_with_their_prompts_and_references(rendered):
    from idcrafter.eval.inputs import load_benchmark_items
    from idcrafter.eval.motion import motion_score
    from idcrafter.utils.media import read_video

    out = rendered / "eval"
    proc = run_script("evaluate.py", "--opens2v", OPEN, "--images-root", rendered / "images", "--videos",
                      rendered / "videos", "--cases", "singleobj_1", "humanobj_1", "--metrics", "motion",
                      "--out", out, "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split(",") for line in (out / "per_sample.csv").read_text().splitlines()]
    header, body = rows[0], rows[1:]
    assert [r[0] for r in body] == ["singleobj_1", "humanobj_1"]
    for row in body:  # the column is the existing Motion metric of that case's own video
        expected = motion_score(read_video(rendered / "videos" / f"{row[0]}.mp4"))
        assert float(row[header.index("Motion")]) == pytest.approx(expected, abs=1e-4)
    inputs = json.loads((out / "summary.json").read_text())["inputs"]
    assert inputs["opens2v"] == str(OPEN) and inputs["images_root"] == str(rendered / "images")

    items = load_benchmark_items(OPEN, rendered / "images", rendered / "videos", ["humanobj_1"])
    (item,) = items
    assert item.prompt == read_benchmark(OPEN)[4].prompt and item.categories == ["Man", "Bird", "Park"]
    # Tom Hanks (face folder), then the 4th and 5th non-face photos of the file: astronaut, chelsea
    assert [r.shape for r in item.refs] == [(112, 112, 3), (512, 512, 3), (300, 451, 3)]
    assert item.path == rendered / "videos" / "humanobj_1.mp4"


@pytest.mark.parametrize("extra, message", [
    ([], f"--videos: VIDEOS: no <id>.mp4 for 8 of 10 cases of {OPEN}: singlehuman_1, singleface_1, multiobject_1"),
    (["--cases", "singleobj_1", "faceobj_9"], f"--opens2v: {OPEN}: no case faceobj_9 in the file"),
    (["--limit", "2", "--data", "x.jsonl"], "--opens2v FILE goes with --images-root DIR and --videos FOLDER"),
])
def test_evaluate_missing_videos_and_unknown_ids_are_one_line_before_any_work(rendered, tmp_path, extra, message):
    out = tmp_path / "eval"
    videos = rendered / "videos"
    proc = run_script("evaluate.py", "--opens2v", OPEN, "--images-root", rendered / "images", "--videos", videos,
                      "--out", out, *extra)
    assert proc.returncode == 2
    assert message.replace("VIDEOS", str(videos)) in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not out.exists()


def test_scoring_files_and_the_toy_mode_import_no_generator(rendered, tmp_path):
    """The evaluation process decodes and scores files only; the toy mode renders in a separate process."""
    import subprocess
    import sys

    code = (
        "import sys, importlib.util\n"
        "spec = importlib.util.spec_from_file_location('evaluate_script', 'scripts/evaluate.py')\n"
        "script = importlib.util.module_from_spec(spec); spec.loader.exec_module(script)\n"
        f"rc = script.main(['--opens2v', {str(OPEN)!r}, '--images-root', {str(rendered / 'images')!r}, '--videos',"
        f" {str(rendered / 'videos')!r}, '--cases', 'singleobj_1', '--metrics', 'motion,toyid', '--out',"
        f" {str(tmp_path / 'files')!r}, '--no-progress'])\n"
        f"rc += script.main(['--toyworld', '--samples', '1', '--steps', '1', '--out', {str(tmp_path / 'toy')!r},"
        " '--no-progress'])\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('idcrafter.video.pipeline', 'diffusers.pipelines',"
        " 'mcimage.pipeline')))\n"
        "print('RESULT', rc, bad)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "RESULT 0 []" in proc.stdout, (proc.stdout[-1500:], proc.stderr[-1500:])
    assert (tmp_path / "toy" / "videos" / "held_out-00000.mp4").is_file()
    # the check can fail: the same filter in a process that loads the generator
    proc = subprocess.run([sys.executable, "-c", "import sys; from idcrafter.video.pipeline import IDCrafterPipeline; "
                           "print(sorted(m for m in sys.modules if m.startswith(('idcrafter.video.pipeline', "
                           "'diffusers.pipelines'))))"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "'idcrafter.video.pipeline'" in proc.stdout, proc.stderr[-1500:]


def test_render_batch_benchmark_options_need_opens2v(tmp_path):
    proc = run_script("render_batch.py", "--jobs", tmp_path / "jobs.jsonl", "--out", tmp_path / "out", "--limit", "2")
    assert proc.returncode == 2 and proc.stderr == ("error: --images-root, --cases, --limit, --seed and --steps go with "
                                                    "--opens2v FILE (a job file sets seed and steps per job)\n")


def test_benchmark_references_are_read_as_the_benchmark_reads_them(tmp_path):
    """OpenS2V-Eval's scripts read a reference with Image.open(path).convert("RGB"): a transparent PNG keeps
    the colour stored under its alpha (our own loaders composite on white) and no EXIF turn is applied."""
    from PIL import Image

    from idcrafter.eval.inputs import _load_benchmark_ref

    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)           # fully transparent, a dark colour underneath
    rgba[2:4, 2:6] = (200, 100, 50, 255)   # an opaque patch
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cut.png")
    got = _load_benchmark_ref(tmp_path / "cut.png")
    assert got.shape == (6, 8, 3) and got[0, 0].tolist() == [10, 20, 30] and got[2, 3].tolist() == [200, 100, 50]
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": the benchmark ignores it, so the stored 6 x 8 layout stays
    Image.fromarray(rgba[..., :3]).save(tmp_path / "turned.jpg", exif=exif)
    assert _load_benchmark_ref(tmp_path / "turned.jpg").shape == (6, 8, 3)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(FileFormatError, match="bad.png cannot be read"):
        _load_benchmark_ref(tmp_path / "bad.png")
