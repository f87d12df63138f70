"""One evaluation run as `scripts/evaluate.py` does it: validate, load, score, write.

Inputs are validated (names, weights, options, manifest, every generated file and reference)
before any model loads; bad input raises `ConfigError` or `FileFormatError` (one line naming the
option; `idcrafter.cli.evaluate` turns them into exit code 2) and writes nothing. `--toyworld` renders
held-out toy-world samples with a model first, through the batch renderer in a separate process
(`render_toyworld`), then scores the files: no evaluation process imports a generator.

Two protocols (`--protocol`): `opens2v` (the default for a manifest of generated files) computes
OpenS2V-Eval's own columns and leaderboard totals (`idcrafter.eval.opens2v`); `legacy` the reward-based
columns and weighted total of `idcrafter.eval.metrics` (the default with --toyworld, --metrics,
--weights or a reward's --model-option, which name legacy columns). The report says which protocol produced it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from idcrafter.eval.inputs import KNOWN, build_rewards, load_items, parse_metrics, parse_model_options
from idcrafter.eval.metrics import BUILTIN_METRICS, COLUMNS, REWARD_METRICS, Report, check_weights, evaluate
from idcrafter.eval.motion import FLOW_METHODS
from idcrafter.eval.protocols import build_scorers, evaluate_protocol, model_options
from idcrafter.eval.report import write_report
from idcrafter.utils.errors import ConfigError, FileFormatError

__all__ = ["PROTOCOLS", "TOYWORLD_METRICS", "EvalRequest", "render_toyworld", "resolve_protocol", "run",
           "run_toyworld", "validate"]

TOYWORLD_METRICS = ("toyid", "motion")
PROTOCOLS = ("opens2v", "multicrafter", "one-for-all", "legacy")


@dataclass
class EvalRequest:
    out: str
    data: str | None = None
    videos: list[str] = field(default_factory=list)
    metrics: str | None = None
    model_options: list[str] = field(default_factory=list)
    weights: str | None = None
    device: str = "cpu"
    batch_size: int = 4
    flow: str = "lucas-kanade"
    examples: int = 8
    progress: bool = True
    toyworld: bool = False
    model: str | None = None
    samples: int = 8
    seed: int = 0
    steps: int | None = None
    protocol: str | None = None
    opens2v: str | None = None  # a published OpenS2V-Eval file instead of --data (videos: a folder of <id>.mp4)
    images_root: str | None = None
    cases: list[str] | None = None
    limit: int | None = None
    leaderboard: str = "v1.0"  # the OpenS2V leaderboard version whose weights make the totals


@dataclass
class _Checked:
    metrics: list[str]
    options: dict[str, dict[str, object]]
    weights: dict[str, float]
    protocol: str = "legacy"


def resolve_protocol(req: EvalRequest) -> str:
    """The protocol of a run: the one asked for, else `legacy` when --toyworld, --metrics, --weights or a
    --model-option of a reward is given (they name legacy columns), else `opens2v`. ConfigError for an unknown name or for
    `opens2v` combined with the legacy options."""
    # A name the asked protocol's column models take (multicrafter's "face") is that protocol's, not a reward's.
    own = model_options(req.protocol) if req.protocol in PROTOCOLS else ()
    reward_options = [spec for spec in req.model_options
                      if spec.partition(".")[0].strip() in REWARD_METRICS and spec.partition(".")[0].strip() not in own]
    legacy_options = [flag for flag, given in (("--toyworld", req.toyworld), ("--metrics", req.metrics is not None),
                                               ("--weights", req.weights is not None),
                                               (f"--model-option {reward_options[0] if reward_options else ''}",
                                                bool(reward_options))) if given]
    if req.protocol is None:
        return "legacy" if legacy_options else "opens2v"
    if req.protocol not in PROTOCOLS:
        raise ConfigError(f"--protocol {req.protocol!r}: known protocols are {', '.join(PROTOCOLS)}")
    if req.protocol != "legacy" and legacy_options:
        raise ConfigError(f"--protocol {req.protocol}: {legacy_options[0]} belongs to --protocol legacy "
                          "(a published protocol has fixed columns and weights)")
    return req.protocol


def validate(req: EvalRequest) -> _Checked:
    """Every argument that needs no file: names, options, weights, numbers, the output folder."""
    out = Path(req.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    protocol = resolve_protocol(req)
    if req.flow not in FLOW_METHODS:
        raise ConfigError(f"--flow {req.flow!r}: known methods are {', '.join(FLOW_METHODS)}")
    from idcrafter.eval.opens2v import VERSIONS

    if req.leaderboard not in VERSIONS:
        raise ConfigError(f"--leaderboard {req.leaderboard!r}: known versions are {', '.join(VERSIONS)}")
    if req.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {req.batch_size}")
    if req.examples < 0:
        raise ConfigError(f"--examples must be >= 0, got {req.examples}")
    metrics = parse_metrics(req.metrics if req.metrics is not None else (TOYWORLD_METRICS if req.toyworld else None), KNOWN)
    # A published protocol's models are options of its column models (aesthetics.clip=DIR, ...).
    options = parse_model_options(req.model_options, known=REWARD_METRICS if protocol == "legacy"
                                  else (*REWARD_METRICS, *model_options(protocol)))
    weights = check_weights(req.weights)
    if req.toyworld:
        if req.data or req.videos or req.opens2v:
            raise ConfigError("--toyworld generates its own samples; leave out --data, --opens2v and --videos")
        if req.samples < 1:
            raise ConfigError(f"--samples must be >= 1, got {req.samples}")
        if req.steps is not None and req.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {req.steps}")
    elif req.opens2v is not None:
        if req.data or req.images_root is None or len(req.videos) != 1:
            raise ConfigError("--opens2v FILE goes with --images-root DIR and --videos FOLDER (of <id>.mp4), without --data")
    else:
        if req.images_root is not None or req.cases is not None or req.limit is not None:
            raise ConfigError("--images-root, --cases and --limit go with --opens2v FILE")
        if not req.data:
            raise ConfigError("--data MANIFEST is required (or --toyworld, or --opens2v)")
        if not req.videos:
            raise ConfigError("--videos is required: a folder of <id>.mp4 / <id>.png, or one file per manifest sample")
    return _Checked(metrics, options, weights, protocol)


def _not_run(metrics: list[str], why: str) -> dict[str, str]:
    return {k: why for k in COLUMNS if k not in metrics}


def run(req: EvalRequest) -> Report:
    """Evaluate generated files against a manifest (or, with `toyworld`, a freshly generated set)."""
    checked = validate(req)
    if req.toyworld:
        return run_toyworld(req, checked)
    if req.opens2v is not None:
        from idcrafter.eval.inputs import load_benchmark_items

        items = load_benchmark_items(req.opens2v, req.images_root, req.videos[0], req.cases, req.limit)
    else:
        items = load_items(req.data, req.videos)
    source = {"opens2v": str(req.opens2v), "images_root": str(req.images_root)} if req.opens2v else {"data": str(req.data)}
    if checked.protocol != "legacy":
        scorers, skipped = build_scorers(checked.protocol, checked.options, req.device)
        if checked.protocol == "opens2v":
            from idcrafter.eval.opens2v import evaluate_opens2v

            report = evaluate_opens2v(items, scorers, examples=req.examples, progress=req.progress, skipped=skipped,
                                      version=req.leaderboard)
        else:
            report = evaluate_protocol(checked.protocol, items, scorers, examples=req.examples, progress=req.progress,
                                       skipped=skipped)
        report.extra["protocol"] = checked.protocol
        write_report(report, req.out, inputs={**source, "videos": [str(v) for v in req.videos],
                                              "protocol": checked.protocol})
        return report
    rewards, skipped = build_rewards([m for m in checked.metrics if m in REWARD_METRICS], checked.options,
                                     device=req.device)
    skipped.update(_not_run(checked.metrics, "not in --metrics"))
    report = evaluate(items, rewards, metrics=[m for m in checked.metrics if m in BUILTIN_METRICS], skipped=skipped,
                      weights=checked.weights, flow=req.flow, batch_size=req.batch_size, examples=req.examples,
                      progress=req.progress)
    report.extra["protocol"] = "legacy"
    write_report(report, req.out, inputs={**source, "videos": [str(v) for v in req.videos],
                                          "metrics": checked.metrics, "flow": req.flow, "protocol": "legacy"})
    return report


def _toyworld_paths(req: EvalRequest, options: dict[str, dict[str, object]]) -> tuple[Path, Path]:
    """The model folder and the ToyID embedder folder of a --toyworld run (FileFormatError or ConfigError if missing)."""
    toyid = options.get("toyid", {}).get("path")
    if req.model is not None:
        model = Path(req.model)
        if not (model / "transformer").is_dir():
            raise FileFormatError(f"--model {model}: not a Wan diffusers folder (no transformer/ subfolder)")
    else:
        from idcrafter.video.defaults import TOYWORLD_MODEL, toyworld_available

        if not toyworld_available():
            raise ConfigError("--toyworld: no toy-world model is installed (python -m idcrafter.toyworld.build "
                              "--install); pass --model FOLDER")
        model = TOYWORLD_MODEL
        if toyid is None and (TOYWORLD_MODEL.parent / "toyid" / "toyid.json").is_file():
            toyid = TOYWORLD_MODEL.parent / "toyid"
    if toyid is None:
        raise ConfigError("--toyworld needs the ToyID embedder: pass --model-option toyid.path=FOLDER")
    toyid = Path(str(toyid))
    if not (toyid / "toyid.json").is_file():
        raise FileFormatError(f"toyid.path {toyid}: no toyid.json in that folder (a ToyIDEmbedder.save folder)")
    options.setdefault("toyid", {})["path"] = str(toyid)
    return model, toyid


def render_toyworld(model: Path, manifest: Path, videos: Path, seed: int = 0, steps: int | None = None) -> list[Path]:
    """Step 1 of --toyworld: one `videos/<id>.mp4` per manifest sample (sample i seeded `seed + i`),
    rendered by the batch renderer (`idcrafter.cli.render_batch` on a job file) in a separate
    process, so that the evaluation process itself never imports a generator. Earlier videos of
    these ids are removed first: a rerun renders afresh rather than resuming.
    """
    from idcrafter.data.manifest import load_manifest

    samples, errors = load_manifest(manifest)
    if errors:
        raise FileFormatError(f"{manifest}: {errors[0]}")
    jobs = Path(manifest).parent / "render_jobs.jsonl"
    jobs.write_text("".join(
        json.dumps({"prompt": s.prompt, "refs": [str(x.image) for x in s.subjects], "output": f"{s.id}.mp4",
                    "seed": seed + i, **({"steps": steps} if steps is not None else {})}) + "\n"
        for i, s in enumerate(samples)))
    for sample in samples:
        (videos / f"{sample.id}.mp4").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "idcrafter.cli.render_batch", "--jobs", str(jobs), "--out", str(videos),
           "--model", str(model), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise FileFormatError(f"--model {model}: rendering the toy-world samples failed ({last})")
    return [videos / f"{s.id}.mp4" for s in samples]


def run_toyworld(req: EvalRequest, checked: _Checked | None = None) -> Report:
    """Held-out toy-world samples -> one mp4 each rendered by the model through the batch renderer in
    `out/videos` (`render_toyworld`) -> the files scored as any others (ToyID + Motion by default),
    plus `evaluate_model`'s ToyID matched / shuffled / truth on the same files."""
    checked = checked or validate(req)
    model, toyid = _toyworld_paths(req, checked.options)  # before the heavy imports below
    from idcrafter.toyworld.evaluate import score_files
    from idcrafter.toyworld.world import write_dataset
    from idcrafter.video.infer import InferenceRequest, model_config

    cfg = model_config(InferenceRequest(refs=[], prompt="-", out="-.mp4", model=str(model)))  # reads configs only
    size = cfg.height if cfg.height == cfg.width else 64
    out = Path(req.out)
    videos = out / "videos"
    with tempfile.TemporaryDirectory(prefix="idcrafter-eval-") as tmp:
        manifest = write_dataset(tmp, req.samples, seed=req.seed, pool="held_out", num_frames=cfg.num_frames, size=size)
        paths = render_toyworld(model, manifest, videos, seed=req.seed, steps=req.steps)
        toy = score_files(paths, manifest, toyid, fps=cfg.fps, seed=req.seed)
        items = load_items(manifest, paths)
        rewards, skipped = build_rewards([m for m in checked.metrics if m in REWARD_METRICS], checked.options,
                                         device=req.device)
        skipped.update(_not_run(checked.metrics, "not part of this --toyworld run (toy sprites: ToyID and Motion)"))
        extra = {f"toyid_{name}": [row[f"{k}_toyid_mean"] for row in toy["samples"]]
                 for name, k in (("matched", "gen"), ("shuffled", "gen_shuffled"), ("truth", "truth"))}
        report = evaluate(items, rewards, metrics=[m for m in checked.metrics if m in BUILTIN_METRICS], skipped=skipped,
                          weights=checked.weights, extra_columns=extra, flow=req.flow, batch_size=req.batch_size,
                          examples=req.examples, progress=req.progress)
    report.extra["protocol"] = "legacy"
    report.extra["toyworld"] = {
        "model": str(model), "toyid": str(toyid), "samples": req.samples, "seed": req.seed, "steps": req.steps,
        "videos": str(videos),
        "matched_vs_shuffled": toy["summary"],
        "note": "toyid_matched / toyid_shuffled / toyid_truth: ToyID mean of the rendered mp4 against its own "
                "references, against another sample's, and of the ground-truth clip (toyworld.evaluate.score_files)",
    }
    write_report(report, out, inputs={"toyworld": True, "model": str(model), "metrics": checked.metrics, "flow": req.flow})
    return report
