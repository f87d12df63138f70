"""Checkpoints under faults: every file a checkpoint writes damaged in turn, resume continuing from
the newest complete checkpoint with the weights and losses of an uninterrupted run; checkpoints
that would run code refused; logs without repeated steps; bad input writing nothing; NaN stopping.

Most runs happen in one worker process (this file run as a script: `python tests/test_checkpoints.py
JOBS.json`), which calls scripts/train_video.py's `main()` once per job, so DeepSpeed and the model
code load once; the cases that must go through the real command line run it in a subprocess.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from ports import free_port

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CK = "checkpoints"
OLDEST, MIDDLE, NEWEST = "step_00000002", "step_00000004", "step_00000006"
MODEL = "mp_rank_00_model_states.pt"  # ZeRO-2 file names of a one-rank run
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
EMA = "ema_rank0.pt"
STATE = "trainer_rank0.json"
MARKER = "complete.json"
ADAPTER = Path("adapter") / "idcrafter_adapter.safetensors"
STEPS = 6


def one_rank_env() -> dict:
    return dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")


def argv(output: Path, data: Path, *extra: str, zero: int = 2, steps: int = STEPS) -> list[str]:
    """scripts/train_video.py's arguments: the tiny preset, a checkpoint every 2 steps, all kept, EMA."""
    return ["--preset", "tiny", "--data", str(data), "--output", str(output), "--deepspeed_config",
            f"ds_configs/zero{zero}.json", "--lr", "1e-3", "--log-every", "1", "--no-progress", "--max-steps",
            str(steps), "--save-every", "2", "--keep-last", "10", "--ema-decay", "0.9", *extra]


# ------------------------------------------------------------------------------------------ damage


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def reseal(folder: Path, **changes) -> None:
    """Write a marker that calls the checkpoint complete with its current files (and sizes), for a
    one-rank ZeRO-2 run of the folder's step unless `changes` say otherwise."""
    body = {"format": 1, "step": int(folder.name.split("_")[1]), "world_size": 1, "zero_stage": 2,
            "files": {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.name != MARKER}}
    body.update(changes)
    (folder / MARKER).write_text(json.dumps(body))


def kill_before_ema(run: Path) -> None:
    """What a kill right after DeepSpeed's own save leaves: its files, no EMA, no marker; `latest`
    (which DeepSpeed itself would already have moved) names the folder."""
    folder = run / CK / NEWEST
    (folder / EMA).unlink()
    (folder / MARKER).unlink()
    (run / CK / "latest").write_text(NEWEST)


def empty_folder(run: Path) -> None:
    for p in (run / CK / NEWEST).iterdir():
        p.unlink()


def two_newest_damaged(run: Path) -> None:
    (run / CK / NEWEST / MARKER).unlink()
    truncate(run / CK / MIDDLE / OPTIM)


def no_complete_checkpoint(run: Path) -> None:
    for tag in (OLDEST, MIDDLE, NEWEST):
        (run / CK / tag / MARKER).unlink()


def newest(name: str, how):
    return lambda run: how(run / CK / NEWEST / name)


def with_latest(text: str | None, damage):
    def apply(run: Path) -> None:
        damage(run)
        if text is None:
            (run / CK / "latest").unlink()
        else:
            (run / CK / "latest").write_text(text)
    return apply


# name -> (damage applied to a copy of the finished run, the checkpoint resume must continue from)
DAMAGE = {
    "model states truncated": (newest(MODEL, truncate), MIDDLE),
    "model states deleted": (newest(MODEL, Path.unlink), MIDDLE),
    "optimizer states truncated": (newest(OPTIM, truncate), MIDDLE),
    "optimizer states deleted": (newest(OPTIM, Path.unlink), MIDDLE),
    "EMA truncated": (newest(EMA, truncate), MIDDLE),
    "EMA deleted": (newest(EMA, Path.unlink), MIDDLE),
    "killed before the EMA was written": (kill_before_ema, MIDDLE),
    "trainer state truncated": (newest(STATE, truncate), MIDDLE),
    "marker truncated": (newest(MARKER, truncate), MIDDLE),
    "marker deleted": (newest(MARKER, Path.unlink), MIDDLE),
    "folder emptied": (empty_folder, MIDDLE),
    "latest empty": (with_latest("", newest(OPTIM, truncate)), MIDDLE),
    "latest dangling": (with_latest("step_99999999", newest(EMA, Path.unlink)), MIDDLE),
    "latest deleted": (with_latest(None, newest(MODEL, truncate)), MIDDLE),
    "two newest damaged": (two_newest_damaged, OLDEST),
    "no complete checkpoint": (no_complete_checkpoint, None),
}


def other_world_size(run: Path) -> None:
    folder = run / CK / NEWEST
    shutil.copy(folder / STATE, folder / "trainer_rank1.json")
    shutil.copy(folder / EMA, folder / "ema_rank1.pt")
    reseal(folder, world_size=2)


def poisoned_model_states(run: Path, target: Path) -> None:
    """The newest checkpoint's model states replaced by a pickle that creates `target` when
    unpickled, the marker rewritten so the checkpoint looks complete."""
    folder = run / CK / NEWEST
    torch.save({"module": _Payload(str(target))}, folder / MODEL)
    reseal(folder)


class _Payload:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').write('ran')",))


# ------------------------------------------------------------------------------------------ reading runs


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / ADAPTER))


def tensorboard_steps(run: Path, key: str = "loss") -> list[int]:
    """The steps TensorBoard shows for `key` (it applies purge events across event files)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return [e.step for e in acc.Scalars(key)]


def purge_step(run: Path) -> int | None:
    """The step of the session-start (purge) event the newest TensorBoard file opens with."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    newest_file = max((run / "tensorboard").iterdir(), key=lambda p: p.stat().st_mtime_ns)
    for event in EventFileLoader(str(newest_file)).Load():
        if event.HasField("session_log"):
            return event.step
    return None


def snapshot(run: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(run).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(run.rglob("*")) if p.is_file()}


def assert_same_as_reference(run: Path, reference: Path) -> None:
    """Final weights to 1e-6, every step logged once with the reference's losses, TensorBoard too."""
    a, b = adapter(reference), adapter(run)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)
    got, want = rows(run), rows(reference)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-5)
    assert tensorboard_steps(run) == list(range(1, STEPS + 1))


def complete_tags(run: Path) -> list[str]:
    from idcrafter.train.checkpoint import complete_tags as tags

    return tags(run / CK)


# ------------------------------------------------------------------------------------------ the worker's jobs


def jobs(root: Path, data: Path, poison_target: Path) -> list[dict]:
    base, base3 = root / "base", root / "base3"
    out = []
    out.append({"name": "base", "argv": argv(base, data)})
    out.append({"name": "base3", "argv": argv(base3, data, zero=3, steps=4)})
    for name in DAMAGE:
        run = root / "cases" / name.replace(" ", "_")
        out.append({"name": name, "copy": str(base), "damage": name, "audit": True,
                    "argv": argv(run, data, "--resume", "auto")})
    out.append({"name": "zero3 resume", "copy": str(base3), "damage": "zero3: optimizer of the newest deleted",
                "audit": True, "argv": argv(root / "cases" / "zero3", data, "--resume", "auto", zero=3, steps=4)})
    out.append({"name": "other world size", "copy": str(base), "damage": "other world size",
                "argv": argv(root / "cases" / "world", data, "--resume", "auto")})
    out.append({"name": "incomplete tag", "copy": str(base), "damage": "EMA deleted",
                "argv": argv(root / "cases" / "tag", data, "--resume", NEWEST)})
    out.append({"name": "other zero stage", "copy": str(base), "damage": None,
                "argv": argv(root / "cases" / "stage", data, "--resume", "auto", zero=3)})
    out.append({"name": "poisoned", "copy": str(base), "damage": "poisoned", "poison_target": str(poison_target),
                "audit": True, "argv": argv(root / "cases" / "poisoned", data, "--resume", "auto")})
    single = data.parent.parent / "one" / "manifest.jsonl"
    out.append({"name": "no full batch", "argv": argv(root / "nobatch", single, "--batch-size", "2")})
    out.append({"name": "bad manifest", "trainer_only": True, "data": str(data.parent.parent / "bad.jsonl"),
                "output": str(root / "badmanifest")})
    out.append({"name": "nan", "nan_at": 3, "argv": argv(root / "nan", data, "--save-every", "1")})
    return out


def _apply_damage(job: dict, run: Path) -> None:
    name = job["damage"]
    if name is None:
        return
    if name == "other world size":
        other_world_size(run)
    elif name == "poisoned":
        poisoned_model_states(run, Path(job["poison_target"]))
    elif name == "zero3: optimizer of the newest deleted":
        (run / CK / "step_00000004" / OPTIM).unlink()
    else:
        DAMAGE[name][0](run)


@contextlib.contextmanager
def _audit_torch_load(calls: list):
    """Record every torch.load (DeepSpeed's included: they look the function up on the module)."""
    original = torch.load

    def load(f, *args, **kwargs):
        calls.append({"file": str(f), "weights_only": kwargs.get("weights_only")})
        return original(f, *args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


@contextlib.contextmanager
def _nan_from(call: int):
    """The video loss becomes NaN from its `call`-th evaluation on (one micro-batch per step)."""
    from idcrafter.video.training import VideoTrainingSpec

    original = VideoTrainingSpec.loss
    count = {"n": 0}

    def loss(self, model, conditions, generator):
        value, metrics = original(self, model, conditions, generator)
        count["n"] += 1
        return (value * float("nan"), metrics) if count["n"] >= call else (value, metrics)

    VideoTrainingSpec.loss = loss
    try:
        yield
    finally:
        VideoTrainingSpec.loss = original


def _bad_manifest_trainer(job: dict) -> None:
    """The trainer alone (no script checks) on a manifest with a bad line."""
    from idcrafter.train.trainer import TrainArgs, Trainer
    from idcrafter.video.training import VideoDataArgs, VideoModelArgs, VideoTrainingSpec

    spec = VideoTrainingSpec(VideoModelArgs(preset="tiny"), VideoDataArgs(data=job["data"]), policy="new-modules")
    Trainer(spec, TrainArgs(output=job["output"], max_steps=2, progress=False)).run()


def _run_job(main, job: dict) -> dict:
    stderr, calls = io.StringIO(), []
    result = {"rc": None, "exception": None}
    with contextlib.ExitStack() as stack:
        try:
            if "copy" in job:
                run = Path(job["argv"][job["argv"].index("--output") + 1])
                shutil.copytree(job["copy"], run)
                _apply_damage(job, run)
            if job.get("audit"):
                stack.enter_context(_audit_torch_load(calls))
            if job.get("nan_at"):
                stack.enter_context(_nan_from(job["nan_at"]))
            stack.enter_context(contextlib.redirect_stderr(stderr))
            result["rc"] = _bad_manifest_trainer(job) if job.get("trainer_only") else main(job["argv"])
        except Exception as err:  # reported to the test, which asserts on type and message
            result["exception"] = type(err).__name__
            result["message"] = str(err)
            result["traceback"] = traceback.format_exc()
    result.update(stderr=stderr.getvalue(), loads=calls)
    return result


def _worker(jobs_file: str) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_video_script", ROOT / "scripts" / "train_video.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    path = Path(jobs_file)
    results = {}
    for job in json.loads(path.read_text()):
        results[job["name"]] = _run_job(script.main, job)
        path.with_suffix(".results.json").write_text(json.dumps(results))


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One worker process: a finished ZeRO-2 run (checkpoints 2, 4, 6), a ZeRO-3 one (2, 4), then
    every damage case resumed from a copy, the refusals, bad data and a NaN run."""
    from tiny_data import write_manifest

    root = tmp_path_factory.mktemp("ckpt")
    data = write_manifest(root / "data" / "d", n=4)
    write_manifest(root / "data" / "one", n=1)
    (root / "data" / "bad.jsonl").write_text('{"id": "x"\n')
    poison_target = root / "payload_ran"
    job_list = jobs(root, data, poison_target)
    jobs_file = root / "jobs.json"
    jobs_file.write_text(json.dumps(job_list))
    proc = subprocess.run([sys.executable, __file__, str(jobs_file)], cwd=ROOT, env=one_rank_env(),
                          capture_output=True, text=True, timeout=600)
    results_file = jobs_file.with_suffix(".results.json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(results_file.read_text())
    for name in ("base", "base3"):
        assert results[name]["rc"] == 0, results[name]
    return root, data, results, poison_target


def case_dir(root: Path, name: str) -> Path:
    return root / "cases" / name.replace(" ", "_")


def copy_run(runs, tmp_path: Path) -> Path:
    root = runs[0]
    run = tmp_path / "run"
    shutil.copytree(root / "base", run)
    return run


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/train_video.py", *args], cwd=ROOT, env=one_rank_env(),
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------ tests


def test_a_finished_run_has_sealed_checkpoints(runs):
    root = runs[0]
    base = root / "base"
    assert complete_tags(base) == [OLDEST, MIDDLE, NEWEST]
    assert (base / CK / "latest").read_text() == NEWEST
    marker = json.loads((base / CK / NEWEST / MARKER).read_text())
    assert marker["step"] == 6 and marker["world_size"] == 1 and marker["zero_stage"] == 2
    assert sorted(marker["files"]) == sorted([MODEL, OPTIM, EMA, STATE])
    for name, size in marker["files"].items():
        assert (base / CK / NEWEST / name).stat().st_size == size
    assert json.loads((base / CK / NEWEST / STATE).read_text())["step"] == 6


@pytest.mark.parametrize("case", list(DAMAGE))
def test_resume_auto_continues_from_the_newest_complete_checkpoint(runs, case):
    root, _, results, _ = runs
    result = results[case]
    assert result["rc"] == 0 and result["exception"] is None, result
    run = case_dir(root, case)
    expected = DAMAGE[case][1]
    assert json.loads((run / "summary.json").read_text())["resumed_from"] == expected
    assert_same_as_reference(run, root / "base")
    assert purge_step(run) == (int(expected.split("_")[1]) + 1 if expected else 0)
    # the damaged checkpoints were written again, whole; nothing loaded could run code
    assert complete_tags(run) == [OLDEST, MIDDLE, NEWEST]
    assert (run / CK / "latest").read_text() == NEWEST
    loads = result["loads"]
    assert all(call["weights_only"] is True for call in loads), loads
    resumed = {Path(call["file"]).relative_to(run / CK).as_posix() for call in loads}
    assert resumed == ({f"{expected}/{name}" for name in (MODEL, OPTIM, EMA)} if expected else set())


def test_zero3_resume_reproduces_the_run_and_loads_weights_only(runs):
    root, _, results, _ = runs
    result = results["zero3 resume"]
    assert result["rc"] == 0, result
    run, reference = case_dir(root, "zero3"), root / "base3"
    assert json.loads((run / "summary.json").read_text())["resumed_from"] == OLDEST
    a, b = adapter(reference), adapter(run)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)
    assert [r["step"] for r in rows(run)] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in rows(run)], [r["loss"] for r in rows(reference)], rtol=1e-5)
    files = {Path(call["file"]).name for call in result["loads"]}
    assert {"zero_pp_rank_0_mp_rank_00_model_states.pt", OPTIM, EMA} <= files
    assert all(call["weights_only"] is True for call in result["loads"])


def one_error_line(text: str) -> str:
    """The stderr of the command line: exactly one line, `error: ...`."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    return lines[0]


def error_line(text: str) -> str:
    """The stderr of `main()` in the worker, where the run's log lines land as well: one error line."""
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in text, text
    return errors[0]


@pytest.mark.parametrize("case, words", [
    ("other world size", ["written by 2 ranks", "this run has 1"]),
    ("incomplete tag", [f"--resume {NEWEST}", "incomplete", "ema_rank0.pt is missing", f"{OLDEST}, {MIDDLE}"]),
    ("other zero stage", ["ZeRO stage 2", "stage 3"]),
])
def test_checkpoints_that_cannot_continue_this_run_are_refused(runs, case, words):
    root, _, results, _ = runs
    result = results[case]
    assert result["rc"] == 2 and result["exception"] is None, result
    line = error_line(result["stderr"])
    for word in words:
        assert word in line, line
    run = root / "cases" / {"other world size": "world", "incomplete tag": "tag", "other zero stage": "stage"}[case]
    assert [r["step"] for r in rows(run)] == list(range(1, STEPS + 1))  # the logs untouched
    assert not (run / CK / "step_00000008").exists()


def test_a_checkpoint_that_would_run_code_is_refused_in_process(runs):
    root, _, results, target = runs
    result = results["poisoned"]
    assert result["rc"] == 2, result
    line = error_line(result["stderr"])
    assert f"{NEWEST}/{MODEL}" in line and "exec" in line
    assert not target.exists()
    assert all(call["weights_only"] is True for call in result["loads"])


def test_cli_resume_after_a_kill_matches_the_uninterrupted_run(runs, tmp_path):
    """The real command line: the kill that leaves DeepSpeed's files and `latest` but no EMA, and a
    metrics row the kill cut short. The run continues from the checkpoint before it."""
    root, data, _, _ = runs
    run = copy_run(runs, tmp_path)
    kill_before_ema(run)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "loss"')
    proc = cli(*argv(run, data, "--resume", "auto"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipping checkpoint {NEWEST}: no {MARKER}" in proc.stderr
    assert json.loads((run / "summary.json").read_text())["resumed_from"] == MIDDLE
    assert_same_as_reference(run, root / "base")
    assert purge_step(run) == 5
    assert complete_tags(run) == [OLDEST, MIDDLE, NEWEST]


def test_cli_resume_from_a_missing_tag_is_one_line(runs, tmp_path):
    run = copy_run(runs, tmp_path)
    before = snapshot(run)
    proc = cli(*argv(run, runs[1], "--resume", "step_99999999"))
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert "step_99999999" in line and line.endswith(f"complete checkpoints: {OLDEST}, {MIDDLE}, {NEWEST}")
    assert snapshot(run) == before


def test_cli_refuses_a_checkpoint_whose_pickle_would_run_code(runs, tmp_path):
    run = copy_run(runs, tmp_path)
    target = tmp_path / "payload_ran"
    poisoned_model_states(run, target)
    before = snapshot(run)
    proc = cli(*argv(run, runs[1], "--resume", "auto"))
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert str(run / CK / NEWEST / MODEL) in line and "exec" in line, line
    assert not target.exists()
    assert snapshot(run) == before


def test_bad_data_leaves_no_run_folder(runs):
    root, _, results, _ = runs
    result = results["no full batch"]
    assert result["rc"] == 2, result
    assert "no full batch" in error_line(result["stderr"])
    assert not (root / "nobatch").exists()
    result = results["bad manifest"]
    assert result["exception"] == "InputError" and "bad lines" in result["message"], result
    assert not (root / "badmanifest").exists()


def test_a_non_finite_loss_stops_before_that_step_is_saved(runs):
    root, _, results, _ = runs
    result = results["nan"]
    if result["exception"] is not None:
        assert result["exception"] == "NonFiniteLoss", result
        message = result["message"]
    else:
        assert result["rc"] not in (0, None)
        message = error_line(result["stderr"])
    assert "step 3" in message and "loss" in message and "nan" in message.lower()
    run = root / "nan"
    assert complete_tags(run) == ["step_00000001", "step_00000002"]
    assert sorted(p.name for p in (run / CK).glob("step_*")) == ["step_00000001", "step_00000002"]
    assert [r["step"] for r in rows(run)] == [1, 2]
    weights = adapter(run)
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert not (run / "summary.json").exists()


# ------------------------------------------------------------------------------------------ the pure parts


def fake_checkpoint(ckpt_dir: Path, step: int, sealed: bool = True) -> Path:
    from idcrafter.train.checkpoint import step_tag, write_marker

    folder = ckpt_dir / step_tag(step)
    folder.mkdir(parents=True)
    (folder / STATE).write_text(json.dumps({"step": step, "epoch": 0, "position": step, "skipped_batches": 0}))
    (folder / MODEL).write_bytes(b"x" * step)
    if sealed:
        write_marker(folder, step, 1, 2)
    return folder


def test_prune_keeps_the_newest_complete_checkpoints_and_drops_unfinished_ones(tmp_path):
    from idcrafter.train.checkpoint import prune, step_folders

    for step, sealed in [(1, True), (2, False), (3, True), (4, True), (5, False), (9, False)]:
        fake_checkpoint(tmp_path, step, sealed)
    deleted = prune(tmp_path, keep_last=2, current_step=5)
    # 3 and 4 are the two newest complete ones; 9 belongs to an abandoned later attempt
    assert sorted(deleted) == ["step_00000001", "step_00000002", "step_00000005"]
    assert [p.name for p in step_folders(tmp_path)] == ["step_00000009", "step_00000004", "step_00000003"]


def test_the_marker_is_checked_against_the_files(tmp_path):
    from idcrafter.train.checkpoint import Incomplete, check_files, choose_checkpoint

    folder = fake_checkpoint(tmp_path, 4)
    assert check_files(folder).files == {MODEL: 4, STATE: len((folder / STATE).read_text())}
    (folder / MODEL).write_bytes(b"x" * 5)
    with pytest.raises(Incomplete, match=f"{MODEL} has 5 bytes, {MARKER} lists 4"):
        check_files(folder)
    (folder / MARKER).write_text(json.dumps({"format": 1, "step": 4, "world_size": "1", "zero_stage": 2,
                                             "files": {MODEL: 5}}))
    with pytest.raises(Incomplete, match="world_size is not a count"):
        check_files(folder)
    choice = choose_checkpoint(tmp_path, "auto", world_size=1)
    assert choice.tag is None and choice.skipped == (("step_00000004", f"{MARKER} is unreadable "
                                                      "(world_size is not a count)"),)


def test_metrics_rows_after_the_resumed_step_are_dropped():
    from idcrafter.train.metrics import kept_lines

    text = '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n{"step": 3, "loss": 3.0}\n{"step": 4, "lo'
    assert kept_lines(text, 2) == ['{"step": 1, "loss": 1.0}', '{"step": 2, "loss": 2.0}']
    assert kept_lines(text, 9) == ['{"step": 1, "loss": 1.0}', '{"step": 2, "loss": 2.0}', '{"step": 3, "loss": 3.0}']
    assert kept_lines(text, None) == []
    with pytest.raises(ValueError, match="line 2"):
        kept_lines('{"step": 1}\nnot json\n', 5)


def test_non_finite_loss_message_names_the_step_and_the_terms():
    from idcrafter.train.trainer import non_finite_message

    assert non_finite_message(7, {"loss": 1.0, "loss_flow": 0.5, "leakage": float("nan")}) is None
    message = non_finite_message(7, {"loss": float("inf"), "loss_flow": 0.5, "loss_attn": float("nan")})
    assert message.startswith("step 7: non-finite loss (loss, loss_attn); loss=inf, loss_attn=nan, loss_flow=0.5")


@pytest.mark.slow
def test_two_ranks_take_the_same_decision(tmp_path):
    """Two ranks (the deepspeed launcher): a file only rank 1 wrote is missing, so both ranks walk
    back to the same checkpoint; a pickle only rank 1 would load stops both ranks, nothing run."""
    from tiny_data import write_manifest

    data = write_manifest(tmp_path / "data", n=4)

    def launch(run: Path, *extra: str) -> subprocess.CompletedProcess:
        cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "scripts/train_video.py",
               *argv(run, data, *extra, steps=4)]
        return subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                              text=True, timeout=600)

    base = tmp_path / "base"
    proc = launch(base)
    assert proc.returncode == 0, proc.stderr[-3000:]
    marker = json.loads((base / CK / MIDDLE / MARKER).read_text())
    assert marker["world_size"] == 2 and {"ema_rank1.pt", "trainer_rank1.json"} <= marker["files"].keys()

    run = tmp_path / "resumed"
    shutil.copytree(base, run)
    (run / CK / MIDDLE / "ema_rank1.pt").unlink()
    proc = launch(run, "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["resumed_from"] == OLDEST
    a, b = adapter(base), adapter(run)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)
    assert [r["step"] for r in rows(run)] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in rows(run)], [r["loss"] for r in rows(base)], rtol=1e-5)

    run = tmp_path / "poisoned"
    shutil.copytree(base, run)
    target = tmp_path / "payload_ran"
    folder = run / CK / MIDDLE
    torch.save({"optimizer_state_dict": _Payload(str(target))}, folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    reseal(folder, world_size=2)
    proc = launch(run, "--resume", "auto")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and "zero_pp_rank_1_mp_rank_00_optim_states.pt" in errors[0] and errors[0] == errors[1]
    assert not target.exists()


if __name__ == "__main__":
    _worker(sys.argv[1])
