"""The web demo's requests without a browser (idcrafter.demo.service): outputs that the printed
`scripts/infer.py` command reproduces byte for byte, the progress reports, and bad input as one
page line with nothing left behind. tests/test_demo_browser.py drives the page itself."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from idcrafter.cli import infer
from idcrafter.demo.service import DemoModel, ImageService, VideoService, command_line, page_message
from idcrafter.utils.cli import InputError
from idcrafter.utils.media import read_video

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = [str(ROOT / "examples" / name) for name in ("subject_a.png", "subject_b.png")]
TOY_VIDEO_PROMPT = "two objects: the first moves from left to right along the bottom, the second stays in the top right corner."


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    service = VideoService(DemoModel(), work_dir=tmp_path_factory.mktemp("video-work"))
    service.load()
    return service


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    service = ImageService(DemoModel(), work_dir=tmp_path_factory.mktemp("image-work"))
    service.load()
    return service


def rerun(command: str, out: Path) -> Path:
    """Run the page's command through scripts/infer.py's main with --out replaced."""
    words = shlex.split(command)
    assert words[:2] == ["python", "scripts/infer.py"]
    args = words[2:]
    args[args.index("--out") + 1] = str(out)
    assert infer.main(args) == 0
    return out


def test_video_request_writes_what_its_command_reproduces(video, tmp_path):
    steps = []
    result = video.generate([EXAMPLES[0], None, EXAMPLES[1]], TOY_VIDEO_PROMPT, steps=4, seed=7,
                            progress=lambda done, total, what: steps.append((done, total, what)))
    d = video.defaults()
    frames = read_video(result.path)
    assert len(frames) == d["frames"] and (len(frames) - 1) % 4 == 0
    assert frames[0].shape == (d["height"], d["width"], 3)
    assert steps == [(k, 4, "denoising") for k in range(5)]
    # the references were copied next to the output under their upload names, in order
    assert [p.name for p in sorted(result.path.parent.glob("*.png"))] == ["1-subject_a.png", "2-subject_b.png"]
    assert "--seed 7" in result.command and "--steps 4" in result.command
    assert result.settings["seed"] == 7 and result.settings["refs"] == ["1-subject_a.png", "2-subject_b.png"]
    again = rerun(result.command, tmp_path / "again.mp4")
    assert again.read_bytes() == result.path.read_bytes()


def test_video_form_values_reach_the_pipeline(video, tmp_path):
    """The page's numbers arrive as floats: whole values are taken, and the seed changes the video."""
    a = video.generate(EXAMPLES, TOY_VIDEO_PROMPT, height=32.0, width=48.0, frames=9.0, steps=2.0, seed=1.0)
    b = video.generate(EXAMPLES, TOY_VIDEO_PROMPT, height=32, width=48, frames=9, steps=2, seed=2)
    fa, fb = np.stack(read_video(a.path)), np.stack(read_video(b.path))
    assert fa.shape == fb.shape == (9, 32, 48, 3)
    assert np.abs(fa.astype(float) - fb).mean() > 1.0
    assert a.settings["height"] == 32 and a.settings["frames"] == 9 and "--size 32x48" in a.command


@pytest.mark.parametrize("case", ["no refs", "too many", "unreadable", "bad size", "bad frames", "empty prompt",
                                  "fractional seed", "nan seed", "text height"])
def test_video_bad_input_is_one_page_line_and_leaves_nothing(video, tmp_path, case):
    bad = tmp_path / "holiday.png"
    bad.write_text("not a picture")
    refs, kw = EXAMPLES, {}
    expected = {
        "no refs": "References: add at least one reference image",
        "too many": "References: 4 references, this model supports at most 3",
        "unreadable": "References: reference image 1-holiday.png cannot be read",
        "bad size": "Height x width 50x64",
        "bad frames": "Frames 6: the frame count must be 4n+1",
        "empty prompt": "Prompt is empty",
        "fractional seed": "Seed: must be a whole number",
        "nan seed": "Seed: must be a whole number, got nan",
        "text height": "Height x width: the height must be a whole number, got 'tall'",
    }[case]
    if case == "no refs":
        refs = [None]
    elif case == "too many":
        refs = EXAMPLES * 2
    elif case == "unreadable":
        refs = [str(bad)]
    elif case == "bad size":
        kw = dict(height=50, width=64)
    elif case == "bad frames":
        kw = dict(frames=6)
    elif case == "fractional seed":
        kw = dict(seed=1.5)
    elif case == "nan seed":
        kw = dict(seed=float("nan"))
    elif case == "text height":
        kw = dict(height="tall", width=64)
    before = sorted(video.work_dir.iterdir())
    with pytest.raises(InputError) as err:
        video.generate(refs, "" if case == "empty prompt" else TOY_VIDEO_PROMPT, **kw)
    message = str(err.value)
    assert message.startswith(expected), message
    assert "\n" not in message and "--" not in message and str(video.work_dir) not in message
    assert sorted(video.work_dir.iterdir()) == before


def test_image_request_with_categories_markup_and_figure(image, tmp_path):
    prompt = "two objects: the first <face>stays at the top</face>, the second <upper>stays in the centre</upper>."
    result = image.generate([EXAMPLES[0], EXAMPLES[1], None], ["face", "upper", None], prompt, seed=3, figure=True)
    d = image.defaults()
    with Image.open(result.path) as im:
        assert im.size == (d["width"], d["height"])
    assert result.figure is not None and result.figure.stat().st_size > 0
    assert "--categories face upper" in result.command and "--mode image" in result.command
    again = rerun(result.command, tmp_path / "again.png")
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(result.path)))


@pytest.mark.parametrize("case", ["missing category", "tag without reference", "too many", "bad size"])
def test_image_bad_input_is_one_page_line(image, case):
    refs, cats, kw = [EXAMPLES[0], EXAMPLES[1], None], ["face", "upper", None], {}
    prompt = "two objects: the first stays at the top, the second stays in the centre."
    expected = {
        "missing category": "Categories: reference 2 has no category",
        "tag without reference": "Prompt: descriptor markup <bag> names a category with no reference",
        "too many": "References: 4 references, this model supports at most 3",
        "bad size": "Height x width 40x64",
    }[case]
    if case == "missing category":
        cats = ["face", None, None]
    elif case == "tag without reference":
        prompt = "a man carrying <bag>a red bag</bag>"
    elif case == "too many":
        refs, cats = EXAMPLES * 2, [None] * 4
    else:
        kw = dict(height=40, width=64)
    with pytest.raises(InputError) as err:
        image.generate(refs, cats, prompt, **kw)
    assert str(err.value).startswith(expected), str(err.value)


def test_page_messages_and_commands():
    err = InputError("--size 50x64: height and width must be multiples of 16; --steps too")
    assert page_message(err) == "Height x width 50x64: height and width must be multiples of 16; Steps too"
    assert page_message(InputError("--guidance-image nan")) == "Image guidance nan"
    assert page_message(InputError("--refs /w/0001-video/1-a.png: broken"), Path("/w/0001-video")) == "References 1-a.png: broken"
    assert command_line([("--refs", ["a b.png", "c.png"]), ("--seed", 0), ("--x", None), ("--flag", True)]) == \
        "python scripts/infer.py --refs 'a b.png' c.png --seed 0 --flag"


def test_bad_model_options_stop_the_app_before_serving(tmp_path, capsys):
    pytest.importorskip("gradio")
    from idcrafter.cli.demo import main

    assert main(["--model", str(tmp_path / "missing"), "--tabs", "video"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--model" in err and "missing" in err, err
    assert main(["--image-preset", "nonsense", "--tabs", "image"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nonsense" in err, err


def test_the_page_has_both_tabs_and_one_request_at_a_time(video, image):
    pytest.importorskip("gradio")
    from idcrafter.demo import build_demo

    demo = build_demo(video, image)
    ids = {b.elem_id for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    assert {"video-refs", "video-generate", "video-output", "video-command", "image-ref-1", "image-ref-3",
            "image-cat-1", "image-generate", "image-output", "image-attention"} <= ids
    clicks = [fn for fn in demo.fns.values() if fn.concurrency_id in ("video", "image")]
    assert sorted(fn.concurrency_id for fn in clicks) == ["image", "video"]
    assert all(fn.concurrency_limit == 1 for fn in clicks)
