"""Training settings: options generated from the RunSettings fields, --config files (YAML / JSON)
read through the same parser as the command line, the resolved settings saved in the run folder."""

from __future__ import annotations

import argparse
import json

import pytest

from idcrafter.cli import train_image, train_rl, train_video
from idcrafter.train.cli import (
    RunSettings,
    ValidationSettings,
    parse_settings,
    save_settings,
    settings_dict,
    train_args,
)


def test_run_options_come_from_the_settings_fields():
    parser = train_video.build_parser()
    options = {a.dest: a for a in parser._actions}
    for name in ("max_steps", "lr", "lr_schedule", "min_lr_ratio", "warmup_steps", "no_progress", "config"):
        assert name in options, name
    assert options["lr_schedule"].choices == ("constant", "linear", "cosine") and options["lr_schedule"].default == "constant"
    assert options["min_lr_ratio"].default == 0.0 and options["lr"].default == 1e-5
    assert options["deepspeed_config"].option_strings == ["--deepspeed_config", "--deepspeed-config"]
    assert options["output"].required
    # a script's own defaults and helps, and the fields it leaves out (RL: no batch options, no EMA)
    rl = {a.dest: a for a in train_rl.build_parser()._actions}
    assert rl["max_steps"].default is None and rl["save_every"].default == 50 and rl["weight_decay"].default == 0.0
    assert rl["max_steps"].help == "optimizer steps (default: the paper's, per branch)"
    assert "batch_size" not in rl and "ema_decay" not in rl and "grad_accum" not in rl
    assert rl["sp_size"].default == 1 and "sp_size" not in {a.dest for a in train_image.build_parser()._actions}
    image = {a.dest: a for a in train_image.build_parser()._actions}
    assert image["lr"].default is None and image["lr"].help == "learning rate (default: the preset's)"
    generated = [a.dest for a in train_video.build_parser()._actions if a.dest in RunSettings.__dataclass_fields__]
    assert generated == list(RunSettings.__dataclass_fields__)  # every field, in field order


@pytest.mark.parametrize("script, settings, left_out, validation", [
    (train_video, "VideoSettings", set(), True),
    (train_image, "ImageSettings", {"sp_size"}, True),  # sequence parallelism: the video trainers only
    (train_rl, "RLSettings", {"batch_size", "grad_accum", "ema_decay"}, False),
])
def test_every_option_is_a_settings_field(script, settings, left_out, validation):
    """A trainer's command line is its settings dataclass plus RunSettings (plus, for SFT,
    ValidationSettings), nothing else; the parsed options build the dataclasses."""
    cls = getattr(script, settings)
    own, run = set(cls.__dataclass_fields__), set(RunSettings.__dataclass_fields__) - left_out
    checks = set(ValidationSettings.__dataclass_fields__) if validation else set()
    parser = script.build_parser()
    dests = {a.dest for a in parser._actions} - {"help", "config", "local_rank"}
    assert dests == own | run | checks and not own & run and not (own | run) & checks
    args = parser.parse_args(["--data", "d.jsonl", "--output", "o"])
    values = vars(args)
    assert cls(**{k: values[k] for k in own}) == cls(data="d.jsonl")  # the fields' defaults are the options'
    assert RunSettings(**{k: values[k] for k in run}) == RunSettings(
        output="o", **{k: parser.get_default(k) for k in run if k != "output"})
    if validation:  # off by default: existing runs are unchanged
        assert ValidationSettings(**{k: values[k] for k in checks}) == ValidationSettings()
        assert (args.validate_every, args.validation_data, args.validation_samples, args.validation_steps) == (
            0, None, 4, None)
        run_args = train_args(parser.parse_args(["--data", "d", "--output", "o", "--validate-every", "5",
                                                 "--validation-data", "v.jsonl", "--validation-steps", "8"]))
        assert (run_args.validate_every, run_args.validation_data, run_args.validation_samples,
                run_args.validation_steps) == (5, "v.jsonl", 4, 8)


def test_config_file_values_and_command_line_overrides(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data: d.jsonl\noutput: runs/a\nmax-steps: 7\nlr: 3.0e-4\nlr_schedule: cosine\n"
                      "no_progress: true\ngradient-checkpointing: true\nema_decay: null\n")
    parser = train_video.build_parser()
    args = parse_settings(parser, ["--config", str(config), "--lr", "1e-4"])
    assert (args.data, args.output, args.max_steps, args.lr, args.lr_schedule) == ("d.jsonl", "runs/a", 7, 1e-4, "cosine")
    assert args.no_progress is True and args.gradient_checkpointing is True and args.ema_decay is None
    assert args.warmup_steps == 0  # not in the file: the option's default
    # JSON works too; list and repeated options: the command line's occurrences replace the file's
    config = tmp_path / "rl.json"
    config.write_text(json.dumps({"data": "d.jsonl", "output": "o", "categories": ["face", "upper"],
                                  "reward_option": ["face.backend=dlib", "hps.size=224"], "branch": "image"}))
    parser = train_rl.build_parser()
    args = parse_settings(parser, ["--config", str(config)])
    assert args.categories == ["face", "upper"] and args.reward_option == ["face.backend=dlib", "hps.size=224"]
    args = parse_settings(parser, ["--config", str(config), "--reward-option", "clip.size=336", "--categories", "bag"])
    assert args.reward_option == ["clip.size=336"] and args.categories == ["bag"] and args.branch == "image"


@pytest.mark.parametrize("text, message", [
    ("max_steps: 3\nlearning_rate: 1e-4\n", "error: --config {path}: unknown key 'learning_rate' (not an option; "
                                             "see --help)"),
    ("- 1\n- 2\n", "error: --config {path}: must hold a mapping of option names to values, not list"),
    ("max_steps: [1, 2\n", "error: --config {path}: not valid YAML or JSON"),
    ("no_progress: 1\n", "error: --config {path}: no_progress must be true or false, got 1"),
    ("lr: {a: 1}\n", "error: --config {path}: lr must be a single value, got {'a': 1}"),
])
def test_bad_config_files_are_one_line_errors(text, message, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert train_video.main(["--config", str(path), "--data", "d.jsonl", "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(message.replace('{path}', str(path))), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, value", [("lr", "nan"), ("max-steps", "0"), ("lr-schedule", "step"), ("seed", "-1")])
def test_a_bad_value_in_the_file_gets_the_command_lines_message(flag, value, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(f"{flag}: {value}\n")
    base = ["--data", "d.jsonl", "--output", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as from_file:
        train_video.main(["--config", str(path), *base])
    file_err = capsys.readouterr().err
    with pytest.raises(SystemExit) as typed:
        train_video.main([*base, f"--{flag}", value])
    assert from_file.value.code == typed.value.code == 2
    assert file_err == capsys.readouterr().err and file_err.startswith(f"error: argument --{flag}")


def test_saved_settings_reproduce_the_run_and_keep_their_file_name(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    parser = train_rl.build_parser()
    argv = ["--data", "d.jsonl", "--output", str(tmp_path / "run"), "--lr-schedule", "linear", "--min-lr-ratio",
            "0.25", "--categories", "face", "bag", "--reward-option", "face.backend=dlib", "--seed", str(2**64 - 1),
            "--normalise-rewards", "--window", "full"]
    args = parse_settings(parser, argv)
    path = save_settings(parser, args)
    assert path == tmp_path / "run" / "config.yaml"
    again = parse_settings(parser, ["--config", str(path)])
    assert vars(again) == {**vars(args), "config": str(path)}
    # a run folder that already keeps settings.json goes on using it, as JSON
    (tmp_path / "run2").mkdir()
    (tmp_path / "run2" / "settings.json").write_text("{}")
    args.output = str(tmp_path / "run2")
    path = save_settings(parser, args)
    assert path.name == "settings.json" and json.loads(path.read_text()) == settings_dict(parser, args)
    assert not (tmp_path / "run2" / "config.yaml").exists()
    monkeypatch.setenv("RANK", "1")  # only rank 0 writes
    assert save_settings(parser, argparse.Namespace(**{**vars(args), "output": str(tmp_path / "r3")})) is None
    assert not (tmp_path / "r3").exists()


def test_schedules_fill_the_deepspeed_scheduler_section(tmp_path):
    from idcrafter.train.cli import check_run_paths
    from idcrafter.train.ds_config import prepare_ds_config
    from idcrafter.utils.cli import InputError

    def scheduler(schedule, warmup):
        return prepare_ds_config("ds_configs/zero2.json", micro_batch=1, grad_accum=1, grad_clip=1.0, bf16=False,
                                 hidden_size=8, lr=2e-4, weight_decay=0.0, warmup_steps=warmup, total_steps=100,
                                 schedule=schedule, min_lr_ratio=0.25).get("scheduler")

    assert scheduler("constant", 0) is None  # as before: a constant lr, no scheduler
    assert scheduler("constant", 10) == {"type": "WarmupLR", "params": {
        "warmup_min_lr": 0.0, "warmup_max_lr": 2e-4, "warmup_num_steps": 10, "warmup_type": "linear"}}
    assert scheduler("linear", 10) == {"type": "WarmupDecayLR", "params": {
        "total_num_steps": 100, "warmup_min_lr": 5e-5, "warmup_max_lr": 2e-4, "warmup_num_steps": 10,
        "warmup_type": "linear"}}
    assert scheduler("cosine", 0) == {"type": "WarmupCosineLR", "params": {
        "total_num_steps": 100, "warmup_min_ratio": 0.25, "cos_min_ratio": 0.25, "warmup_num_steps": 1,
        "warmup_type": "linear"}}
    # a DeepSpeed config with its own scheduler: kept, and a decaying --lr-schedule with it is refused
    own = tmp_path / "ds.json"
    own.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto",
                               "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 5}}}))
    args = train_video.build_parser().parse_args(["--data", "d", "--output", str(tmp_path / "o"),
                                                  "--deepspeed_config", str(own), "--lr-schedule", "cosine"])
    with pytest.raises(InputError, match=r"^--lr-schedule cosine: --deepspeed_config .* has its own \"scheduler\""):
        check_run_paths(args, data_flags=())
    args.lr_schedule = "constant"
    check_run_paths(args, data_flags=())
