"""What the web demo does, without the web: one loaded pipeline per model, requests checked by the
same validation as `scripts/infer.py`, outputs written to a run folder with the command that
reproduces them.

    video = VideoService(DemoModel())                      # the built-in toy-world model
    result = video.generate(["a.png", "b.png"], "two objects: ...", seed=3)
    result.path, result.command                             # runs/.../video.mp4, "python scripts/infer.py ..."

Every request gets its own folder under `work_dir` (`0001-video/`) holding copies of its references,
named after the uploads, and the output; the printed command names those copies, so it runs as long
as the folder exists. Bad input raises `InputError` with a message written for the page
(`page_message`): the flags of `scripts/infer.py` become the labels of the form's fields.
"""

from __future__ import annotations

import abc
import contextlib
import itertools
import math
import re
import shlex
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from idcrafter.utils.cli import InputError, user_file

__all__ = [
    "DemoModel",
    "DemoResult",
    "ImageService",
    "VideoService",
    "command_line",
    "page_message",
]

# How a step reaches the page: progress(done_steps, total_steps, what).
Progress = Callable[[int, int, str], None]

# Flags of scripts/infer.py -> the field labels of the page, for messages shown there.
FIELD_LABELS = {
    "--refs": "References",
    "--prompt": "Prompt",
    "--negative-prompt": "Negative prompt",
    "--categories": "Categories",
    "--size": "Height x width",
    "--frames": "Frames",
    "--steps": "Steps",
    "--guidance-image": "Image guidance",
    "--guidance-text": "Text guidance",
    "--guidance": "Guidance",
    "--seed": "Seed",
}
_FLAG_RE = re.compile("|".join(sorted(map(re.escape, FIELD_LABELS), key=len, reverse=True)) + r"(?![\w-])")


def page_message(err: Exception, folder: Path | None = None) -> str:
    """One line for the page: the first line of `err` with the command-line flags turned into field
    labels and the request folder's paths cut to file names."""
    message = str(err).splitlines()[0] if str(err) else err.__class__.__name__
    if folder is not None:
        message = message.replace(f"{folder}/", "")
    return _FLAG_RE.sub(lambda m: FIELD_LABELS[m.group(0)], message)


def command_line(args: Sequence[tuple[str, object]], script: str = "scripts/infer.py") -> str:
    """`python SCRIPT --flag value ...` for the (flag, value) pairs whose value is not None; list
    values become several words, True a bare flag."""
    words = ["python", script]
    for flag, value in args:
        if value is None or value is False:
            continue
        words.append(flag)
        if isinstance(value, (list, tuple)):
            words.extend(str(v) for v in value)
        elif value is not True:
            words.append(str(value))
    return shlex.join(words)


@dataclass(frozen=True)
class DemoModel:
    """The model options of `scripts/infer.py` one tab runs: model / adapter folders, preset, VLM
    folder (video), device and dtype. All None: the built-in model of that mode."""

    model: str | None = None
    adapter: str | None = None
    preset: str | None = None
    vlm: str | None = None
    device: str = "cpu"
    dtype: str = "float32"

    def flags(self) -> list[tuple[str, object]]:
        """The command-line options that select this model (defaults left out)."""
        return [("--model", self.model), ("--adapter", self.adapter), ("--preset", self.preset),
                ("--vlm", self.vlm), ("--device", None if self.device == "cpu" else self.device),
                ("--dtype", None if self.dtype == "float32" else self.dtype)]


@dataclass
class DemoResult:
    """One finished request: the output file, the command that reproduces it, the settings it ran
    with (`scripts/infer.py --dry-run`'s plan), seconds from the request to the written file, and
    the attention-bleeding figure of an image request when asked for."""

    path: Path
    command: str
    settings: dict
    seconds: float
    figure: Path | None = None
    extra: dict = field(default_factory=dict)


class _Service(abc.ABC):
    """One model, its pipeline loaded once (`load`), requests one at a time (a lock: the page's
    queue already runs one per model, Python callers get the same guarantee)."""

    kind = ""

    def __init__(self, model: DemoModel, work_dir: str | Path | None = None):
        self.model = model
        self.work_dir = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="idcrafter-demo-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._counter = itertools.count(1)
        self._pipe = None
        self.config = self._check_model()  # bad folders fail here, before any page is served

    @abc.abstractmethod
    def _check_model(self):
        """The model's config, its folders and options checked (InputError naming the option)."""

    @abc.abstractmethod
    def _load(self):
        """The model's pipeline, ready to generate."""

    def load(self):
        """The pipeline, loaded on the first call (start-up calls it, so requests never wait for it)."""
        if self._pipe is None:
            self._pipe = self._load()
        return self._pipe

    def _request_folder(self) -> Path:
        while True:
            folder = self.work_dir / f"{next(self._counter):04d}-{self.kind}"
            try:
                folder.mkdir()
                return folder
            except FileExistsError:  # another process on the same work dir took the number
                continue

    @contextlib.contextmanager
    def _request(self):
        """A new request folder for the body, which copies the references and builds and validates
        the request there; on bad input the folder goes (nothing half-made stays behind) and the
        `InputError` carries the page's message."""
        folder = self._request_folder()
        try:
            yield folder
        except InputError as err:
            shutil.rmtree(folder, ignore_errors=True)
            raise InputError(page_message(err, folder)) from None

    def _pipeline(self, progress: Progress | None, steps: int):
        """The loaded pipeline, with the request's progress at step 0 of `steps` reported."""
        pipe = self.load()
        if progress is not None:
            progress(0, steps, "denoising")
        return pipe

    def _copy_refs(self, refs: Sequence[str | Path | None], folder: Path) -> list[str]:
        """Copies of the uploads in the request folder, named `k-<upload name>`; empty slots dropped.
        Unreadable images are refused later by the request's validation, which names the copy."""
        copies = []
        for ref in refs:
            if ref is None or ref == "":
                continue
            src = Path(ref)
            if not src.is_file():
                raise InputError(f"--refs: {src.name} is not an uploaded file")
            dst = folder / f"{len(copies) + 1}-{src.name}"
            shutil.copyfile(src, dst)
            copies.append(str(dst))
        if not copies:
            raise InputError("--refs: add at least one reference image")
        return copies


def _whole(value, flag: str, what: str = "") -> int | None:
    """A whole number from the form (64.0 is 64); None for an empty field. InputError naming `flag`
    for a fraction, a non-number, NaN or infinity."""
    if value in (None, ""):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number != int(number):
        raise InputError(f"{flag}: {what}must be a whole number, got {value!r}")
    return int(number)


def _size(height, width) -> str | None:
    """"HxW" from the form's two numbers (both empty: the model's default)."""
    if height in (None, "") and width in (None, ""):
        return None
    h, w = (_whole(v, "--size", f"the {name} ") for name, v in (("height", height), ("width", width)))
    if h is None or w is None:
        raise InputError("--size: give both the height and the width")
    return f"{h}x{w}"


def _step_callback(progress: Progress | None, total: int, what: str):
    """A diffusers `callback_on_step_end` that reports each finished step to `progress`."""

    def on_step_end(pipe, step, timestep, tensors):
        if progress is not None:
            progress(step + 1, total, what)
        return tensors

    return on_step_end


class VideoService(_Service):
    """ID-Crafter videos (Wan 2.1): `generate` is `scripts/infer.py` without the process start."""

    kind = "video"

    def _check_model(self):
        from idcrafter.utils.cli import check_device, check_dtype
        from idcrafter.video.infer import InferenceRequest, check_vlm, model_config

        m = self.model
        check_device(m.device)
        check_dtype(m.dtype)
        probe = InferenceRequest(refs=[], prompt="-", out="-.mp4", model=m.model, adapter=m.adapter, preset=m.preset,
                                 vlm=m.vlm, device=m.device, dtype=m.dtype)
        with user_file():
            config = model_config(probe)
            self.vlm_folder = check_vlm(m.vlm, config, m.adapter, m.model)  # --vlm, or the one the adapter recorded
        return config

    def defaults(self) -> dict:
        """The form's starting values: the model's own sampling defaults."""
        c = self.config
        return dict(height=c.height, width=c.width, frames=c.num_frames, steps=c.num_inference_steps,
                    guidance_image=c.guidance_image, guidance_text=c.guidance_text, max_subjects=c.max_subjects,
                    fps=c.fps)

    def _load(self):
        from idcrafter.video.infer import InferenceRequest, load_pipeline

        m = self.model
        req = InferenceRequest(refs=[], prompt="-", out="-.mp4", model=m.model, adapter=m.adapter, preset=m.preset,
                               vlm=self.vlm_folder, device=m.device, dtype=m.dtype)
        pipe = load_pipeline(req)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def generate(
        self,
        refs: Sequence[str | Path | None],
        prompt: str,
        negative_prompt: str = "",
        height=None,
        width=None,
        frames=None,
        steps=None,
        guidance_image=None,
        guidance_text=None,
        seed=0,
        progress: Progress | None = None,
    ) -> DemoResult:
        """Validate, generate and write one video; `InputError` (a page message) for bad input.

        refs: uploaded image paths (None entries skipped); the numbers None: the model's defaults.
        progress(done, total, what) is called after every denoising step.
        """
        import torch

        from idcrafter.utils.media import write_video
        from idcrafter.video.infer import InferenceRequest, validate

        start = time.perf_counter()
        with self._lock:
            with self._request() as folder:
                copies = self._copy_refs(refs, folder)
                m = self.model
                req = InferenceRequest(
                    refs=copies, prompt=prompt or "", out=str(folder / "video.mp4"), model=m.model, adapter=m.adapter,
                    preset=m.preset, negative_prompt=negative_prompt or "", steps=_whole(steps, "--steps"),
                    size=_size(height, width), frames=_whole(frames, "--frames"),
                    guidance_image=None if guidance_image in (None, "") else float(guidance_image),
                    guidance_text=None if guidance_text in (None, "") else float(guidance_text),
                    seed=_whole(seed, "--seed") or 0, device=m.device, dtype=m.dtype, vlm=m.vlm,
                )
                with user_file():
                    validate(req)
            r = req.resolved
            pipe = self._pipeline(progress, r["steps"])
            out = pipe(
                req.prompt, req.refs, negative_prompt=req.negative_prompt, height=r["height"], width=r["width"],
                num_frames=r["frames"], num_inference_steps=r["steps"], guidance_image=r["guidance_image"],
                guidance_text=r["guidance_text"], generator=torch.Generator().manual_seed(req.seed),
                callback_on_step_end=_step_callback(progress, r["steps"], "denoising"),
            )
            path = write_video(out.frames[0], req.out, fps=r["fps"])
            command = command_line([
                ("--refs", copies), ("--prompt", req.prompt), ("--negative-prompt", req.negative_prompt or None),
                ("--size", f"{r['height']}x{r['width']}"), ("--frames", r["frames"]), ("--steps", r["steps"]),
                ("--guidance-image", r["guidance_image"]), ("--guidance-text", r["guidance_text"]),
                ("--seed", req.seed), *m.flags(), ("--out", req.out),
            ])
            settings = dict(r, prompt=req.prompt, negative_prompt=req.negative_prompt, seed=req.seed,
                            refs=[Path(c).name for c in copies])
            return DemoResult(path=path, command=command, settings=settings, seconds=time.perf_counter() - start)


class ImageService(_Service):
    """MultiCrafter / One-for-All images (FLUX): `scripts/infer.py --mode image` without the process
    start, and optionally the attention-bleeding figure of the result (`mcimage.analysis`)."""

    kind = "image"

    def _probe(self, **kw):
        from mcimage.infer import ImageInferenceRequest

        m = self.model
        return ImageInferenceRequest(model=m.model, adapter=m.adapter, preset=m.preset, device=m.device,
                                     dtype=m.dtype, **kw)

    def _check_model(self):
        from idcrafter.utils.cli import check_device, check_dtype
        from mcimage.infer import model_config

        check_device(self.model.device)
        check_dtype(self.model.dtype)
        with user_file():
            return model_config(self._probe(refs=[], prompt="-", out="-.png"))

    @property
    def needs_categories(self) -> bool:
        """Whether every reference needs a category (One-for-All's condition position ids)."""
        return self.config.uses_categories

    def defaults(self) -> dict:
        from mcimage.infer import default_size

        height, width = default_size(self.config)
        c = self.config
        return dict(height=height, width=width, steps=c.num_inference_steps, guidance=c.guidance_scale,
                    max_subjects=c.max_subjects, preset=c.preset, ccpa=c.ccpa)

    def _load(self):
        from mcimage.infer import load_pipeline

        req = self._probe(refs=[], prompt="-", out="-.png")
        return load_pipeline(req, self.config)

    def generate(
        self,
        refs: Sequence[str | Path | None],
        categories: Sequence[str | None] | None,
        prompt: str,
        height=None,
        width=None,
        steps=None,
        guidance=None,
        seed=0,
        figure: bool = False,
        progress: Progress | None = None,
    ) -> DemoResult:
        """Validate, generate and write one image (and, with `figure`, the attention-bleeding figure).

        refs and categories: one entry per reference slot of the form, empty slots (no image)
        skipped with their category; no category anywhere means None (UNO ids). InputError (a page
        message) for bad input.
        """
        import torch

        from idcrafter.utils.media import write_image
        from mcimage.infer import validate

        start = time.perf_counter()
        categories = list(categories) if categories is not None else [None] * len(refs)
        if len(categories) != len(refs):
            raise InputError(f"--categories: {len(categories)} categories for {len(refs)} reference slots")
        kept = [(ref, cat or None) for ref, cat in zip(refs, categories) if ref not in (None, "")]
        cats = [c for _, c in kept]
        with self._lock:
            with self._request() as folder:
                copies = self._copy_refs([ref for ref, _ in kept], folder)
                if any(c is not None for c in cats) and None in cats:
                    missing = [str(k + 1) for k, c in enumerate(cats) if c is None]
                    raise InputError(f"--categories: reference {', '.join(missing)} has no category "
                                     "(give every reference one, or none)")
                req = self._probe(refs=copies, prompt=prompt or "", out=str(folder / "image.png"),
                                  categories=None if all(c is None for c in cats) else cats,
                                  size=_size(height, width), steps=_whole(steps, "--steps"),
                                  guidance=None if guidance in (None, "") else float(guidance),
                                  seed=_whole(seed, "--seed") or 0)
                with user_file():
                    validate(req)
            r = req.resolved
            pipe = self._pipeline(progress, r["steps"])
            out = pipe(
                req.prompt, refs=req.refs, categories=req.categories, height=r["height"], width=r["width"],
                num_inference_steps=r["steps"], guidance_scale=r["guidance"],
                generator=torch.Generator().manual_seed(req.seed), output_type="pil",
                callback_on_step_end=_step_callback(progress, r["steps"], "denoising"),
            )
            path = write_image(out.images[0], req.out)
            figure_path = self._figure(pipe, req, folder) if figure else None
            m = self.model
            command = command_line([
                ("--mode", "image"), ("--refs", copies), ("--categories", req.categories), ("--prompt", req.prompt),
                ("--size", f"{r['height']}x{r['width']}"), ("--steps", r["steps"]), ("--guidance", r["guidance"]),
                ("--seed", req.seed), *[(f, v) for f, v in m.flags() if f != "--vlm"], ("--out", req.out),
            ])
            settings = dict(r, prompt=req.prompt, seed=req.seed, categories=req.categories,
                            refs=[Path(c).name for c in copies])
            return DemoResult(path=path, command=command, settings=settings, seconds=time.perf_counter() - start,
                              figure=figure_path)

    def _figure(self, pipe, req, folder: Path) -> Path:
        """The attention-bleeding figure of the request: `mcimage.analysis` generates the image again at
        the same seed and steps (with the model's own guidance scale), re-noises it to t = 0.5 and reads
        each subject's share of the reference attention at every image token in one forward."""
        from mcimage.analysis import attention_figure, subject_attention_maps

        r = req.resolved
        att = subject_attention_maps(pipe, req.prompt, req.refs, req.categories, height=r["height"], width=r["width"],
                                     seed=req.seed, steps=r["steps"])
        titles = req.categories or [f"subject {k + 1}" for k in range(len(req.refs))]
        path = folder / "attention.png"
        attention_figure(att.image, req.refs, att.maps, path, titles=titles)
        return path
