"""Image-branch training end to end: real DeepSpeed ZeRO-3 on 2 CPU ranks for each preset, export,
reload in the pipeline through scripts/infer.py, a PNG; the loss against independent computations;
IPPO (GSPO) through scripts/train_rl.py --branch image; bad input exits 2."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flop_counting import counted
from PIL import Image
from ports import free_port
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SIZE, REF = 32, 16


def launch(script: str, args: list[str], ranks: int = 1, timeout: int = 400) -> subprocess.CompletedProcess:
    port = str(free_port())
    if ranks > 1:
        cmd, env = ["deepspeed", "--num_gpus", str(ranks), "--master_port", port, script, *args], dict(os.environ)
    else:
        cmd = [sys.executable, script, *args]
        env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Toy still images (2 and 1 subjects), and a saved random base folder per tiny preset."""
    from idcrafter.toyworld.world import write_image_dataset
    from mcimage.config import MCImageConfig
    from mcimage.pipeline import MCImagePipeline
    from mcimage.presets import build_tiny_components

    root = tmp_path_factory.mktemp("image")
    cats = ("face", "upper", "lower", "bag")  # One-for-All's categories, each with its own look
    multi = write_image_dataset(root / "multi", 8, seed=0, size=SIZE, ref_size=REF, subjects=(2, 2), categories=cats)
    single = write_image_dataset(root / "single", 8, seed=1, size=SIZE, ref_size=REF, subjects=(1, 1), categories=cats)
    bases = {}
    for preset in ("tiny-multicrafter", "tiny-one-for-all"):
        pipe = MCImagePipeline.from_components(build_tiny_components(MCImageConfig.from_preset(preset), seed=0))
        bases[preset] = pipe.save_pretrained(root / f"base_{preset}")
    return root, multi, single, bases


PRESET_RUNS = {
    # MultiCrafter stage 2 on multi-subject data with the preset's IDAR loss (0.3); One-for-All on
    # single-subject pairs, each keeping its category, resampled 2:2:2:1.
    "tiny-multicrafter": ("multi", ["--stage", "multi"], ["--categories", "face", "upper"]),
    "tiny-one-for-all": ("single", ["--stage", "single", "--lr", "1e-2"], ["--categories", "face", "upper"]),
}


# One-for-All under ZeRO-3 is also run by the validation and draws tests; its row here is slow (31 s)
@pytest.mark.parametrize("preset", [p if p != "tiny-one-for-all" else pytest.param(p, marks=pytest.mark.slow)
                                    for p in PRESET_RUNS])
def test_two_ranks_zero3_export_reload_png(world, tmp_path, preset):
    root, multi, single, bases = world
    data_name, flags, infer_flags = PRESET_RUNS[preset]
    data = multi if data_name == "multi" else single
    out = tmp_path / "run"
    proc = launch("scripts/train_image.py", [
        "--preset", preset, "--base", str(bases[preset]), "--data", str(data), "--output", str(out),
        "--deepspeed_config", "ds_configs/zero3.json", "--size", f"{SIZE}x{SIZE}", "--ref-size", f"{REF}x{REF}",
        "--max-steps", "2", "--batch-size", "2", "--save-every", "2", "--log-every", "1",
        "--no-progress", "--peak-tflops", "100", *flags], ranks=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == 3 and summary["steps"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    # Throughput (mcimage/flops.py): a step is 2 ranks x 2 samples x 64 target tokens (32x32 pixels,
    # 8x8 packed latents); each rank's 2 samples (16x16 references: 16 tokens each, 512 text tokens)
    # cost 3 forwards, with the IDAR shares in the multi-subject stage.
    from mcimage import flops
    from mcimage.config import MCImageConfig

    subjects = 2 if data_name == "multi" else 1
    forward = flops.forward_flops(MCImageConfig.from_preset(preset), 64, 512, 16 * subjects, subjects,
                                  capture=summary["attn_loss_weight"] > 0 and subjects > 1)
    for r in rows:
        assert r["tokens_per_s"] * r["step_seconds"] == pytest.approx(2 * 2 * 64, rel=1e-9)
        assert r["tflops_per_gpu"] * r["step_seconds"] * 1e12 == pytest.approx(2 * 3 * forward, rel=1e-9)
        assert r["tflops_per_gpu"] > 0 and r["mfu"] == pytest.approx(r["tflops_per_gpu"] / 100, rel=1e-12)
    if preset == "tiny-multicrafter":  # the paper's stage 2: lambda 0.3 and lr 1e-5 from the preset
        assert all(0 <= r["leakage"] <= 1 and r["loss_attn"] > 0 for r in rows)
        assert summary["attn_loss_weight"] == 0.3 and rows[0]["lr"] == pytest.approx(1e-5)
    # The exported adapter was gathered from the ZeRO-3 partitions: LoRA B moved off zero.
    weights = load_file(str(out / "adapter" / "mcimage_adapter.safetensors"))
    b = [v for k, v in weights.items() if "lora_B" in k]
    assert b and max(float(v.abs().max()) for v in b) > 0
    assert (out / "training.png").stat().st_size > 1000

    refs = [str(p) for p in sorted((Path(data).parent / "refs").glob("*.png"))[:2]]
    images = {}
    for name, adapter in (("trained", ["--adapter", str(out / "adapter")]), ("base", [])):
        png = tmp_path / f"{name}.png"
        proc = subprocess.run([sys.executable, "scripts/infer.py", "--mode", "image", "--model", str(bases[preset]),
                               *adapter, "--refs", *refs, *infer_flags, "--prompt", "two objects", "--out", str(png),
                               "--size", f"{SIZE}x{SIZE}", "--steps", "2", "--seed", "3"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        with Image.open(png) as im:
            assert im.size == (SIZE, SIZE) and im.mode == "RGB"
            images[name] = np.asarray(im, dtype=np.float32)
    assert np.abs(images["trained"] - images["base"]).max() > 0  # the reloaded adapter is in use


def test_loss_groups_match_independent_forwards(world):
    """Samples needing different ids run as separate forwards; the loss is their count-weighted mean."""
    from idcrafter.data.dataset import collate
    from idcrafter.flow import add_noise, flow_loss, flow_target, sample_timesteps
    from mcimage.training import ImageDataArgs, ImageModelArgs, ImageTrainingSpec

    root, multi, single, bases = world
    # True categories on two-subject samples: samples with other category pairs need other ids.
    spec = ImageTrainingSpec(ImageModelArgs(preset="tiny-one-for-all", overrides={"category_weights": None}),
                             ImageDataArgs(data=str(multi), height=SIZE, width=SIZE, ref_size=(REF, REF)),
                             policy="adapter")
    model = spec.build_model(torch.device("cpu"), torch.float32)
    dataset, _, _ = spec.build_data(0, 1, 0, 4)
    batch = collate([dataset[i] for i in range(4)])
    cond = spec.prepare(batch, torch.device("cpu"))
    loss, metrics = spec.loss(model, cond, torch.Generator().manual_seed(5))

    g = torch.Generator().manual_seed(5)  # replay the draws in the spec's order
    z0 = cond["latents"]
    t = sample_timesteps(4, g, 0.0, 1.0, spec.shift)
    noise = torch.randn(z0.shape, generator=g)
    cats = spec.sample_categories(cond, g)
    expected = 0.0
    guidance = torch.full((1,), spec.config.guidance_scale)
    for i in range(4):
        n = cond["counts"][i]
        with torch.no_grad():
            v = model(add_noise(z0, noise, t)[i : i + 1], cond["ref_latents"][i : i + 1, :n], cond["text"][i : i + 1],
                      cond["pooled"][i : i + 1], t[i : i + 1], guidance, target_hw=cond["target_hw"],
                      ref_hws=[cond["ref_hw"]] * n, categories=list(cats[i]))
        expected += float(flow_loss(v, flow_target(z0, noise)[i : i + 1])) / 4
    assert abs(float(loss.detach()) - expected) < 1e-5
    assert metrics["forwards"] == len({(cond["counts"][i], cats[i]) for i in range(4)})
    assert all(len(set(c)) == len(c) for c in cats)  # distinct categories within a sample


def test_scheduler_shift_matches_the_pipeline_schedule():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from idcrafter.flow.sde import sigma_schedule
    from mcimage.training import scheduler_shift

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    mu = calculate_shift(1024, 256, 4096, 0.5, 1.15)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8), mu=mu)
    ours = sigma_schedule(8, scheduler_shift(sched.config, 1024))
    assert torch.allclose(ours.double(), sched.sigmas.double(), atol=1e-6)
    static = FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert scheduler_shift(static.config, 1024) == 3.0


@pytest.mark.slow  # kept out of CI for time; run with -m slow
def test_rl_image_gspo_two_iterations(world, tmp_path):
    from idcrafter.toyworld.embedder import ToyIDEmbedder

    root, multi, single, bases = world
    ToyIDEmbedder().save(tmp_path / "toyid")  # random weights: a real model whose scores mean little
    out = tmp_path / "rl"
    proc = launch("scripts/train_rl.py", [
        "--branch", "image", "--objective", "gspo", "--preset", "tiny-multicrafter", "--base",
        str(bases["tiny-multicrafter"]), "--data", str(multi), "--eval-data", str(multi), "--output", str(out),
        "--size", f"{SIZE}x{SIZE}", "--ref-size", f"{REF}x{REF}", "--reward", "toyid=1",
        "--reward-option", f"toyid.path={tmp_path / 'toyid'}", "--group-size", "3", "--num-steps", "4",
        "--window", "2", "--max-steps", "2", "--save-every", "2", "--lr", "1e-2", "--kl-weight", "0.01",
        "--eval-every", "2", "--eval-limit", "2", "--deepspeed_config", "ds_configs/zero3.json", "--no-progress",
        "--peak-tflops", "100"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    # Throughput, rows counted by hand: 4 sampling steps x 3 samples, the 2 window steps re-scored
    # with grad and by the KL reference (LoRA off): 12 + 6 plain rows, 6 trained (3 forwards each);
    # a row is 64 target tokens with 2 references of 16 tokens and 512 text tokens in context.
    from mcimage import flops
    from mcimage.config import MCImageConfig

    forward = flops.forward_flops(MCImageConfig.from_preset("tiny-multicrafter"), 64, 512, 2 * 16, 2)
    for r in steps:
        assert r["tokens_per_s"] * r["step_seconds"] == pytest.approx(24 * 64, rel=1e-9)
        assert r["tflops_per_gpu"] * r["step_seconds"] * 1e12 == pytest.approx((18 + 3 * 6) * forward, rel=1e-9)
        assert r["mfu"] == pytest.approx(r["tflops_per_gpu"] / 100, rel=1e-12)
    for key in ("reward_toyid", "clip_fraction", "kl", "ratio", "policy_loss", "window_start"):
        assert key in steps[-1], key
    assert [r["step"] for r in rows if "eval_reward" in r] == [0, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["objective"] == "gspo" and summary["steps"] == 2
    weights = load_file(str(out / "adapter" / "mcimage_adapter.safetensors"))
    assert max(float(v.abs().max()) for k, v in weights.items() if "lora_B" in k) > 0


def test_bad_input_exit_2(world, tmp_path, capsys):
    from idcrafter.cli import train_image

    root, multi, single, bases = world
    video = tmp_path / "video.jsonl"
    video.write_text(json.dumps({"id": "v", "video": "clip.mp4", "prompt": "p",
                                 "subjects": [{"image": "ref.png", "category": "face"}]}) + "\n")
    (tmp_path / "clip.mp4").write_bytes(b"")
    Image.new("RGB", (16, 16), "white").save(tmp_path / "ref.png")
    base = ["--data", str(multi), "--output", str(tmp_path / "bad"), "--size", f"{SIZE}x{SIZE}"]
    cases = [
        (["--preset", "nope"], "--preset"),
        (["--preset", "tiny-one-for-all"], "category"),  # condition ids, toy categories, no --random-categories
        (["--stage", "single", "--attn-loss-weight", "0.3"], "--stage multi"),
        (["--stage", "twice"], "--stage"),
        (["--size", "30x30"], "multiples of 16"),
        (["--trainable", "everything"], "--trainable"),
        (["--set", "flux_layers"], "KEY=VALUE"),
        (["--set", "adapter=banana"], "adapter"),
        (["--category-weights", "face=2,hat=1"], "hat"),
        (["--category-weights", "face=nan"], "finite"),
        (["--validate-every", "2"], "--validate-every 2: give the held-out samples with --validation-data"),
        (["--validate-every", "2", "--validation-data", str(video)], "is a video"),
    ]
    for extra, needle in cases:
        try:
            code = train_image.main([*base, *extra])
        except SystemExit as usage_error:  # argparse's own checks (choices) exit from parse_args
            code = usage_error.code
        err = capsys.readouterr().err
        assert code == 2, (extra, err)
        assert needle in err and len(err.strip().splitlines()) == 1, (extra, err)
    code = train_image.main(["--data", str(video), "--output", str(tmp_path / "bad")])
    assert code == 2 and "videos" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_a_loaded_adapter_brings_its_config(world, tmp_path):
    """BASE/mcimage_adapter's config wins over the preset; only IDAR capture follows the request."""
    from idcrafter.utils.errors import ConfigError
    from mcimage.config import MCImageConfig
    from mcimage.pipeline import MCImagePipeline
    from mcimage.presets import build_tiny_components
    from mcimage.training import ImageDataArgs, ImageModelArgs, ImageTrainingSpec

    root, multi, single, bases = world
    plain = MCImageConfig.from_preset("tiny-multicrafter", adapter="none", idar=False)
    base = MCImagePipeline.from_components(build_tiny_components(plain, seed=0)).save_pretrained(tmp_path / "plain")
    data = ImageDataArgs(data=str(multi), height=SIZE, width=SIZE, ref_size=(REF, REF))
    spec = ImageTrainingSpec(ImageModelArgs(preset="tiny-multicrafter", base=str(base), attn_loss_weight=0.3), data,
                             policy="all")
    model = spec.build_model(torch.device("cpu"), torch.float32)
    assert spec.config.adapter == "none" and spec.config.idar and model.mc_config == spec.config
    assert sorted(n for n, p in model.processors.items() if p.capture) == ["transformer_blocks.0", "transformer_blocks.1"]
    spec = ImageTrainingSpec(ImageModelArgs(preset="tiny-multicrafter", base=str(base), overrides={"dam": True}), data,
                             policy="all")
    with pytest.raises(ConfigError, match="dam"):
        spec.build_model(torch.device("cpu"), torch.float32)


def _loss_backward(spec, model, cond: dict, metrics: dict) -> None:
    """One training step's loss (seed 0) and backward; its metrics go into `metrics`."""
    loss, step_metrics = spec.loss(model, cond, torch.Generator().manual_seed(0))
    loss.backward()
    metrics.update(step_metrics)


def test_idar_with_gradient_checkpointing_gives_the_same_gradients(world):
    """The recomputation in the backward sees the same capture (it is a forward argument), so
    checkpointed IDAR training equals plain training."""
    from idcrafter.data.dataset import collate
    from mcimage import flops
    from mcimage.training import ImageDataArgs, ImageModelArgs, ImageTrainingSpec

    root, multi, single, bases = world
    grads = {}
    for checkpointing in (False, True):
        spec = ImageTrainingSpec(ImageModelArgs(preset="tiny-multicrafter", attn_loss_weight=0.3),
                                 ImageDataArgs(data=str(multi), height=SIZE, width=SIZE, ref_size=(REF, REF)),
                                 policy="all")
        model = spec.build_model(torch.device("cpu"), torch.float32)
        params = spec.trainable_parameters(model, "all")
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        dataset, _, _ = spec.build_data(0, 1, 0, 4)
        cond = spec.prepare(collate([dataset[i] for i in range(4)]), torch.device("cpu"))
        metrics = {}
        counted_flops = counted(functools.partial(_loss_backward, spec, model, cond, metrics))
        assert float(metrics["loss_attn"]) > 0
        grads[checkpointing] = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
        # The analytic work: 4 samples of 64 target tokens, 2 references of 16 tokens, 512 text
        # tokens, IDAR shares; 3 forwards a step, 4 with checkpointing. torch counts 8-10% more:
        # the attention backward recomputes Q K^T (2.5x the attention forward, which is most of
        # this tiny model's work) and the share chunks are recomputed in the backward.
        tokens, work = spec.work(cond, checkpointing)
        forward = flops.forward_flops(spec.config, 64, 512, 32, 2, capture=True)
        assert tokens == 4 * 64 and work == 4 * (4 if checkpointing else 3) * forward
        assert 1.05 < counted_flops / work < 1.12
    assert grads[False].abs().max() > 0
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # kept out of CI for time; run with -m slow
def test_one_for_all_draws_categories_in_the_paper_ratio(tmp_path):
    """One-for-All resamples its single-subject pairs 2:2:2:1 by face / upper / lower / bag (App. H)
    whatever the data's own counts; every drawn sample is logged (draws/rank0.jsonl) with its
    true category. A batch shares its category (one forward), so the category is drawn per batch:
    the 60 batches are the independent draws, and their counts fit the weights (chi-square, 3 dof,
    below 11.34: p = 0.01) and not a uniform draw or the data's own counts (above 7.81: p = 0.05)."""
    from idcrafter.toyworld.world import write_image_dataset

    cats = ("face", "upper", "lower", "bag")
    data = write_image_dataset(tmp_path / "data", 48, seed=4, size=SIZE, ref_size=REF, subjects=(1, 1), categories=cats)
    out = tmp_path / "run"
    proc = launch("scripts/train_image.py", [
        "--preset", "tiny-one-for-all", "--data", str(data), "--output", str(out), "--stage", "single",
        "--deepspeed_config", "ds_configs/zero2.json", "--size", f"{SIZE}x{SIZE}", "--ref-size", f"{REF}x{REF}",
        "--max-steps", "60", "--batch-size", "8", "--save-every", "60", "--log-every", "20", "--no-progress"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "draws" / "rank0.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 61)) and all(len(r["ids"]) == 8 for r in rows)
    manifest = {json.loads(line)["id"]: json.loads(line)["subjects"][0]["category"]
                for line in data.read_text().splitlines()}
    drawn = [c[0] for r in rows for c in r["categories"]]
    assert drawn == [manifest[i] for r in rows for i in r["ids"]]  # true categories, not random ones
    per_batch = [{c[0] for c in r["categories"]} for r in rows]
    assert all(len(b) == 1 for b in per_batch)
    batches = [b.pop() for b in per_batch]
    counts = np.array([batches.count(c) for c in cats], dtype=np.float64)
    in_data = np.array([list(manifest.values()).count(c) for c in cats], dtype=np.float64)

    def chi2(p):
        expected = len(batches) * np.asarray(p) / np.sum(p)
        return float(((counts - expected) ** 2 / expected).sum())

    assert chi2([2, 2, 2, 1]) < 11.34, (counts, in_data)
    assert chi2(in_data) > 7.81 or np.allclose(in_data / in_data.sum(), [2 / 7, 2 / 7, 2 / 7, 1 / 7], atol=0.05)
    assert chi2([1, 1, 1, 1]) > 7.81, counts


@pytest.mark.slow  # kept out of CI for time; run with -m slow
def test_validation_samples_show_the_trained_model(world, tmp_path):
    """One-for-All on 2 ranks under ZeRO-3 with --validate-every 2: strips at steps 2 and 3 (the
    last), one row per held-out sample (its 2 references on white, then the 32 x 32 image), the
    rows in TensorBoard; the step-3 images are what the inference pipeline makes with the adapter
    exported at step 3 (same categories, seeds, steps, size and reference canvas)."""
    import io

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from idcrafter.data.manifest import read_samples
    from idcrafter.utils.media import fit_on_canvas, load_rgb
    from mcimage.pipeline import MCImagePipeline

    root, multi, single, bases = world
    base = bases["tiny-one-for-all"]
    out = tmp_path / "run"
    proc = launch("scripts/train_image.py", [
        "--preset", "tiny-one-for-all", "--base", str(base), "--data", str(single), "--output", str(out),
        "--deepspeed_config", "ds_configs/zero3.json", "--size", f"{SIZE}x{SIZE}", "--ref-size", f"{REF}x{REF}",
        "--max-steps", "3", "--batch-size", "2", "--save-every", "3", "--log-every", "1", "--no-progress",
        "--stage", "single", "--lr", "1e-2", "--seed", "5", "--validate-every", "2", "--validation-data", str(multi),
        "--validation-samples", "2", "--validation-steps", "2"], ranks=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 3: 2 validation samples" in proc.stderr
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step_00000002.png", "step_00000003.png"]
    strips = {}
    for step in (2, 3):
        with Image.open(out / "validation" / f"step_{step:08d}.png") as im:
            assert im.mode == "RGB" and im.size == ((2 + 1) * SIZE, 2 * SIZE)
            strips[step] = np.asarray(im)
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["validation/0", "validation/1"]
    for i in range(2):
        logged = events.Images(f"validation/{i}")
        assert [e.step for e in logged] == [2, 3]
        row = np.asarray(Image.open(io.BytesIO(logged[-1].encoded_image_string)).convert("RGB"))
        np.testing.assert_array_equal(row, strips[3][SIZE * i: SIZE * (i + 1)])

    items = read_samples(multi)[:2]
    pipe = MCImagePipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)

    def image(i):
        s = items[i]
        out_i = pipe(s.prompt, [x.image for x in s.subjects], [x.category for x in s.subjects], height=SIZE, width=SIZE,
                     num_inference_steps=2, generator=torch.Generator().manual_seed(5 + i), output_type="np",
                     ref_size=(REF, REF)).images[0]
        return (out_i * 255).round()

    before = [image(i) for i in range(2)]
    pipe = MCImagePipeline.from_pretrained(base, adapter=out / "adapter")
    pipe.set_progress_bar_config(disable=True)
    gap = 0.0
    for i in range(2):
        cells = strips[3][SIZE * i: SIZE * (i + 1)]
        for k, subject in enumerate(items[i].subjects):
            want_ref = np.asarray(fit_on_canvas(load_rgb(subject.image), SIZE, SIZE))
            np.testing.assert_array_equal(cells[:, SIZE * k: SIZE * (k + 1)], want_ref)
        want = image(i)
        np.testing.assert_allclose(cells[:, 2 * SIZE:], want, atol=1, rtol=0)
        gap = max(gap, float(np.abs(want - before[i]).max()))
    assert gap > 10  # the trained adapter shows in the pixels: the strip is not the base model's
