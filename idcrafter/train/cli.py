"""The command-line options every training script shares (SFT video and image, RL), with their
checks: numbers typed and bounded at parsing, paths checked before DeepSpeed starts, so a bad run
stops with one line and leaves no run folder behind.

Settings are defined once, as dataclass fields (`setting(...)`: default, checked type, help):
`RunSettings` here, and each trainer's own (`idcrafter.cli.train_*`); the argparse options are
generated from them (`add_dataclass_arguments`). Any option can also come
from a YAML or JSON file (`--config run.yaml`, `idcrafter.utils.settings_file`): its values go through the same
parser as the command line, which overrides them; the resolved settings are saved in the run folder
(`save_settings`) and can be passed back with --config.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import MISSING, dataclass, field
from pathlib import Path

from idcrafter.train.ds_config import LR_SCHEDULES
from idcrafter.utils.cli import (
    MAX_SAMPLING_STEPS,
    InputError,
    check_input_file,
    check_output_dir,
    integer,
    number,
    seed,
)
from idcrafter.utils.settings_file import NOT_SETTINGS, add_config_argument, parse_settings

__all__ = ["RunSettings", "add_config_argument", "add_dataclass_arguments", "add_run_arguments", "check_run_paths",
           "parse_settings", "run_training", "save_settings", "setting", "train_args", "write_settings"]

# The file save_settings writes in the run folder; SETTINGS_NAMES lists the names it reuses when present.
SETTINGS_FILE = "config.yaml"
SETTINGS_NAMES = ("config.yaml", "settings.json")


def setting(default=MISSING, *, help: str | None = None, type=None, choices=None, flags: tuple[str, ...] = (),
            required: bool = False, nargs: str | None = None, metavar: str | None = None, action: str | None = None):
    """A dataclass field that is also a command-line option (`add_dataclass_arguments`).

    `type`: the argparse converter (e.g. `integer(1)`), `flags`: the option strings (default
    `--field-name`), `required`: the option must be given; `nargs`, `metavar` and `action`
    ("append") as in argparse. A bool field with default False is a flag. A list default is copied
    per instance.
    """
    meta = {"help": help, "type": type, "choices": choices, "flags": flags, "required": required, "nargs": nargs,
            "metavar": metavar, "action": action}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"cli": meta})
    return field(default=None if required else default, metadata={"cli": meta})


def add_dataclass_arguments(p: argparse.ArgumentParser, cls, *, defaults: dict | None = None,
                            helps: dict | None = None, exclude: tuple[str, ...] = (),
                            only: tuple[str, ...] | None = None) -> None:
    """One argparse option per field of the dataclass `cls`, in field order.

    `defaults` / `helps`: per-field replacements (a script's own default, and the help that goes with
    it); `exclude`: fields this script does not offer; `only`: just these fields (a script adds
    its fields in groups around the shared run options, for the order of --help).
    """
    defaults, helps = defaults or {}, helps or {}
    for f in dataclasses.fields(cls):
        if f.name in exclude or (only is not None and f.name not in only):
            continue
        meta = f.metadata["cli"]
        flags = meta["flags"] or ("--" + f.name.replace("_", "-"),)
        kwargs = {"dest": f.name, "help": helps.get(f.name, meta["help"])}
        default = defaults.get(f.name, f.default_factory() if f.default is MISSING else f.default)
        if meta["required"]:
            kwargs["required"] = True
        elif f.type in (bool, "bool"):
            kwargs.update(action="store_true")
        else:
            kwargs["default"] = default
        for key in ("type", "choices", "nargs", "metavar", "action"):
            if meta.get(key) is not None:
                kwargs[key] = meta[key]
        p.add_argument(*flags, **kwargs)


@dataclass
class RunSettings:
    """The run options (DeepSpeed config, output, resume, optimiser, schedule, checkpoints, logs)."""

    deepspeed_config: str = setting("ds_configs/zero2.json", flags=("--deepspeed_config", "--deepspeed-config"))
    output: str = setting(required=True, help="run folder")
    resume: str | None = setting(None, help="'auto' (the newest complete checkpoint) or a checkpoint tag")
    max_steps: int | None = setting(1000, type=integer(1))
    lr: float | None = setting(1e-5, type=number(0, 1, lo_open=True), help="learning rate")
    weight_decay: float | None = setting(1e-2, type=number(0, 1), help="AdamW weight decay")
    warmup_steps: int = setting(0, type=integer(0), help="linear warm-up steps")
    lr_schedule: str = setting(
        "constant", choices=LR_SCHEDULES,
        help="after the warm-up: constant, or a linear or cosine decay to --min-lr-ratio x --lr at --max-steps "
             "(DeepSpeed's WarmupLR / WarmupDecayLR / WarmupCosineLR)")
    min_lr_ratio: float = setting(0.0, type=number(0, 1),
                                  help="the learning rate linear and cosine decay to, as a fraction of --lr")
    batch_size: int = setting(1, type=integer(1, 4096), help="micro batch per GPU")
    grad_accum: int = setting(1, type=integer(1, 4096))
    grad_clip: float = setting(1.0, type=number(0, lo_open=True), help="gradient-norm clip")
    seed: int = setting(0, type=seed)
    sp_size: int = setting(1, type=integer(1), metavar="N",
                           help="sequence parallelism: groups of N consecutive ranks train each sample together, "
                                "its video tokens split over them (DeepSpeed-Ulysses); N divides the ranks, the "
                                "attention heads and the video tokens; the data is split over WORLD_SIZE / N groups")
    ema_decay: float | None = setting(None, type=number(0, 1, lo_open=True, hi_open=True))
    save_every: int = setting(500, type=integer(1))
    keep_last: int = setting(2, type=integer(1))
    log_every: int = setting(10, type=integer(1))
    no_progress: bool = setting(False)
    peak_tflops: float | None = setting(
        None, type=number(0, lo_open=True), metavar="TFLOPS",
        help="peak dense TFLOP/s of one GPU in the training dtype (H100 SXM bf16: 989); training then logs "
             "MFU beside model tokens/s and achieved analytic TFLOP/s (SFT and RL both log those two)")


@dataclass
class ValidationSettings:
    """Validation samples during SFT (`idcrafter.train.validation`): the held-out set, how often, how many."""

    validate_every: int = setting(
        0, type=integer(0), metavar="N",
        help="every N steps and at the last step, sample --validation-data with the training model into "
             "OUTPUT/validation/step_*.png and TensorBoard (default 0: off)")
    validation_data: str | None = setting(None, metavar="PATH",
                                          help="JSONL manifest of held-out samples, in the format of --data")
    validation_samples: int = setting(4, type=integer(1, 64), metavar="K",
                                      help="sample the first K samples of --validation-data, the same ones every time")
    validation_steps: int | None = setting(
        None, type=integer(1, MAX_SAMPLING_STEPS), metavar="S",
        help="sampling steps (default: the preset's: 50 for Wan, 28 MultiCrafter, 25 One-for-All, 4 for tiny presets)")


def add_validation_arguments(p: argparse.ArgumentParser) -> None:
    """The `ValidationSettings` options (the SFT scripts)."""
    add_dataclass_arguments(p, ValidationSettings)


def check_validation(args: argparse.Namespace) -> None:
    """--validate-every needs a held-out manifest that exists (never the training data by default)."""
    if args.validate_every and args.validation_data is None:
        raise InputError(f"--validate-every {args.validate_every}: give the held-out samples with --validation-data "
                         "(a manifest in the format of --data)")
    if args.validation_data is not None:
        check_input_file(args.validation_data, "--validation-data")


def add_run_arguments(p: argparse.ArgumentParser, *, max_steps: int | None = 1000, lr: float | None = 1e-5,
                      weight_decay: float | None = 1e-2, save_every: int = 500, log_every: int = 10,
                      batch: bool = True, ema: bool = True, sequence_parallel: bool = False) -> None:
    """The `RunSettings` options, and --config (`add_config_argument`).

    `lr` / `weight_decay` / `max_steps` None: the option defaults to None (the model's preset, or the
    script, decides).
    `batch`: add --batch-size and --grad-accum; `ema`: add --ema-decay; `sequence_parallel`: add
    --sp-size (the video trainers).
    """
    helps = {}
    if max_steps is None:
        helps["max_steps"] = "optimizer steps (default: the paper's, per branch)"
    if lr is None:
        helps["lr"] = "learning rate (default: the preset's)"
    if weight_decay is None:
        helps["weight_decay"] = "AdamW weight decay (default: the preset's)"
    exclude = ((() if batch else ("batch_size", "grad_accum")) + (() if ema else ("ema_decay",))
               + (() if sequence_parallel else ("sp_size",)))
    add_config_argument(p)
    add_dataclass_arguments(p, RunSettings, helps=helps, exclude=exclude, defaults=dict(
        max_steps=max_steps, lr=lr, weight_decay=weight_decay, save_every=save_every, log_every=log_every))
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher


def settings_path(output: str | os.PathLike) -> Path:
    """Where the run folder keeps its settings: the file already there, else config.yaml."""
    folder = Path(output)
    for name in SETTINGS_NAMES:
        if (folder / name).is_file():
            return folder / name
    return folder / SETTINGS_FILE


def settings_dict(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """The resolved settings: every option of `parser` (dashes in names, as --config reads them)."""
    out = {}
    for action in parser._actions:
        if action.option_strings and action.dest not in NOT_SETTINGS and hasattr(args, action.dest):
            value = getattr(args, action.dest)
            out[action.dest] = list(value) if isinstance(value, tuple) else value
    return out


def save_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Path | None:
    """Write the resolved settings into the run folder now (rank 0 only; other ranks return None).
    The trainers instead pass `settings_dict` to `train_args(settings=...)`, and the trainer writes
    them with its first file, so that input errors found while loading leave no run folder."""
    if os.environ.get("RANK", "0") != "0":
        return None
    return write_settings(args.output, settings_dict(parser, args))


def write_settings(output: str | os.PathLike, values: dict) -> Path:
    """`values` as YAML or JSON after the name of `settings_path(output)`; `--config` of that
    file reproduces them."""
    import json

    import yaml

    from idcrafter.utils.io import atomic_write

    path = settings_path(output)
    with atomic_write(path) as tmp:
        if path.suffix == ".json":
            tmp.write_text(json.dumps(values, indent=2) + "\n")
        else:
            tmp.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def check_run_paths(args: argparse.Namespace, data_flags: tuple[str, ...] = ("data",)) -> None:
    """The run's files, before anything loads or is written: the manifests exist, the DeepSpeed
    config is a JSON object, the run folder can be created (or, resuming, written) there."""
    from idcrafter.utils.folders import read_json_object

    for name in data_flags:
        if getattr(args, name, None) is not None:
            check_input_file(getattr(args, name), f"--{name.replace('_', '-')}")
    ds_config = read_json_object(Path(args.deepspeed_config), "--deepspeed_config")
    if "scheduler" in ds_config and getattr(args, "lr_schedule", "constant") != "constant":
        raise InputError(f"--lr-schedule {args.lr_schedule}: --deepspeed_config {args.deepspeed_config} has its own "
                         "\"scheduler\" section; remove one of the two")
    check_output_dir(args.output, "--output")
    if args.resume is not None and args.resume != "auto" and ("/" in args.resume or args.resume in ("", ".", "..")):
        raise InputError(f"--resume {args.resume!r}: give 'auto' or a checkpoint tag such as step_00000500")


def check_sp_size(sp_size: int, heads: int | None = None, tokens: int | None = None) -> None:
    """--sp-size against the ranks launched, the model's heads and the video tokens of a sample
    (idcrafter.core.sequence_parallel); one line naming the problem."""
    from idcrafter.core.sequence_parallel import sp_size_problem
    from idcrafter.utils.cli import launched_ranks

    problem = sp_size_problem(sp_size, launched_ranks(), heads, tokens)
    if problem:
        raise InputError(f"--sp-size {sp_size}: {problem}")


def train_args(args: argparse.Namespace, **overrides):
    """`TrainArgs` from the shared options (`overrides` for what a script sets otherwise)."""
    from idcrafter.train.trainer import TrainArgs

    values = dict(
        output=args.output, deepspeed_config=args.deepspeed_config, max_steps=args.max_steps, lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, lr_schedule=args.lr_schedule,
        min_lr_ratio=args.min_lr_ratio, grad_clip=args.grad_clip, seed=args.seed,
        save_every=args.save_every, keep_last=args.keep_last, resume=args.resume, log_every=args.log_every,
        progress=not args.no_progress, peak_tflops=getattr(args, "peak_tflops", None),
    )
    for name in ("sp_size", "batch_size", "grad_accum", "ema_decay", "trainable", "gradient_checkpointing", "validate_every",
                 "validation_data", "validation_samples", "validation_steps"):
        if hasattr(args, name):
            values[name] = getattr(args, name)
    values.update(overrides)
    return TrainArgs(**values)


def _close_process_group() -> None:
    """At interpreter exit, close the process group a run left open. Left to the C++ static destructors,
    gloo's worker threads are sometimes destroyed while joinable and the process aborts ("terminate
    called without an active exception", exit -6) after it has already printed its result. Closed here,
    in an atexit hook, so an in-process caller can still run again before exiting."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - exiting anyway; never turn a clean exit into a traceback
        pass


def run_training(trainer) -> int:
    """Run a `Trainer` (SFT or RL) the way the training commands do and return their exit code: 0 with
    the summary printed as JSON; 2 with one line for bad input found on the way (a damaged checkpoint
    to resume, a data or settings mismatch) or when every sample failed to decode; 1 when a loss went
    non-finite (nothing of that step saved)."""
    import atexit
    import json
    import sys

    from idcrafter.train.trainer import AllSamplesFailed, NonFiniteLoss
    from idcrafter.utils.cli import fail, user_file

    atexit.unregister(_close_process_group)  # registered once however many runs a process makes
    atexit.register(_close_process_group)
    try:
        with user_file():
            summary = trainer.run()
    except (InputError, AllSamplesFailed) as err:
        return fail(str(err))
    except NonFiniteLoss as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if summary.get("failed_samples"):
        print(f"skipped {summary['failed_samples']} samples that failed to decode", file=sys.stderr)
    print(json.dumps({k: v for k, v in summary.items() if k != "failed_sample_ids"}))
    return 0
