"""Batch rendering: job files, sharding over ranks, resumable crash-safe outputs, summaries.

A job file is JSONL, one job a line (blank lines are skipped; paths are relative to the file)::

    {"prompt": "a man and his dog on a beach", "refs": ["refs/man.png", "refs/dog.png"],
     "output": "beach/0001.mp4", "seed": 7, "size": [480, 832], "frames": 81,
     "negative_prompt": "blurry", "steps": 50, "guidance_image": 2.5, "guidance_text": 2.5,
     "guidance_interval": [0.2, 0.9],
     "mode": "video", "categories": ["person", "dog"]}

Required: `prompt`, `refs` (at least one existing file), `output` (a name inside the output root, with a
video suffix for `mode: "video"` or an image suffix for `mode: "image"`). Optional fields left out are
`None` on the `Job` (the pipeline's own defaults apply), except `seed` (0) and `mode` ("image" when
`output` has an image suffix, else "video").

Image jobs (MultiCrafter / One-for-All) take `categories` from the category table (face, upper,
lower, bag), may mark item descriptors in the prompt (`<face>with short hair</face>`, naming one of
the job's categories), and use `guidance_text` as FLUX's guidance scale; `frames`,
`guidance_image` and `guidance_interval` (the sigmas where the three guidance passes run,
`idcrafter.video.guidance`) are video-only.

The renderer is a callable `render_fn(job, tmp_path)` that writes the finished output to `tmp_path`
(same file name as the output, in this process's work folder). Only when it returns, and the file
decodes to the job's frame count and size, is it renamed to its final name, so a crash or a broken
encoder never leaves a file that looks finished, and a rerun skips exactly the outputs that exist.
Every rank renders `shard(jobs, rank, world_size)` and writes its own summary; `merge_summaries`
combines them.

Several processes may share an output root (ranks, or two runs started by hand). They coordinate in
`root/.render-work` (`WORK_DIR`, a name job outputs may not use) with advisory `flock` locks:

    lock                  held for a moment to join or leave the root: joining, cleaning and merging never interleave
    owners/<pid>-<rand>/  one per process on the root; its owner.lock is held for the process's life,
        owner.lock        so a lock that can be taken marks a dead process, whose folder the next one removes
        job/<name>        the output being rendered, and whatever the renderer writes next to it
    claims/<hash>.lock    held while one output is rendered: the others render something else and come
                          back to wait for it at the end (it is then finished, or theirs to retry)
    parts/<owner>.json    the summary of a process that finished while others were still running

Outputs are claimed one at a time rather than the whole root, so ranks and extra processes share the
work. A process's summary file (`summary.json`, or `summary.rank{r}.json` per rank) holds what it did,
merged with the parts of the processes that ran on the root at the same time and wrote the same
summary file: the last one to leave writes them all and removes the work folder, so a rerun started
after that reports only what the rerun did.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from idcrafter.utils.cli import MAX_GUIDANCE, MAX_SAMPLING_STEPS, InputError, user_file
from idcrafter.utils.io import atomic_write, publish_file
from idcrafter.utils.jsonl import read_jsonl
from idcrafter.utils.logging import get_logger

__all__ = [
    "IMAGE_SUFFIXES",
    "JOB_KEYS",
    "VIDEO_SUFFIXES",
    "WORK_DIR",
    "Job",
    "JobError",
    "JobFailure",
    "RenderFn",
    "Summary",
    "local_rank",
    "merge_summaries",
    "parse_jobs",
    "rank_and_world",
    "render_batch",
    "shard",
    "summary_path_for",
]

logger = get_logger(__name__)

JOB_KEYS = (
    "prompt", "refs", "output", "seed", "size", "frames", "negative_prompt", "steps",
    "guidance_image", "guidance_text", "guidance_interval", "mode", "categories",
)
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".gif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_MODES = {"video": VIDEO_SUFFIXES, "image": IMAGE_SUFFIXES}
WORK_DIR = ".render-work"  # under the output root: locks, temporary outputs, summary parts
_OWNER_LOCK = "owner.lock"
_SIZE_MULTIPLE = 16  # VAE /8 then 2x2 patches
_SIZE_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")
_RANK_SUMMARY_RE = re.compile(r"^summary\.rank(\d+)\.json$")

RenderFn = Callable[["Job", Path], object]


# --------------------------------------------------------------------------------------------- checks
# Each returns a problem description or None; `Job.__post_init__` and `Job.from_dict` share them.


def _frames_problem(frames: int | None, mode: str) -> str | None:
    if frames is None:
        return None
    if mode == "image":
        return None if frames == 1 else f"frames={frames} given for an image job (leave it out)"
    if frames < 1:
        return f"frames={frames} must be positive"
    if (frames - 1) % 4:
        return f"frames={frames} is not 4n+1 (e.g. {max(1, (frames - 1) // 4 * 4 + 1)} or {((frames - 1) // 4 + 1) * 4 + 1})"
    return None


def _size_problem(size: tuple[int, int] | None) -> str | None:
    if size is None:
        return None
    h, w = size
    if h <= 0 or w <= 0 or h % _SIZE_MULTIPLE or w % _SIZE_MULTIPLE:
        return f"size {h}x{w}: height and width must be positive multiples of {_SIZE_MULTIPLE}"
    return None


def _output_problem(output: str, mode: str) -> str | None:
    if not output:
        return "output is empty"
    if "\x00" in output:
        return f"output {output!r} contains a NUL character"
    if os.path.isabs(output):
        return f"output {output!r} is an absolute path; give a name relative to the output root"
    norm = os.path.normpath(output)
    if norm == os.curdir or norm == os.pardir or norm.startswith(os.pardir + os.sep):
        return f"output {output!r} escapes the output root"
    if _in_work_dir(norm):
        return f"output {output!r} is inside {WORK_DIR}, the folder where render_batch keeps its temporary files"
    suffixes = _MODES.get(mode)
    suffix = Path(norm).suffix.lower()
    if suffixes is not None and suffix not in suffixes:
        return f"output {output!r} must end in one of {', '.join(suffixes)} for a {mode} job"
    if suffixes is not None:
        from idcrafter.utils.media import image_suffix_problem, video_suffix_problem

        problem = (video_suffix_problem if mode == "video" else image_suffix_problem)(suffix)
        if problem:
            return f"output {output!r}: {problem}"
    return None


def _in_work_dir(relative: str) -> bool:
    """Whether a path relative to the output root lies in the work folder (compared without case,
    so a case-insensitive file system cannot alias it)."""
    parts = Path(relative).parts
    return bool(parts) and parts[0].casefold() == WORK_DIR.casefold()


def _image_problems(record: Mapping, prompt: str | None, categories) -> list[str]:
    """Image-job checks that need no model: categories in the table, markup naming them, no video keys."""
    from idcrafter.core.positions import canonical_category, parse_descriptor_markup

    problems = []
    if record.get("guidance_image") is not None:
        problems.append("'guidance_image' is a video key; image jobs use 'guidance_text' as the FLUX guidance")
    if record.get("guidance_interval") is not None:
        problems.append("'guidance_interval' is a video key (the three-pass guidance's interval)")
    canon: list[str] | None = None
    if isinstance(categories, list) and all(isinstance(c, str) for c in categories):
        canon = []
        for name in categories:
            try:
                canon.append(canonical_category(name))
            except ValueError as err:
                problems.append(f"'categories': {err}")
    if prompt is not None:
        try:
            _, spans = parse_descriptor_markup(prompt)
        except ValueError as err:
            problems.append(f"'prompt' descriptor markup: {err}")
            spans = []
        for span in spans:
            if canon is not None and span.category not in canon:
                problems.append(
                    f"'prompt' descriptor markup <{span.category}> names a category with no reference "
                    f"(categories: {', '.join(categories)})"
                )
    return problems


def _interval_value(value, problems: list[str]) -> tuple[float, float] | None:
    """A job's `guidance_interval` ([low, high] or "low,high") as (low, high); None with a problem
    added when it is not one (`idcrafter.video.guidance.as_interval` says why)."""
    from idcrafter.video.guidance import as_interval

    try:
        interval = as_interval(value)
    except (ValueError, TypeError) as err:
        problems.append(f"'guidance_interval': {err}")
        return None
    return interval.low, interval.high


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


# ---------------------------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class JobError:
    """One bad line of a job file (1-based line number)."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass(frozen=True)
class Job:
    """One render job, validated; `refs` are absolute paths, `output` is normalised and relative."""

    prompt: str
    refs: tuple[Path, ...]
    output: str
    line: int = 0
    seed: int = 0
    size: tuple[int, int] | None = None  # (H, W); None: the pipeline's default
    frames: int | None = None
    negative_prompt: str | None = None
    steps: int | None = None
    guidance_image: float | None = None
    guidance_text: float | None = None
    guidance_interval: tuple[float, float] | None = None  # (low, high) sigmas of the guidance passes
    mode: str = "video"
    categories: tuple[str, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "refs", tuple(Path(r) for r in self.refs))
        if self.size is not None:
            object.__setattr__(self, "size", tuple(self.size))
        if self.categories is not None:
            object.__setattr__(self, "categories", tuple(self.categories))
        if self.guidance_interval is not None:
            object.__setattr__(self, "guidance_interval", tuple(self.guidance_interval))
        problems = []
        if self.mode not in _MODES:
            problems.append(f"mode {self.mode!r} is not one of {', '.join(_MODES)}")
        problems += [
            _output_problem(self.output, self.mode),
            _frames_problem(self.frames, self.mode),
            _size_problem(self.size),
        ]
        if self.categories is not None and len(self.categories) != len(self.refs):
            problems.append(f"{len(self.categories)} categories for {len(self.refs)} refs")
        problems = [p for p in problems if p]
        if problems:
            raise InputError("; ".join(problems))
        object.__setattr__(self, "output", os.path.normpath(self.output))

    @classmethod
    def from_dict(cls, record: Mapping, base_dir: str | os.PathLike = ".", line: int = 0) -> Job:
        """Validate one decoded job-file record; raise `InputError` listing every problem found.

        `refs` are resolved against `base_dir` (the job file's folder) and must exist.
        """
        if not isinstance(record, Mapping):
            raise InputError(f"a job must be a JSON object, got {_type_name(record)}")
        problems: list[str] = []
        unknown = [k for k in record if k not in JOB_KEYS]
        if unknown:
            problems.append(
                ", ".join(f"unknown key {k!r}" for k in unknown) + f" (known: {', '.join(JOB_KEYS)})"
            )

        prompt = record.get("prompt")
        if "prompt" not in record:
            problems.append("missing 'prompt'")
        elif not isinstance(prompt, str):
            problems.append(f"'prompt' must be a string, got {_type_name(prompt)}")
        elif not prompt.strip():
            problems.append("'prompt' is empty")

        refs: list[Path] = []
        raw_refs = record.get("refs")
        if "refs" not in record:
            problems.append("missing 'refs'")
        elif not isinstance(raw_refs, list) or not all(isinstance(r, str) and r for r in raw_refs):
            problems.append(f"'refs' must be a list of file paths, got {json.dumps(raw_refs)[:80]}")
        elif not raw_refs:
            problems.append("'refs' is empty (give at least one reference image)")
        else:
            base = Path(os.path.abspath(base_dir))
            for ref in raw_refs:
                path = Path(os.path.normpath(base / ref))
                if not path.is_file():
                    problems.append(f"ref {ref!r} not found ({path})")
                refs.append(path)

        mode = record.get("mode")
        if mode is None:  # the output's suffix says what to render
            out = record.get("output")
            is_image = isinstance(out, str) and Path(out).suffix.lower() in IMAGE_SUFFIXES
            mode = "image" if is_image else "video"
        if mode not in _MODES:
            problems.append(f"'mode' {mode!r} is not one of {', '.join(map(repr, _MODES))}")
            mode = None

        output = record.get("output")
        if "output" not in record:
            problems.append("missing 'output'")
        elif not isinstance(output, str):
            problems.append(f"'output' must be a string, got {_type_name(output)}")
        elif mode is not None:
            problems.append(_output_problem(output, mode))

        seed = record.get("seed", 0)
        if not _is_int(seed) or not 0 <= seed < 2**64:
            problems.append(f"'seed' must be an integer in [0, 2**64), got {json.dumps(seed)}")

        size = record.get("size")
        if size is not None:
            match = _SIZE_RE.match(size) if isinstance(size, str) else None
            if match:
                size = (int(match[1]), int(match[2]))
            elif isinstance(size, list) and len(size) == 2 and all(_is_int(s) for s in size):
                size = (size[0], size[1])
            else:
                problems.append(f"'size' must be [H, W] or \"HxW\", got {json.dumps(size)}")
                size = None
            problems.append(_size_problem(size))

        for key in ("frames", "steps"):
            value = record.get(key)
            if value is not None and (not _is_int(value) or value < 1):
                problems.append(f"'{key}' must be a positive integer, got {json.dumps(value)}")
        steps = record.get("steps")
        if _is_int(steps) and steps > MAX_SAMPLING_STEPS:
            problems.append(f"'steps' must be at most {MAX_SAMPLING_STEPS}, got {steps}")
        frames = record.get("frames")
        if _is_int(frames) and frames >= 1 and mode is not None:
            problems.append(_frames_problem(frames, mode))

        for key in ("guidance_image", "guidance_text"):
            value = record.get(key)
            if value is not None and (not _is_number(value) or not 0 <= value <= MAX_GUIDANCE):
                problems.append(f"'{key}' must be a number in [0, {MAX_GUIDANCE:g}], got {json.dumps(value)}")

        interval = record.get("guidance_interval")
        if interval is not None:
            interval = _interval_value(interval, problems)

        negative = record.get("negative_prompt")
        if negative is not None and not isinstance(negative, str):
            problems.append(f"'negative_prompt' must be a string, got {_type_name(negative)}")

        categories = record.get("categories")
        if categories is not None:
            if not isinstance(categories, list) or not all(isinstance(c, str) and c.strip() for c in categories):
                problems.append(f"'categories' must be a list of names, got {json.dumps(categories)[:80]}")
            elif refs and len(categories) != len(refs):
                problems.append(f"{len(categories)} categories for {len(refs)} refs")
        if mode == "image":
            problems += _image_problems(record, prompt if isinstance(prompt, str) else None, categories)

        problems = [p for p in problems if p]
        if problems:
            raise InputError("; ".join(problems))
        return cls(
            prompt=prompt,
            refs=tuple(refs),
            output=output,
            line=line,
            seed=seed,
            size=size,
            frames=record.get("frames"),
            negative_prompt=negative,
            steps=record.get("steps"),
            guidance_image=None if record.get("guidance_image") is None else float(record["guidance_image"]),
            guidance_text=None if record.get("guidance_text") is None else float(record["guidance_text"]),
            guidance_interval=interval,
            mode=mode,
            categories=None if categories is None else tuple(categories),
        )

    def output_path(self, root: str | os.PathLike) -> Path:
        """The final output file under `root`, resolved; `InputError` if it lands outside `root`.

        Resolution follows symlinks, so a link inside the root that points elsewhere is rejected.
        """
        problem = _output_problem(self.output, self.mode)
        if problem:
            raise InputError(problem)
        try:
            root = Path(root).resolve()
            path = (root / self.output).resolve()
        except (OSError, RuntimeError) as exc:  # symlink loops: RuntimeError before 3.13, OSError after
            raise InputError(f"output {self.output!r}: cannot resolve it under {root} ({exc})") from None
        if path == root or not path.is_relative_to(root):
            raise InputError(f"output {self.output!r} resolves to {path}, outside the output root {root}")
        if _in_work_dir(str(path.relative_to(root))):
            raise InputError(f"output {self.output!r} resolves to {path}, inside {WORK_DIR}, render_batch's work folder")
        return path


def parse_jobs(
    path: str | os.PathLike, out_root: str | os.PathLike | None = None
) -> tuple[list[Job], list[JobError]]:
    """Read a JSONL job file: the valid jobs, and one `JobError` per bad line.

    With `out_root`, outputs are also resolved against it (symlinks included), so a job whose
    output would land outside the root is a bad line here rather than a failure later.
    A missing or unreadable file raises `InputError`.
    """
    path = Path(path)
    jobs: list[Job] = []
    errors: list[JobError] = []
    seen: dict[str, int] = {}
    with user_file():  # a job file that cannot be read at all: one line naming it
        lines = list(read_jsonl(path, "job file"))
    for number, record, problem in lines:
        if problem is not None:
            errors.append(JobError(number, problem))
            continue
        try:
            job = Job.from_dict(record, base_dir=path.parent, line=number)
            key = job.output if out_root is None else str(job.output_path(out_root))
        except InputError as exc:
            errors.append(JobError(number, str(exc)))
            continue
        if key in seen:
            errors.append(JobError(number, f"output {job.output!r} is already used by line {seen[key]}"))
            continue
        seen[key] = number
        jobs.append(job)
    return jobs, errors


# ------------------------------------------------------------------------------------------- ranks


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise InputError(f"environment variable {name}={value!r} is not an integer") from None


def rank_and_world(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(rank, world_size) from RANK / WORLD_SIZE as torchrun and deepspeed set them; (0, 1) alone.

    LOCAL_RANK stands in for RANK when only it is set (a single-node launcher).
    """
    env = os.environ if environ is None else environ
    world = _env_int(env, "WORLD_SIZE")
    rank = _env_int(env, "RANK")
    if rank is None:
        rank = _env_int(env, "LOCAL_RANK")
    world = 1 if world is None else world
    rank = 0 if rank is None else rank
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"RANK={rank} WORLD_SIZE={world}: need WORLD_SIZE >= 1 and 0 <= RANK < WORLD_SIZE")
    return rank, world


def local_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's index on its node (LOCAL_RANK, else 0): which GPU to use."""
    env = os.environ if environ is None else environ
    value = _env_int(env, "LOCAL_RANK")
    return 0 if value is None else value


def shard(jobs: Sequence[Job], rank: int, world_size: int) -> list[Job]:
    """Round-robin share of `rank`: jobs rank, rank + W, ...; shares are disjoint and cover all jobs."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: need world_size >= 1 and 0 <= rank < world_size")
    return list(jobs[rank::world_size])


# ----------------------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class JobFailure:
    """A valid job whose rendering raised (or whose output could not be placed)."""

    line: int
    output: str
    message: str


@dataclass
class Summary:
    """What one rank (or, merged, the whole run) did. Lists hold output names relative to the root."""

    world_size: int = 1
    ranks: list[int] = field(default_factory=lambda: [0])
    jobs: int = 0  # valid jobs in this share
    rendered: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # finished by an earlier run or another process
    failed: list[JobFailure] = field(default_factory=list)
    invalid: list[JobError] = field(default_factory=list)  # bad lines of the job file
    missing_ranks: list[int] = field(default_factory=list)  # merged only: ranks without a summary
    removed_temps: int = 0  # temporary files of dead processes deleted at start
    seconds: float = 0.0
    processes: int = 1  # processes whose results this holds (several when they shared the root at once)

    @property
    def ok(self) -> bool:
        """True when every line was valid, every job finished and every rank reported."""
        return not (self.failed or self.invalid or self.missing_ranks)

    def counts(self) -> dict[str, int]:
        return {
            "jobs": self.jobs,
            "rendered": len(self.rendered),
            "skipped": len(self.skipped),
            "failed": len(self.failed),
            "invalid": len(self.invalid),
        }

    def to_dict(self) -> dict:
        data = asdict(self)
        data["counts"] = self.counts()
        data["ok"] = self.ok
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> Summary:
        data = dict(data)
        data.pop("counts", None)
        data.pop("ok", None)
        data["failed"] = [JobFailure(**f) for f in data.get("failed", [])]
        data["invalid"] = [JobError(**e) for e in data.get("invalid", [])]
        return cls(**data)

    def write(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def summary_path_for(out_dir: str | os.PathLike, rank: int, world_size: int) -> Path:
    """`out_dir/summary.json` for a single process, `out_dir/summary.rank{r}.json` per rank otherwise."""
    name = "summary.json" if world_size == 1 else f"summary.rank{rank}.json"
    return Path(out_dir) / name


def merge_summaries(out_dir: str | os.PathLike, world_size: int | None = None) -> Summary:
    """Combine `summary.rank*.json` under `out_dir` into `summary.json` (written atomically).

    Ranks with no summary are listed in `missing_ranks` (so `ok` is False); summaries from runs
    with different world sizes, or none at all, raise `InputError`.
    """
    out_dir = Path(out_dir)
    parts: dict[int, Summary] = {}
    for path in sorted(out_dir.glob("summary.rank*.json")):
        match = _RANK_SUMMARY_RE.match(path.name)
        if not match:
            continue
        try:
            parts[int(match[1])] = Summary.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise InputError(f"{path}: not a rank summary ({exc})") from None
    if not parts:
        raise InputError(f"{out_dir}: no per-rank summaries (summary.rank*.json) to merge")
    sizes = {s.world_size for s in parts.values()} | ({world_size} if world_size else set())
    if len(sizes) != 1:
        raise InputError(f"{out_dir}: rank summaries disagree on the world size ({sorted(sizes)}); remove stale ones")
    world = sizes.pop()
    if any(r >= world for r in parts):
        raise InputError(f"{out_dir}: a rank summary has rank >= world size {world}; remove stale ones")
    merged = Summary(world_size=world, ranks=sorted(parts), missing_ranks=sorted(set(range(world)) - set(parts)),
                     processes=0)
    invalid: dict[tuple[int, str], JobError] = {}
    for rank in sorted(parts):
        part = parts[rank]
        merged.jobs += part.jobs
        merged.rendered += part.rendered
        merged.skipped += part.skipped
        merged.failed += part.failed
        merged.removed_temps += part.removed_temps
        merged.processes += part.processes
        merged.seconds = max(merged.seconds, part.seconds)  # ranks run side by side
        for error in part.invalid:  # every rank sees the whole job file
            invalid.setdefault((error.line, error.message), error)
    merged.failed.sort(key=lambda f: f.line)
    merged.invalid = sorted(invalid.values(), key=lambda e: e.line)
    merged.write(out_dir / "summary.json")
    return merged


# ------------------------------------------------------------------------------------- work folder


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def _lock(path: Path, blocking: bool = True) -> int | None:
    """An exclusive `flock` on `path` (created when missing): the open descriptor, or None when
    another process holds it and `blocking` is False. Closing the descriptor releases the lock,
    and the kernel releases it when the process dies, however it dies.

    Lock files are deleted by their holders (the last process out removes the work folder), so a
    lock won on a file that has lost its name is dropped and taken again on the file that has it.
    """
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except FileNotFoundError:  # the folder was removed between mkdir and open
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            return fd
        os.close(fd)


@contextlib.contextmanager
def _holding(path: Path):
    fd = _lock(path)
    try:
        yield
    finally:
        os.close(fd)


def _remove_tree(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)


def _sweep_owners(owners: Path) -> tuple[int, int]:
    """Remove the folders of dead processes under `owners` (their owner lock can be taken):
    (temporary files removed, live owners left). Only with the root lock held, so no process is
    between creating its folder and locking it."""
    removed = live = 0
    try:
        with os.scandir(owners) as it:
            entries = [(Path(e.path), e.is_dir(follow_symlinks=False)) for e in it]
    except FileNotFoundError:
        return 0, 0
    for path, is_dir in entries:
        if not is_dir:  # nothing render_batch makes here is a file
            path.unlink(missing_ok=True)
            continue
        fd = _lock(path / _OWNER_LOCK, blocking=False)
        if fd is None:
            live += 1
            continue
        try:
            removed += sum(len(files) for _, _, files in os.walk(path)) - 1  # the lock is no temp
            shutil.rmtree(path)
        finally:
            os.close(fd)
    return removed, live


def _read_parts(parts: Path, target: Path) -> list[Summary]:
    """Summary parts written for `target`, oldest process first."""
    found = []
    try:
        with os.scandir(parts) as it:
            names = [e.name for e in it if e.name.endswith(".json") and not e.name.startswith(".")]
    except FileNotFoundError:
        return []
    for name in names:
        data = json.loads((parts / name).read_text())
        if data["target"] == str(target):
            found.append((data["started"], name, Summary.from_dict(data["summary"])))
    return [summary for *_, summary in sorted(found, key=lambda f: f[:2])]


def _merge_parts(parts: Sequence[Summary]) -> Summary:
    """One summary for processes that shared the root at overlapping times and write the same
    summary file. Each output appears once: rendered when any of them rendered it, else failed when
    any failed it, else skipped (finished before they started, or by a process that died before
    reporting). A single part is returned as it is: a run alone reports exactly what it did."""
    if len(parts) == 1:
        return parts[0]
    rendered = list(dict.fromkeys(name for part in parts for name in part.rendered))
    done = set(rendered)
    failed: dict[str, JobFailure] = {}
    for failure in (f for part in parts for f in part.failed):
        if failure.output not in done:
            failed.setdefault(failure.output, failure)
    done |= failed.keys()
    skipped = [name for name in dict.fromkeys(n for part in parts for n in part.skipped) if name not in done]
    invalid: dict[tuple[int, str], JobError] = {}
    for error in (e for part in parts for e in part.invalid):
        invalid.setdefault((error.line, error.message), error)
    return Summary(
        world_size=parts[0].world_size,
        ranks=sorted({r for part in parts for r in part.ranks}),
        jobs=len(rendered) + len(failed) + len(skipped),
        rendered=rendered,
        skipped=skipped,
        failed=sorted(failed.values(), key=lambda f: f.line),
        invalid=sorted(invalid.values(), key=lambda e: e.line),
        missing_ranks=sorted({r for part in parts for r in part.missing_ranks}),
        removed_temps=sum(part.removed_temps for part in parts),
        seconds=max(part.seconds for part in parts),
        processes=sum(part.processes for part in parts),
    )


class _Workspace:
    """This process's place in `root/WORK_DIR` (layout in the module docstring), from joining the
    root to leaving it; leaving without `finish` (an exception) removes its folder and reports nothing."""

    def __init__(self, root: Path):
        self.work = root / WORK_DIR
        self.removed = 0
        self.dir: Path | None = None
        self._fd: int | None = None
        self.started = 0.0

    def __enter__(self) -> _Workspace:
        owners = self.work / "owners"
        with _holding(self.work / "lock"):
            self.removed, live = _sweep_owners(owners)
            if not live:  # alone on the root: what earlier processes left behind is nobody's now
                _remove_tree(self.work / "parts")
                _remove_tree(self.work / "claims")
            owners.mkdir(exist_ok=True)
            self.dir = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=owners))
            self._fd = _lock(self.dir / _OWNER_LOCK, blocking=False)
        self.started = time.time()
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            with _holding(self.work / "lock"):
                self._leave()

    def _leave(self) -> None:
        os.close(self._fd)
        self._fd = None
        _remove_tree(self.dir)

    def claim(self, root: Path, final: Path, blocking: bool) -> int | None:
        """Lock `final` for rendering (see `_lock`); None when another process has it."""
        key = hashlib.sha256(str(final.relative_to(root)).encode()).hexdigest()[:32]
        return _lock(self.work / "claims" / f"{key}.lock", blocking)

    def job_path(self, final: Path) -> Path:
        """A fresh, empty folder for one job; the renderer writes the output under its final name there."""
        folder = self.dir / "job"
        _remove_tree(folder)
        folder.mkdir()
        return folder / final.name

    def clear_job(self) -> None:
        _remove_tree(self.dir / "job")

    def finish(self, summary: Summary, target: Path) -> Summary:
        """Leave the root: write `summary` merged with the parts of the processes that ran beside
        this one into `target`; the last process out removes the work folder, closing the group."""
        target = target.resolve()
        with _holding(self.work / "lock"):
            part = {"target": str(target), "started": self.started, "summary": summary.to_dict()}
            with atomic_write(self.work / "parts" / f"{self.dir.name}.json") as tmp:
                tmp.write_text(json.dumps(part) + "\n")
            self._leave()
            _, live = _sweep_owners(self.work / "owners")
            merged = _merge_parts(_read_parts(self.work / "parts", target))
            merged.write(target)
            if not live:
                _remove_tree(self.work)
        return merged


# ------------------------------------------------------------------------------------------ render


def _finished_files(folders: Iterable[Path]) -> set[Path]:
    """The regular files (or links to them) in `folders`: one listing per folder, however many jobs."""
    found: set[Path] = set()
    for folder in folders:
        try:
            with os.scandir(folder) as it:
                found.update(folder / e.name for e in it if e.is_file())
        except (FileNotFoundError, NotADirectoryError):
            continue
    return found


def _check_output(job: Job, tmp: Path) -> None:
    """The renderer's file must decode to what the job asked for before it takes its final name:
    a file that exists but does not play would count as finished and be skipped on every rerun."""
    from idcrafter.utils.media import verify_image, verify_video

    if not tmp.is_file() or tmp.stat().st_size == 0:
        raise RuntimeError("the renderer wrote nothing to the temporary output")
    if job.mode == "video":
        verify_video(tmp, frames=job.frames, size=job.size)
    else:
        verify_image(tmp, size=job.size)


def _render_one(job: Job, final: Path, render_fn: RenderFn, ws: _Workspace) -> bool:
    """Render a claimed job into `final` through the work folder: True when rendered, False when
    another process finished it first. Raises what the renderer or the output check raised."""
    if final.is_file():
        return False
    if final.exists():
        raise FileExistsError(f"{final} exists and is not a file")
    tmp = ws.job_path(final)
    try:
        render_fn(job, tmp)
        _check_output(job, tmp)
        publish_file(tmp, final)
    finally:
        ws.clear_job()
    return True


def render_batch(
    jobs: Sequence[Job],
    out_dir: str | os.PathLike,
    render_fn: RenderFn,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    summary_path: str | os.PathLike | None = None,
    errors: Iterable[JobError] = (),
) -> Summary:
    """Render this rank's share of `jobs` into `out_dir`; resumable, one failure does not stop the rest.

    `render_fn(job, tmp_path)` writes the output to `tmp_path`; it becomes `job.output_path(out_dir)`
    only when the call returns and the file decodes to the job's frames and size. Outputs that
    already exist are skipped (the output folders are listed once, not per job); outputs another
    process is rendering are left to it and waited for at the end. `errors` (bad job-file lines)
    are carried into the summary. Returns what this process did; the file at `summary_path`
    (default `summary_path_for(out_dir, rank, world_size)`) also holds the results of processes
    that shared the root at the same time (module docstring).
    """
    from tqdm.auto import tqdm

    duplicates = sorted(name for name, n in Counter(job.output for job in jobs).items() if n > 1)
    if duplicates:
        raise InputError(f"several jobs write the same output: {', '.join(duplicates)}")
    mine = shard(jobs, rank, world_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = out_dir.resolve()
    target = Path(summary_path) if summary_path is not None else summary_path_for(out_dir, rank, world_size)
    summary = Summary(world_size=world_size, ranks=[rank], jobs=len(mine), invalid=list(errors))
    start = time.perf_counter()

    targets: list[tuple[Job, Path]] = []
    for job in mine:
        try:
            targets.append((job, job.output_path(root)))
        except InputError as exc:
            summary.failed.append(JobFailure(job.line, job.output, str(exc)))
    finished = _finished_files({final.parent for _, final in targets})
    todo = []
    for job, final in targets:
        if final in finished:
            summary.skipped.append(job.output)
        else:
            todo.append((job, final))

    with _Workspace(root) as ws:
        summary.removed_temps = ws.removed
        if ws.removed:
            logger.info("rank %d: removed %d temporary files of dead processes", rank, ws.removed)
        bar = tqdm(total=len(todo), desc="render", unit="job", disable=not progress or rank != 0)
        waiting = []
        for job, final in todo:
            claim = ws.claim(root, final, blocking=False)
            if claim is None:  # another process is rendering it: do the rest first
                waiting.append((job, final))
                continue
            _run_claimed(job, final, claim, render_fn, ws, summary)
            bar.update()
            bar.set_postfix(done=len(summary.rendered), skipped=len(summary.skipped), failed=len(summary.failed))
        for job, final in waiting:
            _run_claimed(job, final, ws.claim(root, final, blocking=True), render_fn, ws, summary)
            bar.update()
        bar.close()
        summary.failed.sort(key=lambda f: f.line)
        summary.seconds = round(time.perf_counter() - start, 3)
        ws.finish(summary, target)
    return summary


def _run_claimed(job: Job, final: Path, claim: int, render_fn: RenderFn, ws: _Workspace, summary: Summary) -> None:
    """Render one claimed job and record the outcome; any exception fails this job only."""
    try:
        rendered = _render_one(job, final, render_fn, ws)
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}"
        logger.warning("line %d (%s) failed: %s", job.line, job.output, message)
        logger.debug("".join(traceback.format_exception(exc)))
        summary.failed.append(JobFailure(job.line, job.output, message))
    else:
        (summary.rendered if rendered else summary.skipped).append(job.output)
    finally:
        os.close(claim)
