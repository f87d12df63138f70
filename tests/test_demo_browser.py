"""The web demo in a real browser: `python -m idcrafter.demo` started on a free port with the
built-in toy models, driven by headless Chromium through Playwright.

Runs where Chromium and Playwright are installed (`.ci/run` installs both: Chromium from the
system packages, launched from its own path since `playwright install` downloads nothing here);
skipped elsewhere. Screenshots of both tabs and the click-to-result times go to
$IDCRAFTER_ARTIFACTS (default: the test's tmp folder); README's pictures come from
`IDCRAFTER_ARTIFACTS=docs/images python -m pytest tests/test_demo_browser.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from idcrafter.utils.media import read_video

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = [str(ROOT / "examples" / name) for name in ("subject_a.png", "subject_b.png")]
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
VIDEO_PROMPT = "two objects: the first moves from left to right along the bottom, the second stays in the top right corner."
IMAGE_PROMPT = "two objects: the first <face>stays at the top</face>, the second <upper>stays in the centre</upper>."

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium)")
playwright_api = pytest.importorskip("playwright.sync_api", reason="no Playwright (pip install playwright)")
pytest.importorskip("gradio", reason="no gradio (pip install -e '.[demo]')")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app in its own process, as a user starts it; yields (url, work dir)."""
    work = tmp_path_factory.mktemp("demo-work")
    port = free_port()
    log = open(work.parent / "demo.log", "w")  # noqa: SIM115 (open for the process's life)
    proc = subprocess.Popen([sys.executable, "-m", "idcrafter.demo", "--port", str(port), "--work-dir", str(work)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 240
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            log.close()
            pytest.fail(f"the demo did not start: {(work.parent / 'demo.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield url, work
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("IDCRAFTER_ARTIFACTS") or tmp_path_factory.mktemp("artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def record(artifacts: Path, key: str, value) -> None:
    path = artifacts / "demo_timings.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[key] = value
    path.write_text(json.dumps(data, indent=2) + "\n")


def error_text(page) -> str:
    """The text of the page's error toasts (gradio's gr.Error)."""
    return " ".join(page.locator(".toast-body").all_inner_texts())


def download(page, selector: str, target: Path) -> Path:
    with page.expect_download() as info:
        page.locator(f"{selector} a[download]").first.click()
    info.value.save_as(target)
    return target


def wait_for_video(page, timeout_ms: float) -> None:
    """Until the result's <video> has a source the browser has read the metadata of (playable)."""
    page.wait_for_function(
        """() => { const v = document.querySelector('#video-output video');
                   return v && v.currentSrc && v.readyState >= 1 && !v.error && v.duration > 0; }""",
        timeout=timeout_ms)


def test_video_tab_generates_a_playable_video_after_an_empty_submit(app, browser, artifacts, tmp_path):
    url, work = app
    page = browser.new_page(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
    page.goto(url)
    page.locator("#video-prompt textarea").fill(VIDEO_PROMPT)

    # no reference: one line in the page, nothing generated, the app keeps serving
    page.locator("#video-generate").click()
    page.wait_for_function("() => document.querySelector('.toast-body') !== null", timeout=60_000)
    assert "References: add at least one reference image" in error_text(page)
    assert page.locator("#video-output video").count() == 0
    assert "Traceback" not in page.content()
    page.locator(".toast-close").first.click()

    page.locator("#video-refs input[type=file]").set_input_files(EXAMPLES)
    page.wait_for_function("() => document.querySelectorAll('#video-preview img').length === 2", timeout=60_000)
    page.locator("#video-steps input").fill("8")
    start = time.monotonic()
    page.locator("#video-generate").click()
    wait_for_video(page, 180_000)
    assert error_text(page) == ""
    seconds = time.monotonic() - start
    record(artifacts, "video_click_to_playable_s", round(seconds, 2))

    saved = download(page, "#video-download", tmp_path / "download.mp4")
    frames = read_video(saved)
    assert len(frames) == 5 and (len(frames) - 1) % 4 == 0 and frames[0].shape == (64, 64, 3)
    written = sorted(work.glob("*-video/video.mp4"))
    assert len(written) == 1 and written[0].read_bytes() == saved.read_bytes()
    command = page.locator("#video-command").inner_text()
    assert "scripts/infer.py" in command and "--steps 8" in command
    page.screenshot(path=str(artifacts / "demo_video.png"), full_page=True)
    page.close()


def test_image_tab_generates_with_categories_and_the_attention_figure(app, browser, artifacts, tmp_path):
    url, work = app
    page = browser.new_page(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
    page.goto(url)
    page.get_by_role("tab", name="Image (MultiCrafter / One-for-All)").click()
    for k, (ref, category) in enumerate(zip(EXAMPLES, ("face", "upper")), start=1):
        page.locator(f"#image-ref-{k} input[type=file]").set_input_files(ref)
        page.wait_for_function(f"() => document.querySelector('#image-ref-{k} img') !== null", timeout=60_000)
        page.locator(f"#image-cat-{k} input").click()
        page.locator(f"#image-cat-{k}").get_by_role("option", name=category, exact=True).click()
        assert page.locator(f"#image-cat-{k} input").input_value() == category
    page.locator("#image-prompt textarea").fill(IMAGE_PROMPT)
    page.locator("#image-figure input").check()
    start = time.monotonic()
    page.locator("#image-generate").click()
    for selector in ("#image-output", "#image-attention"):
        page.wait_for_function(f"() => {{ const i = document.querySelector('{selector} img'); "
                               "return (i && i.complete && i.naturalWidth > 0) || document.querySelector('.toast-body'); }",
                               timeout=180_000)
        assert error_text(page) == ""
    record(artifacts, "image_click_to_shown_s", round(time.monotonic() - start, 2))

    saved = download(page, "#image-download", tmp_path / "download.png")
    with Image.open(saved) as im:
        assert im.size == (64, 64)
    command = page.locator("#image-command").inner_text()
    assert "--categories face upper" in command and "<face>stays at the top</face>" in command
    assert len(sorted(work.glob("*-image/attention.png"))) == 1
    page.screenshot(path=str(artifacts / "demo_image.png"), full_page=True)
    page.close()


def test_an_example_fills_the_form_and_generates(app, browser, tmp_path):
    """The page's first video example: the repository's two references and a prompt the built-in
    toy model knows; the video it gives decodes."""
    url, work = app
    page = browser.new_page(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
    page.goto(url)
    before = set(work.glob("*-video"))
    page.locator("#video-generate").wait_for()
    page.locator("table tbody tr").first.click()  # the video tab's examples come first
    page.wait_for_function("() => document.querySelectorAll('#video-preview img').length === 2", timeout=60_000)
    assert page.locator("#video-prompt textarea").input_value() == VIDEO_PROMPT
    page.locator("#video-steps input").fill("4")
    page.locator("#video-generate").click()
    wait_for_video(page, 180_000)
    assert error_text(page) == ""
    (folder,) = set(work.glob("*-video")) - before
    assert sorted(p.name for p in folder.glob("*.png")) == ["1-subject_a.png", "2-subject_b.png"]
    assert len(read_video(folder / "video.mp4")) == 5
    page.close()
