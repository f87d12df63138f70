"""Running a curation over many input videos (docs/design.md 8.1): inputs, shards, resumption.

    inputs = list_inputs(["raw/", "more/*.mp4", "list.txt"])
    curator = Curator(resolve_settings("idcrafter-video"), device="cuda:0")
    curator.run(inputs, "curated/", shard=(rank, world))

Inputs go through the stages in groups (`group` inputs at a time, so a model stage batches the
candidates of several videos), then each input's samples are written and its record
`records/KEY.json` (its manifest lines, funnel counts and drops) is written atomically as the
input's last act. A rerun skips every input whose record exists (for the same settings), so a run
killed at any point loses at most the group in flight and never doubles an input: media files are
rewritten under the same names, and the manifest is assembled from the records alone. At the end
`manifest.jsonl`, `report.json` and `funnel.png` are rebuilt from the records of all inputs, sorted
by sample id, so the manifest does not depend on the order, the sharding or the interruptions of
the runs that made it (after an array job, a last run over the same inputs assembles the shards'
records).

A bad input never stops the run: stages drop what they cannot use, and an exception raised
inside a stage is retried input by input; the candidates of the input it still fails on are
dropped there with the reason "error (ExceptionType)" (its traceback goes to the log).
"""

from __future__ import annotations

import glob
import hashlib
import inspect
import json
import os
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from idcrafter.curate.core import BACKENDS, Candidate, Dropped, Funnel, Stage, make_backend, make_stage
from idcrafter.curate.probe import input_key
from idcrafter.curate.write import SampleError, write_report, write_samples
from idcrafter.data.manifest import VIDEO_EXTENSIONS
from idcrafter.utils.io import atomic_write
from idcrafter.utils.logging import get_logger

__all__ = ["Curator", "assemble", "build_backends", "build_stages", "list_inputs", "parse_shard", "settings_hash",
           "shard_from_env", "shard_inputs"]

logger = get_logger(__name__)
_GLOB_CHARS = set("*?[")
# Run-level values a stage receives when its constructor has a parameter of that name.
_INJECTED = ("categories", "kind", *BACKENDS)


# --------------------------------------------------------------------------------------- inputs


def _videos_in(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())


def list_inputs(specs: Iterable[str | os.PathLike]) -> list[str]:
    """Input videos from folders (every video file below, by extension), glob patterns, list files
    (one path a line, relative to the list's folder; blank lines and # comments skipped) or video
    paths; absolute, in order, each once. ValueError naming a spec that exists as nothing or
    matches nothing."""
    found: list[str] = []
    for spec in specs:
        text = os.fspath(spec)
        path = Path(text)
        if path.is_dir():
            hits = _videos_in(path)
        elif _GLOB_CHARS & set(text) and not path.exists():
            hits = sorted(p for p in glob.glob(text, recursive=True) if os.path.isfile(p))
        elif path.is_file() and path.suffix.lower() not in VIDEO_EXTENSIONS and path.suffix.lower() in (".txt", ".lst", ".list"):
            lines = path.read_text(encoding="utf-8").splitlines()
            hits = [str(path.parent / line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]
        elif path.exists() or os.path.lexists(path):
            hits = [text]  # a video (or a file that claims to be one: the probe decides)
        else:
            raise ValueError(f"input {text} does not exist")
        if not hits:
            raise ValueError(f"input {text} holds or matches no video ({', '.join(sorted(VIDEO_EXTENSIONS))})")
        found += [os.path.abspath(h) for h in hits]
    return list(dict.fromkeys(found))


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' (0 <= i < n) -> (i, n); ValueError otherwise."""
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"shard {text!r}: expected i/n, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {text}: need 0 <= i < n")
    return index, count


def shard_from_env(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(index, count) from the launcher: RANK / WORLD_SIZE (torchrun, the deepspeed launcher), else
    a SLURM job array (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN of SLURM_ARRAY_TASK_COUNT), else (0, 1)."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env:
        return parse_shard(f"{env.get('RANK', '0')}/{env['WORLD_SIZE']}")
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        return parse_shard(f"{index}/{env['SLURM_ARRAY_TASK_COUNT']}")
    return 0, 1


def shard_inputs(inputs: Sequence[str], index: int, count: int) -> list[str]:
    """Shard `index` of `count`: every count-th input from `index` (each input in exactly one shard)."""
    return list(inputs[index::count])


# ----------------------------------------------------------------------------- stages, backends


def _accepts(cls, name: str) -> bool:
    params = inspect.signature(cls.__init__).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _check_options(target, options: Mapping[str, Any], what: str) -> None:
    """ValueError naming the first of `options` that `target` (a class's constructor, or a function) does not take."""
    params = inspect.signature(target.__init__ if isinstance(target, type) else target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    known = [n for n in params if n != "self"]
    for name in options:
        if name not in params:
            raise ValueError(f"{what} has no option {name!r} (its options: {', '.join(known) or 'none'})")


def build_backends(settings: Mapping[str, Any], kinds: Iterable[str], device: str = "cpu") -> dict[str, Any]:
    """The backends of `kinds` as `settings["backends"]` names them; `device` is passed to those
    that take it; options set to None mean the backend's default and are left out."""
    from idcrafter.curate.core import _load

    built = {}
    for kind in kinds:
        spec = dict(settings["backends"].get(kind) or {})
        name = spec.pop("name", None)
        if name is None:
            raise ValueError(f"backends.{kind} names no backend")
        if name not in BACKENDS[kind]:
            raise ValueError(f"unknown {kind} backend {name!r}; known: {', '.join(BACKENDS[kind])}")
        cls = _load(BACKENDS[kind][name])
        options = {k: v for k, v in spec.items() if v is not None}
        _check_options(cls, options, f"{kind} backend {name}")
        if _accepts(cls, "device"):
            options.setdefault("device", device)
        built[kind] = make_backend(kind, name, **options)
    return built


def build_stages(settings: Mapping[str, Any], device: str = "cpu") -> list[Stage]:
    """The settings' stages in order, each built with its options plus the run-level values its
    constructor takes (categories, kind, and the backends: detector, segmenter, verifier,
    captioner); ValueError for an unknown stage or option. Backends load their models lazily."""
    from idcrafter.curate.core import STAGES, _load

    classes = []
    for entry in settings["stages"]:
        if entry["name"] not in STAGES:
            raise ValueError(f"unknown curation stage {entry['name']!r}; known: {', '.join(STAGES)}")
        cls = _load(STAGES[entry["name"]])
        _check_options(cls, entry["options"], f"stage {entry['name']}")
        classes.append((entry, cls))
    needed = [kind for kind in BACKENDS if any(_accepts(cls, kind) for _, cls in classes)]
    backends = build_backends(settings, needed, device)
    run_level = {"categories": dict(settings["categories"]), "kind": settings["kind"], **backends}
    stages = []
    for entry, cls in classes:
        extra = {k: run_level[k] for k in _INJECTED if k in run_level and k not in entry["options"] and _accepts(cls, k)}
        stage = make_stage(entry["name"], **entry["options"], **extra)
        stage.device = device
        stages.append(stage)
    return stages


def settings_hash(settings: Mapping[str, Any]) -> str:
    """A short hash of the settings (what a record was made with: a rerun with other settings redoes
    it); the preset and backend names are labels, what they resolved to is hashed."""
    content = {k: v for k, v in settings.items() if k not in ("preset", "backend")}
    return hashlib.sha1(json.dumps(content, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:12]


# --------------------------------------------------------------------------------------- running


def _source(item: Candidate | Dropped | str) -> str:
    if isinstance(item, Dropped):
        item = item.item
    return item.source if isinstance(item, Candidate) else str(item)


def _drop_row(drop: Dropped) -> dict[str, Any]:
    item = drop.item
    key = item.key if isinstance(item, Candidate) else None
    return {"source": _source(drop), "key": key, "stage": drop.stage, "reason": drop.reason}


def _split_counts(stage: str, items: list[Candidate], kept: list[Candidate], drops: list[Dropped], seconds: float,
                  funnels: dict[str, Funnel]) -> None:
    """Add one stage's outcome on a group of inputs to each input's own funnel (the time shared
    in proportion to the candidates each input brought)."""
    for source, funnel in funnels.items():
        n_in = sum(c.source == source for c in items)
        if n_in:
            funnel.add(stage, n_in, [c for c in kept if c.source == source],
                       [d for d in drops if _source(d) == source], seconds * n_in / len(items))


def _stage_on(stage: Stage, items: list[Candidate], funnels: dict[str, Funnel]) -> list[Candidate]:
    """One stage on the candidates of a group of inputs (batched together), counted per input. An
    exception inside the stage is retried input by input, so one bad input does not take the
    others with it; the input it still fails on loses its candidates there, as "error (Type)"."""
    started = time.perf_counter()
    seen = Funnel()
    try:
        kept = stage.run(items, seen)
    except Exception as err:  # a bad input (or a stage bug) must not stop the other inputs
        sources = list(dict.fromkeys(c.source for c in items))
        if len(sources) > 1:
            return [c for src in sources for c in _stage_on(stage, [c for c in items if c.source == src], funnels)]
        logger.warning("stage %s failed on %s: %s", stage.name, sources[0], traceback.format_exc(limit=4))
        drops = [Dropped(c, f"error ({type(err).__name__})", stage.name) for c in items]
        _split_counts(stage.name, items, [], drops, time.perf_counter() - started, funnels)
        return []
    _split_counts(stage.name, items, kept, seen.drops, time.perf_counter() - started, funnels)
    return kept


_OUTPUT_FOLDERS = ("videos", "images", "masks", "refs", "records")


def _remove_stale_temporaries(out: Path, key: str) -> None:
    """Delete the temporary files (`atomic_write`'s `.NAME.*.tmp*`) a killed run left for the input
    `key`: its files are named by its key, and only the process curating it writes them."""
    for folder in _OUTPUT_FOLDERS:
        for pattern in (f".{glob.escape(key)}-*.tmp*", f".{glob.escape(key)}.*.tmp*"):  # samples KEY-..., record KEY
            for path in (out / folder).glob(pattern):
                path.unlink(missing_ok=True)


class Curator:
    """The stages of `settings` (built once, models loaded on first use) and how a run writes.

    group: inputs that go through the stages together, so a model stage batches the candidates of
    several videos (its `batch_size`); each input still gets its own record and counts, and a kill
    loses at most the group in flight. The manifest does not depend on it.
    """

    def __init__(self, settings: Mapping[str, Any], device: str = "cpu", stages: Sequence[Stage] | None = None,
                 group: int = 1) -> None:
        if group < 1:
            raise ValueError(f"group must be >= 1, got {group}")
        self.settings = dict(settings)
        self.kind = settings["kind"]
        self.group = group
        self.write_options = dict(settings.get("write", {}))
        _check_options(write_samples, self.write_options, "write")
        self.stages = list(stages) if stages is not None else build_stages(settings, device)
        self.hash = settings_hash(settings)

    def record_path(self, out: Path, source: str) -> Path:
        return out / "records" / f"{input_key(source)}.json"

    def finished(self, out: Path, source: str) -> bool:
        """Whether `source` has a record made with these settings (a torn or foreign one does not count)."""
        try:
            record = json.loads(self.record_path(out, source).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return record.get("settings") == self.hash and record.get("source") == source

    def _write(self, candidates: list[Candidate], out: Path) -> tuple[list[dict], list[Candidate], list[Dropped]]:
        lines, written, drops = [], [], []
        for candidate in candidates:
            try:
                lines += write_samples(candidate, self.kind, out, **self.write_options)
                written.append(candidate)
            except SampleError as err:
                drops.append(Dropped(candidate, str(err), "write"))
            except Exception as err:  # an unwritable candidate (odd frames, encoder trouble) is one drop
                logger.warning("writing %s failed: %s", candidate.key, traceback.format_exc(limit=4))
                drops.append(Dropped(candidate, f"error ({type(err).__name__})", "write"))
        return lines, written, drops

    def curate(self, sources: Sequence[str], out: Path) -> list[dict[str, Any]]:
        """A group of inputs through every stage and the writer; their records, each also written
        to records/KEY.json (the input's last act: its presence means the input is finished)."""
        sources = list(dict.fromkeys(sources))
        funnels = {source: Funnel() for source in sources}
        items = [Candidate(source=source, key=input_key(source), fps=0.0) for source in sources]
        for stage in self.stages:
            items = _stage_on(stage, items, funnels)
            if not items:
                break
        records = []
        for source in sources:
            _remove_stale_temporaries(out, input_key(source))
            mine = [c for c in items if c.source == source]
            started = time.perf_counter()
            lines, written, drops = self._write(mine, out)
            funnel = funnels[source]
            if mine:
                funnel.add("write", len(mine), written, drops, time.perf_counter() - started)
            record = {"source": source, "key": input_key(source), "settings": self.hash, "samples": lines,
                      "funnel": funnel.as_dict(), "drops": [_drop_row(d) for d in funnel.drops]}
            with atomic_write(self.record_path(out, source)) as tmp:
                tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
            records.append(record)
        return records

    def run(self, inputs: Sequence[str], out: str | Path, shard: tuple[int, int] = (0, 1), progress: bool = True) -> dict[str, Any]:
        """Curate this shard's unfinished inputs into `out`, then assemble the folder's manifest and
        report; returns the report's summary."""
        from tqdm.auto import tqdm

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        mine = shard_inputs(inputs, *shard)
        todo = [s for s in mine if not self.finished(out, s)]
        logger.info("shard %d/%d: %d inputs, %d already finished", shard[0], shard[1], len(mine), len(mine) - len(todo))
        with tqdm(total=len(todo), desc="curate", unit="video", disable=not progress) as bar:
            for i in range(0, len(todo), self.group):
                group = todo[i:i + self.group]
                self.curate(group, out)
                bar.update(len(group))
        summary = assemble(out, inputs, self.hash, extra={"preset": self.settings.get("preset"),
                                                           "backend": self.settings.get("backend"), "kind": self.kind})
        for stage, row in summary["funnel"].items():
            rate = f"{row['in'] / row['seconds']:.2f}/s" if row["seconds"] > 0 else "-"
            logger.info("%-10s in %5d kept %5d  %8.2f s  %s", stage, row["in"], row["kept"], row["seconds"], rate)
        return summary


def assemble(out: str | Path, inputs: Sequence[str], settings: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """`out/manifest.jsonl`, `report.json` and `funnel.png` from the records of `inputs` made with
    the settings hash `settings`; the manifest lines sorted by sample id. Returns the report's
    summary (without the per-drop list)."""
    out = Path(out)
    funnel, lines, drops, finished = Funnel(), [], [], 0
    for source in inputs:
        try:
            record = json.loads((out / "records" / f"{input_key(source)}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if record.get("settings") != settings or record.get("source") != source:
            continue
        finished += 1
        funnel.merge(record["funnel"])
        lines += record["samples"]
        drops += record["drops"]
    lines.sort(key=lambda line: line["id"])
    drops.sort(key=lambda d: (d["source"], d["key"] or "", d["stage"]))
    with atomic_write(out / "manifest.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    from idcrafter.data.manifest import load_manifest

    _, errors = load_manifest(out / "manifest.jsonl")
    summary = {**(extra or {}), "inputs": len(inputs), "finished": finished, "samples": len(lines),
               "manifest_errors": [str(e) for e in errors], "funnel": funnel.as_dict()}
    write_report(out, summary["funnel"], drops, {k: v for k, v in summary.items() if k != "funnel"})
    return summary
