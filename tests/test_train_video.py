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
    proc = train(out, data, "--max-steps", "3", "--save-every", "3", "--attn-loss-weight", "0.3", "--peak-tflops", "100",
                 ranks=2, zero=3)
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
    for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):  # throughput accounting
        assert row["tokens_per_s"] * row["step_seconds"] == pytest.approx(2 * 48)  # a 3x8x8 / (1x2x2) video per rank
        assert row["mfu"] == pytest.approx(row["tflops_per_gpu"] / 100) and row["tflops_per_gpu"] > 0


def test_exported_adapter_loads_in_the_pipeline_and_changes_output(zero3_run):
    from idcrafter.video.config import IDCrafterConfig
    from idcrafter.video.pipeline import IDCrafterPipeline
    from idcrafter.video.presets import build_components

    out, _ = zero3_run
    state = load_file(str(out / "adapter" / "idcrafter_adapter.safetensors"))
    assert state["cross_modal_attn.0.to_v.weight"].abs().max() > 0  # trained away from zero
    refs = [str(ROOT / "examples" / "subject_a.png")]
    pipe = IDCrafterPipeline.from_components(build_components(IDCrafterConfig.from_preset("tiny"), seed=0))
    pipe.set_progress_bar_config(disable=True)
    before = pipe("two squares", refs, generator=torch.Generator().manual_seed(1), output_type="latent").frames
    pipe.transformer.load_adapter(out / "adapter")
    after = pipe("two squares", refs, generator=torch.Generator().manual_seed(1), output_type="latent").frames
    assert (after - before).abs().max() > 1e-4


# slow (21 s): the validation runs train the same steps under ZeRO-2 and ZeRO-3 and compare them
@pytest.mark.slow
def test_zero2_and_zero3_give_the_same_losses(zero3_run, data, tmp_path):
    out3, _ = zero3_run
    proc = train(tmp_path / "z2", data, "--max-steps", "3", "--save-every", "3", "--attn-loss-weight", "0.3", ranks=2, zero=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(losses(tmp_path / "z2"), losses(out3), rtol=1e-4, atol=1e-6)


# slow (31 s): test_checkpoints resumes the real command line after a kill, test_train_rl resumes RL
@pytest.mark.slow
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
    for extra, message in [  # validation samples need a held-out manifest, and a good one
        (["--validate-every", "2"], "--validate-every 2: give the held-out samples with --validation-data"),
        (["--validate-every", "2", "--validation-data", str(bad_manifest)], "--validation-data"),
    ]:
        proc = train(tmp_path / "o", data, *extra)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert message in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()


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


# slow (35 s): test_vlm_training checks cached against on-the-fly losses with the VLM states too
@pytest.mark.slow
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


@pytest.mark.slow  # 37 s: keeps the CI suite under its 15-minute budget
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


def tensorboard_images(folder: Path) -> dict[str, list[tuple[int, np.ndarray]]]:
    """{tag: [(step, uint8 [H, W, 3])]} of the images in a TensorBoard folder."""
    import io

    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"images": 0})
    events.Reload()
    return {tag: [(e.step, np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB")))
                  for e in events.Images(tag)] for tag in events.Tags()["images"]}


@pytest.fixture(scope="module")
def validation_runs(data, tmp_path_factory):
    """The same 4 steps on 2 ranks with EMA under ZeRO-3 and ZeRO-2, sampling 2 of 3 held-out
    samples with 2 steps at steps 3 and 4 (--validate-every 3, and the last step)."""
    root = tmp_path_factory.mktemp("validation")
    held_out = write_manifest(root / "held_out", n=3, seed=7)
    runs = {}
    for zero in (3, 2):
        runs[zero] = root / f"zero{zero}"
        proc = train(runs[zero], data, "--max-steps", "4", "--save-every", "4", "--lr", "1e-2", "--ema-decay", "0.5",
                     "--validate-every", "3", "--validation-data", str(held_out), "--validation-samples", "2",
                     "--validation-steps", "2", "--seed", "3", ranks=2, zero=zero)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "step 4: 2 validation samples" in proc.stderr
    return held_out, runs


def strip(output: Path, step: int) -> np.ndarray:
    from PIL import Image

    with Image.open(output / "validation" / f"step_{step:08d}.png") as im:
        assert im.mode == "RGB"
        return np.asarray(im)


def test_validation_samples_show_the_trained_model(validation_runs):
    """Strips at steps 3 and 4, one row per held-out sample (2 reference cells + 4 frames of 64 x 64),
    the rows in TensorBoard; the step-4 frames are what the inference pipeline makes with the
    adapter exported at step 4 (EMA weights, same seeds and steps), and not the base model's."""
    from idcrafter.data.manifest import read_samples
    from idcrafter.train.validation import frame_indices
    from idcrafter.utils.media import fit_on_canvas, load_rgb
    from idcrafter.video.config import IDCrafterConfig
    from idcrafter.video.pipeline import IDCrafterPipeline
    from idcrafter.video.presets import build_components

    held_out, runs = validation_runs
    out = runs[3]
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step_00000003.png", "step_00000004.png"]
    strips = {step: strip(out, step) for step in (3, 4)}
    assert all(s.shape == (2 * 64, (2 + 4) * 64, 3) for s in strips.values())
    board = tensorboard_images(out / "tensorboard")
    assert sorted(board) == ["validation/0", "validation/1"]
    for i in range(2):
        assert [s for s, _ in board[f"validation/{i}"]] == [3, 4]
        np.testing.assert_array_equal(board[f"validation/{i}"][1][1], strips[4][64 * i: 64 * (i + 1)])

    pipe = IDCrafterPipeline.from_components(build_components(IDCrafterConfig.from_preset("tiny"), seed=3))
    pipe.set_progress_bar_config(disable=True)
    items = read_samples(held_out)[:2]

    def frames(i):
        video = pipe(items[i].prompt, [s.image for s in items[i].subjects], num_inference_steps=2,
                     generator=torch.Generator().manual_seed(3 + i), output_type="np").frames[0]
        return (video[frame_indices(9)] * 255).round()

    for i in range(2):  # the first columns: each sample's references, fitted on white
        for k, subject in enumerate(items[i].subjects):
            cell = np.asarray(fit_on_canvas(load_rgb(subject.image), 64, 64))
            np.testing.assert_array_equal(strips[4][64 * i: 64 * (i + 1), 64 * k: 64 * (k + 1)], cell)
    base = [frames(i) for i in range(2)]
    pipe.transformer.load_adapter(out / "adapter")
    gap = 0.0
    for i in range(2):
        got = strips[4][64 * i: 64 * (i + 1), 2 * 64:].reshape(64, 4, 64, 3).transpose(1, 0, 2, 3)
        want = frames(i)
        np.testing.assert_allclose(got, want, atol=1, rtol=0)
        gap = max(gap, float(np.abs(want - base[i]).max()))
    assert gap > 10  # the trained adapter shows in the pixels: the strip is not the base model's


def test_ema_validation_and_export_agree_under_zero2_and_zero3(validation_runs):
    """ZeRO-3 keeps small parameters gathered between forwards; the EMA weights reach them too, so
    the exported EMA adapter and the validation samples are those of ZeRO-2."""
    _, runs = validation_runs
    a = load_file(str(runs[3] / "adapter" / "idcrafter_adapter.safetensors"))
    b = load_file(str(runs[2] / "adapter" / "idcrafter_adapter.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)
    for step in (3, 4):
        np.testing.assert_allclose(strip(runs[3], step), strip(runs[2], step), atol=1, rtol=0)
