"""The web demo's page: a Gradio app with a video tab (ID-Crafter) and an image tab (MultiCrafter /
One-for-All) over `idcrafter.demo.service`. The command line (`python -m idcrafter.demo`,
`idcrafter-demo`) is `idcrafter.cli.demo`.

Each tab's Generate runs in Gradio's queue with a concurrency limit of 1 under the tab's own id, so
the two models each run one request at a time. Bad input (no reference, an unreadable image, too
many references, a size the model cannot take) is raised as a `gr.Error` of one line, shown in the
page; any other failure too, its traceback going to the server log only.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from idcrafter.demo.service import ImageService, VideoService
from idcrafter.utils.cli import InputError

logger = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"  # a checkout's examples/ (absent when installed)
# Prompts in the built-in toy models' language (idcrafter.toyworld.world.describe_clip): layout and
# motion only, the look of each object comes from its reference.
VIDEO_EXAMPLES = (
    ("subject_a.png", "subject_b.png"),
    "two objects: the first moves from left to right along the bottom, the second stays in the top right corner.",
), (
    ("subject_b.png",),
    "one object: it moves diagonally from the top left to the bottom right.",
)
IMAGE_EXAMPLES = (
    (("subject_a.png", "none"), ("subject_b.png", "none")),
    "two objects: the first stays in the top left corner, the second stays in the bottom right corner.",
), (
    (("subject_a.png", "face"), ("subject_b.png", "upper")),
    "two objects: the first <face>stays at the top</face>, the second <upper>stays in the centre</upper>.",
)
NO_CATEGORY = "none"
# Small outputs (the toy models' 64x64) are shown enlarged with their pixels kept sharp.
CSS = ("#video-output video, #image-output img { image-rendering: pixelated; }\n"
       "#image-output img { width: 100%; height: 100%; object-fit: contain; }")
MARKUP_HELP = (
    "Mark the words that describe one reference's item with its category's tag: "
    "`a man <face>with short hair</face> wearing <upper>a red hoodie</upper>`. One-for-All models send "
    "the tagged words to that reference (CCPA); every model drops the tags from the text it encodes. "
    "A tag must name the category of one of the references."
)


def _error(gr, err: Exception):
    """The gr.Error the page shows for `err`: bad input as its one line; anything else as one line
    too (the traceback goes to the server log, never to the page)."""
    if isinstance(err, InputError):
        return gr.Error(str(err), duration=None, print_exception=False)
    logger.exception("generation failed")
    return gr.Error(f"generation failed: {err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''} "
                    "(details in the server log)", duration=None, print_exception=False)


def _reporter(progress):
    """service progress(done, total, what) -> gradio's progress bar."""
    return lambda done, total, what: progress((done, total), desc=what, unit="steps")


def _summary(result, what: str) -> str:
    s = result.settings
    frames = f", {s['frames']} frames at {s['fps']} fps" if "frames" in s else ""
    return (f"**{what}** {s['height']}x{s['width']}{frames}, {s['steps']} steps, seed {s['seed']}: "
            f"{result.seconds:.1f} s. Files in `{result.path.parent}`.")


def _video_tab(gr, service: VideoService) -> None:
    d = service.defaults()
    with gr.Row():
        with gr.Column(scale=1):
            refs = gr.File(label=f"References (1 to {d['max_subjects']} images, one per subject)",
                           file_count="multiple", file_types=["image"], elem_id="video-refs")
            preview = gr.Gallery(label="Reference preview", columns=4, height=150, interactive=False,
                                 elem_id="video-preview")
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="video-prompt")
            negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="video-negative")
            with gr.Row():
                height = gr.Number(label="Height", value=d["height"], precision=0, step=16, elem_id="video-height")
                width = gr.Number(label="Width", value=d["width"], precision=0, step=16, elem_id="video-width")
                frames = gr.Number(label="Frames (4n+1)", value=d["frames"], precision=0, step=4, elem_id="video-frames")
                steps = gr.Number(label="Steps", value=d["steps"], precision=0, elem_id="video-steps")
            with gr.Row():
                g_img = gr.Number(label="Image guidance", value=d["guidance_image"], step=0.1, elem_id="video-gimg")
                g_txt = gr.Number(label="Text guidance", value=d["guidance_text"], step=0.1, elem_id="video-gtxt")
                seed = gr.Number(label="Seed", value=0, precision=0, elem_id="video-seed")
            button = gr.Button("Generate", variant="primary", elem_id="video-generate")
        with gr.Column(scale=1):
            video = gr.Video(label="Video", interactive=False, autoplay=True, loop=True, buttons=["download"],
                             elem_id="video-output")
            download = gr.File(label="Download", interactive=False, elem_id="video-download")
            info = gr.Markdown(elem_id="video-info")
            command = gr.Code(label="The same video with scripts/infer.py", language="shell", interactive=False,
                              lines=2, elem_id="video-command")

    refs.change(lambda files: list(files or []), inputs=refs, outputs=preview, queue=False)

    def run(files, prompt_, negative_, h, w, f, n, gi, gt, s, progress=gr.Progress()):  # noqa: B008 (gradio finds the bar by its default)
        try:
            result = service.generate(files or [], prompt_, negative_, h, w, f, n, gi, gt, s,
                                      progress=_reporter(progress))
        except Exception as err:  # the page gets one line, the app keeps serving
            raise _error(gr, err) from None
        return str(result.path), str(result.path), _summary(result, "Video"), result.command

    button.click(run, inputs=[refs, prompt, negative, height, width, frames, steps, g_img, g_txt, seed],
                 outputs=[video, download, info, command], concurrency_limit=1, concurrency_id="video")
    examples = [[[str(EXAMPLES_DIR / name) for name in names], text] for names, text in VIDEO_EXAMPLES
                if all((EXAMPLES_DIR / name).is_file() for name in names)]
    if examples:
        gr.Examples(examples, inputs=[refs, prompt], label="Examples (the built-in toy model's references and prompts)")


def _image_tab(gr, service: ImageService) -> None:
    from idcrafter.core.categories import CATEGORY_IDS

    d = service.defaults()
    choices = ([] if service.needs_categories else [NO_CATEGORY]) + sorted(CATEGORY_IDS, key=CATEGORY_IDS.get)
    need = "every reference needs a category" if service.needs_categories else "categories are optional"
    with gr.Row():
        with gr.Column(scale=1):
            gr.Markdown(f"References, one per subject, with its category ({d['preset']}: {need}).")
            slots, cats = [], []
            with gr.Row():
                for k in range(d["max_subjects"]):
                    with gr.Column(min_width=120):
                        slots.append(gr.Image(label=f"Reference {k + 1}", type="filepath", height=150,
                                              elem_id=f"image-ref-{k + 1}"))
                        cats.append(gr.Dropdown(choices, value=choices[0], label=f"Category {k + 1}",
                                                elem_id=f"image-cat-{k + 1}"))
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="image-prompt")
            gr.Markdown(MARKUP_HELP)
            with gr.Row():
                height = gr.Number(label="Height", value=d["height"], precision=0, step=16, elem_id="image-height")
                width = gr.Number(label="Width", value=d["width"], precision=0, step=16, elem_id="image-width")
                steps = gr.Number(label="Steps", value=d["steps"], precision=0, elem_id="image-steps")
                guidance = gr.Number(label="Guidance", value=d["guidance"], step=0.1, elem_id="image-guidance")
                seed = gr.Number(label="Seed", value=0, precision=0, elem_id="image-seed")
            figure = gr.Checkbox(label="Attention-bleeding figure (one more generation and forward pass)",
                                 value=False, elem_id="image-figure")
            button = gr.Button("Generate", variant="primary", elem_id="image-generate")
        with gr.Column(scale=1):
            image = gr.Image(label="Image", type="filepath", interactive=False, height=320, elem_id="image-output")
            attention = gr.Image(label="Attention-bleeding figure: each subject's share of the reference attention",
                                 type="filepath", interactive=False, elem_id="image-attention")
            download = gr.File(label="Download", interactive=False, elem_id="image-download")
            info = gr.Markdown(elem_id="image-info")
            command = gr.Code(label="The same image with scripts/infer.py", language="shell", interactive=False,
                              lines=2, elem_id="image-command")

    n = len(slots)

    def run(*values, progress=gr.Progress()):  # noqa: B008 (gradio finds the bar by its default)
        refs, categories = list(values[:n]), [None if c in (None, NO_CATEGORY) else c for c in values[n:2 * n]]
        prompt_, h, w, steps_, g, s, fig = values[2 * n:]
        try:
            result = service.generate(refs, categories, prompt_, h, w, steps_, g, s, figure=bool(fig),
                                      progress=_reporter(progress))
        except Exception as err:
            raise _error(gr, err) from None
        figure_path = str(result.figure) if result.figure is not None else None
        return str(result.path), figure_path, str(result.path), _summary(result, "Image"), result.command

    button.click(run, inputs=[*slots, *cats, prompt, height, width, steps, guidance, seed, figure],
                 outputs=[image, attention, download, info, command], concurrency_limit=1, concurrency_id="image")
    examples = []
    for pairs, text in IMAGE_EXAMPLES:
        if len(pairs) > n or not all((EXAMPLES_DIR / name).is_file() for name, _ in pairs):
            continue
        if service.needs_categories and any(cat == NO_CATEGORY for _, cat in pairs):
            continue
        padded = list(pairs) + [(None, choices[0])] * (n - len(pairs))
        examples.append([*(str(EXAMPLES_DIR / name) if name else None for name, _ in padded),
                         *(cat for _, cat in padded), text])
    if examples:
        gr.Examples(examples, inputs=[*slots, *cats, prompt],
                    label="Examples (the built-in toy model's references and prompts)")


def build_demo(video: VideoService | None = None, image: ImageService | None = None):
    """The gr.Blocks of the app, with a tab for each service given; its queue runs one request at a
    time per model."""
    from idcrafter.utils.deps import require

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage reports from a local demo
    gr = require("gradio")
    with gr.Blocks(title="ID-Crafter: multi-subject video and image customization", analytics_enabled=False) as demo:
        gr.Markdown("# Multi-subject customization\nGive one reference image per subject and a prompt; every "
                    "subject keeps its identity in the result. The built-in toy models draw toy sprites "
                    "like the example references, not people: pass real weights with `--model`.")
        if video is not None:
            with gr.Tab("Video (ID-Crafter)", id="video"):
                gr.Markdown(f"Model: `{video.model.model or 'built-in ' + video.config.preset}`"
                            + (f", adapter `{video.model.adapter}`" if video.model.adapter else ""))
                _video_tab(gr, video)
        if image is not None:
            with gr.Tab("Image (MultiCrafter / One-for-All)", id="image"):
                gr.Markdown(f"Model: `{image.model.model or 'built-in'}` ({image.config.preset})"
                            + (f", adapter `{image.model.adapter}`" if image.model.adapter else ""))
                _image_tab(gr, image)
    demo.queue(default_concurrency_limit=1)
    return demo
