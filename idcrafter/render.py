"""Batch rendering: job files, sharding over ranks, resumable crash-safe outputs, summaries.

A job file is JSONL, one job a line (blank lines are skipped; paths are relative to the file)::

    {"prompt": "a man and his dog on a beach", "refs": ["refs/man.png", "refs/dog.png"],
     "output": "beach/0001.mp4", "seed": 7, "size": [480, 832], "frames": 81,
     "negative_prompt": "blurry", "steps": 50, "guidance_image": 2.5, "guidance_text": 2.5,
     "mode": "video", "categories": ["person", "dog"]}

Required: `prompt`, `refs` (at least one existing file), `output` (a name inside the output root, with a
video suffix for `mode: "video"` or an image suffix for `mode: "image"`). Optional fields left out are
`None` on the `Job` (the pipeline's own defaults apply), except `seed` (0) and `mode` ("image" when
`output` has an image suffix, else "video").

Image jobs (MultiCrafter / One-for-All) take `categories` from the category table (face, upper,
lower, bag), may mark item descriptors in the prompt (`<face>with short hair</face>`, naming one of
the job's categories), and use `guidance_text` as FLUX's guidance scale; `frames` and
`guidance_image` are video-only.

The renderer is a callable `render_fn(job, tmp_path)` that writes the finished output to `tmp_path`
(a temporary name next to the final one, same suffix). Only when it returns is the file renamed to
its final name, so a crash never leaves a file that looks finished, and a rerun skips exactly the
outputs that exist. Every rank renders `shard(jobs, rank, world_size)` and writes its own summary;
`merge_summaries` combines them.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from idcrafter.utils.cli import InputError
from idcrafter.utils.io import atomic_write
from idcrafter.utils.jsonl import read_jsonl
from idcrafter.utils.logging import get_logger

__all__ = [
    "IMAGE_SUFFIXES",
    "JOB_KEYS",
    "VIDEO_SUFFIXES",
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
    "guidance_image", "guidance_text", "mode", "categories",
)
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".gif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_MODES = {"video": VIDEO_SUFFIXES, "image": IMAGE_SUFFIXES}
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
    suffixes = _MODES.get(mode)
    if suffixes is not None and Path(norm).suffix.lower() not in suffixes:
        return f"output {output!r} must end in one of {', '.join(suffixes)} for a {mode} job"
    return None


def _image_problems(record: Mapping, prompt: str | None, categories) -> list[str]:
    """Image-job checks that need no model: categories in the table, markup naming them, no video keys."""
    from idcrafter.core.positions import canonical_category, parse_descriptor_markup

    problems = []
    if record.get("guidance_image") is not None:
        problems.append("'guidance_image' is a video key; image jobs use 'guidance_text' as the FLUX guidance")
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
    mode: str = "video"
    categories: tuple[str, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "refs", tuple(Path(r) for r in self.refs))
        if self.size is not None:
            object.__setattr__(self, "size", tuple(self.size))
        if self.categories is not None:
            object.__setattr__(self, "categories", tuple(self.categories))
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
        frames = record.get("frames")
        if _is_int(frames) and frames >= 1 and mode is not None:
            problems.append(_frames_problem(frames, mode))

        for key in ("guidance_image", "guidance_text"):
            value = record.get(key)
            if value is not None and (not _is_number(value) or value < 0):
                problems.append(f"'{key}' must be a non-negative number, got {json.dumps(value)}")

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
    for number, record, problem in read_jsonl(path, "job file"):
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
    skipped: list[str] = field(default_factory=list)  # already finished by an earlier run
    failed: list[JobFailure] = field(default_factory=list)
    invalid: list[JobError] = field(default_factory=list)  # bad lines of the job file
    missing_ranks: list[int] = field(default_factory=list)  # merged only: ranks without a summary
    removed_temps: int = 0  # leftovers of crashed writes deleted at start
    seconds: float = 0.0

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
    merged = Summary(world_size=world, ranks=sorted(parts), missing_ranks=sorted(set(range(world)) - set(parts)))
    invalid: dict[tuple[int, str], JobError] = {}
    for rank in sorted(parts):
        part = parts[rank]
        merged.jobs += part.jobs
        merged.rendered += part.rendered
        merged.skipped += part.skipped
        merged.failed += part.failed
        merged.removed_temps += part.removed_temps
        merged.seconds = max(merged.seconds, part.seconds)  # ranks run side by side
        for error in part.invalid:  # every rank sees the whole job file
            invalid.setdefault((error.line, error.message), error)
    merged.failed.sort(key=lambda f: f.line)
    merged.invalid = sorted(invalid.values(), key=lambda e: e.line)
    merged.write(out_dir / "summary.json")
    return merged


# ------------------------------------------------------------------------------------------ render


def _stale_temps(final: Path) -> list[Path]:
    """Temporary files `atomic_write` made for `final` (`.{stem}.XXXXXXXX.tmp{suffix}`) and left behind."""
    if not final.parent.is_dir():
        return []
    # tempfile's random part is 8 characters of [a-z0-9_]: no other output's temp name can match
    pattern = re.compile(rf"^\.{re.escape(final.stem)}\.[a-z0-9_]{{8}}\.tmp{re.escape(final.suffix)}$")
    return [p for p in final.parent.iterdir() if pattern.match(p.name) and p.is_file()]


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
    only when the call returns. Outputs that already exist are skipped; leftovers of crashed writes
    for this share are deleted first. `errors` (bad job-file lines) are carried into the summary,
    which is written atomically to `summary_path` (default `summary_path_for(out_dir, rank, world_size)`).
    """
    from tqdm.auto import tqdm

    duplicates = sorted(name for name, n in Counter(job.output for job in jobs).items() if n > 1)
    if duplicates:
        raise InputError(f"several jobs write the same output: {', '.join(duplicates)}")
    mine = shard(jobs, rank, world_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = Summary(world_size=world_size, ranks=[rank], jobs=len(mine), invalid=list(errors))
    start = time.perf_counter()

    targets: list[tuple[Job, Path]] = []
    for job in mine:
        try:
            targets.append((job, job.output_path(out_dir)))
        except InputError as exc:
            summary.failed.append(JobFailure(job.line, job.output, str(exc)))
    for _, final in targets:
        for stale in _stale_temps(final):
            stale.unlink(missing_ok=True)
            summary.removed_temps += 1
    if summary.removed_temps:
        logger.info("rank %d: removed %d temporary files left by an earlier crash", rank, summary.removed_temps)

    bar = tqdm(targets, desc="render", unit="job", disable=not progress or rank != 0)
    for job, final in bar:
        if final.is_file():
            summary.skipped.append(job.output)
            continue
        try:
            if final.exists():
                raise FileExistsError(f"{final} exists and is not a file")
            with atomic_write(final) as tmp:
                render_fn(job, tmp)
                # mkstemp created the file empty: a renderer that wrote nothing must not "finish"
                if not tmp.is_file() or tmp.stat().st_size == 0:
                    raise RuntimeError("the renderer wrote nothing to the temporary output")
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            logger.warning("line %d (%s) failed: %s", job.line, job.output, message)
            logger.debug("".join(traceback.format_exception(exc)))
            summary.failed.append(JobFailure(job.line, job.output, message))
        else:
            summary.rendered.append(job.output)
        bar.set_postfix(done=len(summary.rendered), skipped=len(summary.skipped), failed=len(summary.failed))
    bar.close()

    summary.seconds = round(time.perf_counter() - start, 3)
    summary.write(summary_path if summary_path is not None else summary_path_for(out_dir, rank, world_size))
    return summary
