"""Video SFT with real DeepSpeed engines on the CPU: ZeRO-2/3, two ranks, resume, export, bad data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ports import free_port
from safetensors.torch import load_file
from tiny_data import write_manifest

ROOT = Path(__file__).resolve().parents[1]


def train(output: Path, data: Path, *extra: str, ranks: int = 1, zero: int = 2, timeout: int = 400):
    """scripts/train_video.py as users launch it: `deepspeed --num_gpus N` for 2 ranks, else plain python."""
    args = ["scripts/train_video.py", "--preset", "tiny", "--data", str(data), "--output", str(output),
            "--deepspeed_config", f"ds_configs/zero{zero}.json", "--lr", "1e-3", "--log-every", "1",
            "--no-progress", *extra]
    port = str(free_port())
    if ranks > 1:
        cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", port, *args]
        env = dict(os.environ)
    else:
        cmd = [sys.executable, *args]
        env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def losses(output: Path) -> list[float]:
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("data"), n=4)


@pytest.fixture(scope="module")
def zero3_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    proc = train(out, data, "--max-steps", "3", "--save-every", "3", "--attn-loss-weight", "0.3", ranks=2, zero=3)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_zero3_two_ranks_train_and_export(zero3_run):
    out, proc = zero3_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == 3 and summary["steps"] == 3
    values = losses(out)
    assert len(values) == 3 and all(np.isfinite(values))
    assert "leakage" in summary["final"]
    assert (out / "training.png").is_file() and any((out / "tensorboard").iterdir())
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000003"


def test_exported_adapter_loads_in_the_pipeline_and_changes_output(zero3_run):
    from idcrafter.video.config import IDCrafterConfig
    from idcrafter.video.pipeline import IDCrafterPipeline
    from idcrafter.video.presets import build_components

    out, _ = zero3_run
    state = load_file(str(out / "adapter" / "idcrafter_adapter.safetensors"))
    assert state["cross_modal_attn.0.to_out.weight"].abs().max() > 0  # trained away from zero
    refs = [str(ROOT / "examples" / "subject_a.png")]
    pipe = IDCrafterPipeline.from_components(build_components(IDCrafterConfig.from_preset("tiny"), seed=0))
    pipe.set_progress_bar_config(disable=True)
    before = pipe("two squares", refs, generator=torch.Generator().manual_seed(1), output_type="latent").frames
    pipe.transformer.load_adapter(out / "adapter")
    after = pipe("two squares", refs, generator=torch.Generator().manual_seed(1), output_type="latent").frames
    assert (after - before).abs().max() > 1e-4


def test_zero2_and_zero3_give_the_same_losses(zero3_run, data, tmp_path):
    out3, _ = zero3_run
    proc = train(tmp_path / "z2", data, "--max-steps", "3", "--save-every", "3", "--attn-loss-weight", "0.3", ranks=2, zero=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(losses(tmp_path / "z2"), losses(out3), rtol=1e-4, atol=1e-6)


def test_resume_reproduces_an_uninterrupted_run(data, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    proc = train(straight, data, "--max-steps", "6", "--save-every", "3", "--ema-decay", "0.9")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = train(split, data, "--max-steps", "3", "--save-every", "3", "--ema-decay", "0.9")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = train(split, data, "--max-steps", "6", "--save-every", "3", "--ema-decay", "0.9", "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(str(straight / "adapter" / "idcrafter_adapter.safetensors"))
    b = load_file(str(split / "adapter" / "idcrafter_adapter.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    np.testing.assert_allclose(losses(straight), losses(split), rtol=1e-5)
    # keep-last 2 prunes older checkpoints
    assert sorted(p.name for p in (split / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000006"]


def test_undecodable_samples_are_skipped_and_counted(tmp_path):
    data = write_manifest(tmp_path / "d", n=3)
    (tmp_path / "d" / "videos" / "1.mp4").write_bytes(os.urandom(2048))  # corrupt after validation
    proc = train(tmp_path / "run", data, "--max-steps", "3", "--save-every", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["failed_samples"] == 1 and summary["failed_sample_ids"] == ["s1"]
    assert "skipped 1 samples" in proc.stderr


def test_all_bad_data_stops_with_a_clear_error(tmp_path):
    data = write_manifest(tmp_path / "d", n=2)
    for i in range(2):
        (tmp_path / "d" / "videos" / f"{i}.mp4").write_bytes(os.urandom(1024))
    proc = train(tmp_path / "run", data, "--max-steps", "2")
    assert proc.returncode == 2
    assert "every sample" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_arguments_exit_2_before_loading(tmp_path, data):
    bad_manifest = tmp_path / "bad.jsonl"
    bad_manifest.write_text('{"id": "x"\n')
    for extra, message in [
        (["--preset", "wan-2b"], "unknown"),
        (["--frames", "8"], "4n+1"),
        (["--deepspeed_config", str(tmp_path / "nope.json")], "deepspeed_config"),
        (["--trainable", "everything"], "trainable"),
    ]:
        proc = train(tmp_path / "o", data, *extra)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = train(tmp_path / "o", bad_manifest)
    assert proc.returncode == 2 and "bad lines" in proc.stderr, proc.stderr


def test_two_hundred_steps_lower_loss_and_leakage(tmp_path):
    data = write_manifest(tmp_path / "d", n=8)
    out = tmp_path / "run"
    # The tiny base is random, so the whole transformer trains (new modules alone sit on a random DiT).
    proc = train(out, data, "--max-steps", "200", "--save-every", "200", "--attn-loss-weight", "0.3",
                 "--trainable", "full", timeout=3000)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    loss = np.array([r["loss_flow"] for r in rows])
    leak = np.array([r["leakage"] for r in rows])
    assert loss[-20:].mean() < 0.8 * loss[:20].mean()
    assert leak[-20:].mean() < leak[:20].mean() - 0.05


def test_training_from_a_feature_cache_matches_pixels(data, tmp_path):
    """Cached encodings give the same losses as encoding on the fly (same seed, same data order)."""
    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "scripts/cache_features.py", "--preset", "tiny", "--data", str(data),
                           "--out", str(cache)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["written"] == 4
    a, b = tmp_path / "pixels", tmp_path / "cached"
    assert train(a, data, "--max-steps", "2", "--save-every", "2").returncode == 0
    proc = train(b, data, "--max-steps", "2", "--save-every", "2", "--cache", str(cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(losses(a), losses(b), rtol=1e-5)
    # A cache built for other settings is refused.
    proc = train(tmp_path / "other", data, "--max-steps", "1", "--cache", str(cache), "--frames", "5")
    assert proc.returncode == 2 and "cache" in proc.stderr.lower(), proc.stderr[-2000:]


def expected_lr(schedule: str, step: int, lr: float, warmup: int, total: int, ratio: float) -> float:
    """The lr logged after optimizer step `step`: DeepSpeed steps its scheduler after each optimizer
    step, so the value is the schedule at iteration step - 1; its warm-ups last max(2, warmup)."""
    i, w, low = step - 1, max(2, warmup), ratio * lr
    if schedule == "constant":
        return lr * min(1.0, i / w)
    if i < w:
        return low + (lr - low) * i / w
    if schedule == "linear":
        return low + (lr - low) * (total - i) / (total - w)
    return low + (lr - low) * (1 + np.cos(np.pi * min(1.0, (i - w + 1) / (total - w)))) / 2


def logged_lrs(output: Path) -> list[float]:
    return [json.loads(line)["lr"] for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedules_follow_their_formulas_and_resume_continues_them(data, tmp_path):
    import shutil

    from idcrafter.train.ds_config import lr_at

    lr, warmup, total, ratio = 1e-3, 2, 6, 0.1
    extra = ("--max-steps", str(total), "--warmup-steps", str(warmup), "--min-lr-ratio", str(ratio),
             "--save-every", "3", "--keep-last", "5")
    runs = {}
    for schedule in ("constant", "linear", "cosine"):
        runs[schedule] = tmp_path / schedule
        proc = train(runs[schedule], data, *extra, "--lr-schedule", schedule)
        assert proc.returncode == 0, proc.stderr[-3000:]
        want = [expected_lr(schedule, s, lr, warmup, total, ratio) for s in range(1, total + 1)]
        np.testing.assert_allclose(logged_lrs(runs[schedule]), want, rtol=0, atol=1e-9)
        assert want == [lr_at(schedule, s - 1, lr=lr, warmup_steps=warmup, total_steps=total, min_lr_ratio=ratio)
                        for s in range(1, total + 1)]
    import yaml

    saved = yaml.safe_load((runs["cosine"] / "config.yaml").read_text())  # the run's resolved settings
    assert {k: saved[k] for k in ("lr_schedule", "min_lr_ratio", "warmup_steps", "max_steps", "lr", "preset")} == {
        "lr_schedule": "cosine", "min_lr_ratio": ratio, "warmup_steps": warmup, "max_steps": total, "lr": lr,
        "preset": "tiny"}
    cosine = logged_lrs(runs["cosine"])
    assert cosine[:2] == [1e-4, 5.5e-4] and cosine[-1] == pytest.approx(1e-4, abs=1e-12)  # warm-up, floor
    # DeepSpeed's cosine is already decaying on the first step after the warm-up
    np.testing.assert_allclose(cosine[2:5], [8.681980515339464e-4, 5.5e-4, 2.3180194846605365e-4], rtol=1e-12)
    assert logged_lrs(runs["constant"])[1:] == [5e-4, 1e-3, 1e-3, 1e-3, 1e-3]

    # an interrupted cosine run: the step-6 checkpoint never finished; resume continues from step 3
    shutil.rmtree(runs["cosine"] / "checkpoints" / "step_00000006")
    proc = train(runs["cosine"], data, *extra, "--lr-schedule", "cosine", "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((runs["cosine"] / "summary.json").read_text())["resumed_from"] == "step_00000003"
    np.testing.assert_allclose(logged_lrs(runs["cosine"]), cosine, rtol=0, atol=1e-9)
