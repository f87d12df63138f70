"""Training, caching, guidance and inference with the VLM semantic encoder (ID-Crafter Sec. 3.2) on a
tiny random Qwen2.5-VL written to disk: real scripts, real DeepSpeed (one rank, ZeRO-2), real files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ports import free_port
from safetensors.torch import load_file
from tiny_data import write_manifest

from idcrafter.utils.cli import InputError
from idcrafter.video.vlm import VLMSemanticEncoder, build_tiny_qwen2_5_vl

ROOT = Path(__file__).resolve().parents[1]
REFS = [str(ROOT / "examples" / "subject_a.png"), str(ROOT / "examples" / "subject_b.png")]
PROMPT = "two squares move right"
# High dropout so a few steps of batch 2 meet every case of `VideoTrainingSpec.vlm_conditions`.
TRAIN = ["--max-steps", "4", "--save-every", "4", "--batch-size", "2", "--drop-text", "0.5", "--drop-subjects", "0.5"]


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def train(output: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    """scripts/train_video.py with one rank, launched as plain python (DeepSpeed reads the env)."""
    args = ["scripts/train_video.py", "--preset", "tiny", "--data", str(data), "--output", str(output),
            "--deepspeed_config", "ds_configs/zero2.json", "--lr", "1e-3", "--log-every", "1", "--no-progress", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)


def losses(output: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (output / "metrics.jsonl").read_text().splitlines()]


def one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("vlm") / "tiny-qwen2.5-vl", seed=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_manifest(tmp_path_factory.mktemp("data"), n=4)


@pytest.fixture(scope="module")
def vlm_run(tmp_path_factory, data, qwen) -> Path:
    out = tmp_path_factory.mktemp("run") / "vlm"
    proc = train(out, data, *TRAIN, "--vlm", str(qwen), "--validate-every", "4", "--validation-data", str(data),
                 "--validation-samples", "1", "--validation-steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def encoder(qwen) -> VLMSemanticEncoder:
    return VLMSemanticEncoder.from_pretrained(qwen)


def tiny_pipeline(adapter: Path, vlm: VLMSemanticEncoder | None):
    from idcrafter.video.pipeline import IDCrafterPipeline
    from idcrafter.video.presets import build_components
    from idcrafter.video.transformer import IDCrafterTransformer

    config, _ = IDCrafterTransformer.read_adapter_config(adapter)
    pipe = IDCrafterPipeline.from_components(build_components(config, seed=0), vlm=vlm)
    pipe.transformer.load_adapter(adapter)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------- training
def test_training_with_vlm_trains_the_connector_and_records_the_vlm(vlm_run, data, qwen):
    from idcrafter.video.training import VideoDataArgs, VideoModelArgs, VideoTrainingSpec

    meta = json.loads((vlm_run / "adapter" / "idcrafter_config.json").read_text())
    assert meta["config"]["use_vlm"] is True and meta["config"]["vlm_dim"] == 32  # the tiny Qwen's hidden size
    assert meta["vlm_folder"] == str(qwen.resolve())
    summary = json.loads((vlm_run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["vlm"] == str(qwen)
    assert all(np.isfinite(losses(vlm_run)))
    # The connector the run started from: the same spec builds it again, from the same seed.
    spec = VideoTrainingSpec(VideoModelArgs(preset="tiny", vlm=str(qwen)), VideoDataArgs(data=str(data)))
    start = spec.build_model(torch.device("cpu"), torch.float32).adapter.vlm_connector.state_dict()
    trained = load_file(str(vlm_run / "adapter" / "idcrafter_adapter.safetensors"))
    for name in ("mlp.0.weight", "mlp.2.weight", "norm.weight"):
        moved = (trained[f"vlm_connector.{name}"] - start[name]).abs().max().item()
        assert moved > 1e-4, f"vlm_connector.{name} moved only {moved}"


def test_exported_adapter_reads_the_vlm_in_the_pipeline(vlm_run, encoder):
    adapter = vlm_run / "adapter"
    pipe = tiny_pipeline(adapter, encoder)
    with_vlm = pipe(PROMPT, REFS, generator=torch.Generator().manual_seed(1), num_inference_steps=2, output_type="latent").frames
    for p in pipe.transformer.adapter.vlm_connector.parameters():
        p.data.zero_()
    zeroed = pipe(PROMPT, REFS, generator=torch.Generator().manual_seed(1), num_inference_steps=2, output_type="latent").frames
    assert (with_vlm - zeroed).abs().max() > 1e-3
    without = tiny_pipeline(adapter, None)(PROMPT, REFS, generator=torch.Generator().manual_seed(1), num_inference_steps=2, output_type="latent").frames
    assert (with_vlm - without).abs().max() > 1e-3


def test_validation_samples_read_the_vlm(vlm_run, data, encoder):
    """The step-4 validation frames of a VLM run are the pipeline's with the exported adapter and
    the VLM, not those of a pipeline without it."""
    from PIL import Image

    from idcrafter.data.manifest import read_samples
    from idcrafter.train.validation import frame_indices

    item = read_samples(data)[0]

    def frames(vlm):
        video = tiny_pipeline(vlm_run / "adapter", vlm)(
            item.prompt, [s.image for s in item.subjects], generator=torch.Generator().manual_seed(0),
            num_inference_steps=2, output_type="np").frames[0]
        return (video[frame_indices(9)] * 255).round()

    with Image.open(vlm_run / "validation" / "step_00000004.png") as im:
        strip = np.asarray(im)
    assert strip.shape == (64, (2 + 4) * 64, 3)
    got = strip[:, 2 * 64:].reshape(64, 4, 64, 3).transpose(1, 0, 2, 3)
    np.testing.assert_allclose(got, frames(encoder), atol=1, rtol=0)
    assert np.abs(got - frames(None)).max() > 5  # without the VLM's tokens the frames are other ones


def test_dropout_gives_the_vlm_only_what_each_condition_leaves(vlm_run, data, qwen, encoder):
    """Rows: both kept, prompt dropped, subjects dropped, both dropped (`vlm_conditions` docstring)."""
    from idcrafter.utils.media import load_rgb
    from idcrafter.video.training import VideoDataArgs, VideoModelArgs, VideoTrainingSpec

    spec = VideoTrainingSpec(VideoModelArgs(adapter=str(vlm_run / "adapter"), vlm=str(qwen)), VideoDataArgs(data=str(data)))
    spec.build_model(torch.device("cpu"), torch.float32)
    sample = spec.load_samples()[0]
    images = [load_rgb(s.image) for s in sample.subjects]
    conditions = {"latents": torch.zeros(4, 1), "vlm_inputs": ([sample.prompt] * 4, [images] * 4)}
    states, mask = spec.vlm_conditions(conditions, torch.tensor([False, True, False, True]),
                                       torch.tensor([False, False, True, True]))
    expected = [encoder.encode([sample.prompt], [images]), encoder.encode([""], [images]),
                encoder.encode([sample.prompt], [[]])]
    for row, out in enumerate(expected):
        n = out.lengths()[0]
        assert int(mask[row].sum()) == n and mask[row, :n].all()
        torch.testing.assert_close(states[row, :n], out.states[0], rtol=1e-5, atol=1e-5)
    assert not mask[3].any()  # both dropped: no VLM token, as v_uncond
    full, refs_only, text_only = (out.lengths()[0] for out in expected)
    assert full > refs_only and full > text_only  # the prompt and the references each add tokens


# ---------------------------------------------------------------------------- feature cache
def test_cached_vlm_states_give_the_same_losses(vlm_run, data, qwen, tmp_path):
    cache = tmp_path / "cache"
    proc = run("scripts/cache_features.py", "--preset", "tiny", "--data", str(data), "--out", str(cache),
               "--vlm", str(qwen))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["written"] == 4
    index = json.loads((cache / "index.json").read_text())
    assert {"vlm_states", "vlm_ref_states", "vlm_text_states"} <= set(index["samples"]["s0"]["keys"])
    assert json.loads(index["fingerprint"])["encoders"]["vlm"] == str(qwen.resolve())
    proc = train(tmp_path / "cached", data, *TRAIN, "--vlm", str(qwen), "--cache", str(cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(losses(tmp_path / "cached"), losses(vlm_run), rtol=1e-5)

    # A cache built without the VLM is refused by a --vlm run, in one line, before anything loads.
    plain = tmp_path / "plain"
    proc = run("scripts/cache_features.py", "--preset", "tiny", "--data", str(data), "--out", str(plain))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = train(tmp_path / "refused", data, *TRAIN, "--vlm", str(qwen), "--cache", str(plain))
    one_line_error(proc, "holds no VLM states")
    assert not (tmp_path / "refused").exists()
    # and a VLM cache by a run without --vlm
    one_line_error(train(tmp_path / "refused", data, "--cache", str(cache)), "holds the VLM states of")


# ---------------------------------------------------------------------------- guidance
def test_guidance_passes_receive_the_documented_vlm_tokens(vlm_run, encoder):
    """v_uncond: no VLM token; v_ref: VLM(references, ""); v_ref_txt: VLM(references, prompt)."""
    from idcrafter.utils.media import load_image

    pipe = tiny_pipeline(vlm_run / "adapter", encoder)
    model, device = pipe.transformer, torch.device("cpu")
    received = []
    encode_subjects = model.encode_subjects

    def record(subjects, subject_mask=None, vlm_states=None, vlm_mask=None):
        received.append((vlm_states, vlm_mask))
        return encode_subjects(subjects, subject_mask, vlm_states, vlm_mask)

    model.encode_subjects = record
    stream, ref_stream = pipe.encode_guidance_streams(REFS, PROMPT, 64, 64, device)
    (states, mask), = received  # one call per generation, for both passes that see the references
    images = [load_image(r) for r in REFS]
    for row, prompt in enumerate(["", PROMPT]):  # row 0: v_ref, row 1: v_ref_txt
        alone = encoder.encode([prompt], [images])
        n = alone.lengths()[0]
        assert int(mask[row].sum()) == n
        torch.testing.assert_close(states[row, :n], alone.states[0], rtol=1e-5, atol=1e-5)

    # The guided velocity is the one of three independent passes fed exactly those inputs.
    del model.encode_subjects
    text, negative = pipe.encode_prompt([PROMPT], device), pipe.encode_prompt([""], device)
    subjects = pipe.encode_subject_inputs(REFS, PROMPT, 64, 64, device)["subjects"]
    latents = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([700.0])

    def alone(txt, prompt=None):
        if prompt is None:
            return model(latents, t, txt, return_dict=False)[0]
        out = encoder.encode([prompt], [images])
        return model(latents, t, txt, return_dict=False, subjects=subjects, vlm_states=out.states, vlm_mask=out.mask)[0]

    with torch.no_grad():
        v_uncond, v_ref, v_ref_txt = alone(negative), alone(negative, ""), alone(text, PROMPT)
        expected = v_uncond + 3.0 * (v_ref - v_uncond) + 1.5 * (v_ref_txt - v_ref)
        for batched in (None, pipe.guidance_stream(stream, True, ref_stream)):
            got = pipe.guided_velocity(latents, t, text, negative, stream, 3.0, 1.5, batched, ref_stream=ref_stream)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        # v_ref with the prompt's VLM tokens would differ: the test sees which tokens v_ref reads.
        assert (alone(negative, PROMPT) - v_ref).abs().max() > 1e-4

        # Without references the text pass reads VLM(prompt, no images), the negative pass nothing.
        text_stream = pipe.encode_text_stream(PROMPT, 64, 64, device)
        got = pipe.guided_velocity(latents, t, text, negative, None, 3.0, 2.0, None, text_stream=text_stream)
        out = encoder.encode([PROMPT], [[]])
        placeholder = torch.zeros(1, 1, 16, 1, 8, 8)
        v_txt = model(latents, t, text, return_dict=False, subjects=placeholder, subject_mask=torch.tensor([[False]]),
                      vlm_states=out.states, vlm_mask=out.mask)[0]
        torch.testing.assert_close(got, v_uncond + 2.0 * (v_txt - v_uncond), rtol=1e-4, atol=1e-5)
        assert (v_txt - model(latents, t, text, return_dict=False)[0]).abs().max() > 1e-4


# ---------------------------------------------------------------------------- inference
def test_infer_uses_the_recorded_vlm_or_refuses_in_one_line(vlm_run, tmp_path):
    adapter = vlm_run / "adapter"
    out = tmp_path / "out.mp4"
    common = ["scripts/infer.py", "--preset", "tiny", "--refs", *REFS, "--prompt", PROMPT, "--steps", "2"]
    proc = run(*common, "--adapter", str(adapter), "--out", str(out))
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-3000:]

    moved = tmp_path / "adapter"
    shutil.copytree(adapter, moved)
    meta = json.loads((moved / "idcrafter_config.json").read_text())
    meta["vlm_folder"] = str(tmp_path / "gone" / "tiny-qwen2.5-vl")
    (moved / "idcrafter_config.json").write_text(json.dumps(meta))
    proc = run(*common, "--adapter", str(moved), "--out", str(tmp_path / "no.mp4"))
    one_line_error(proc, "trained with the VLM encoder")
    assert not (tmp_path / "no.mp4").exists()


def test_vlm_checks_before_anything_loads(vlm_run, qwen, data, tmp_path):
    """check_vlm and train_video's validate: recorded folder, hidden size, plain ablation."""
    from idcrafter.cli import train_video
    from idcrafter.video.infer import check_vlm
    from idcrafter.video.transformer import IDCrafterTransformer

    adapter = vlm_run / "adapter"
    config, _ = IDCrafterTransformer.read_adapter_config(adapter)
    assert check_vlm(None, config, adapter) == str(qwen.resolve())
    assert check_vlm(str(qwen), config, adapter) == str(qwen)
    wider = tmp_path / "wider"
    shutil.copytree(qwen, wider)
    cfg = json.loads((wider / "config.json").read_text())
    cfg["text_config"]["hidden_size"] = 48
    (wider / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="hidden size 48, but this model's VLM connector reads 32"):
        check_vlm(str(wider), config, adapter)

    def validate(*extra):
        args = train_video.build_parser().parse_args(["--data", str(data), "--output", str(tmp_path / "o"), *extra])
        train_video.validate(args)
        return args

    assert validate("--adapter", str(adapter)).vlm == str(qwen.resolve())  # the adapter keeps its VLM
    with pytest.raises(InputError, match="hidden size 48, but --adapter .* reads 32"):
        validate("--adapter", str(adapter), "--vlm", str(wider))
    with pytest.raises(InputError, match="plain ablation"):
        validate("--vlm", str(qwen), "--hierarchy", "plain")
    with pytest.raises(InputError, match="not a Qwen2.5-VL model folder"):
        validate("--vlm", str(tmp_path))
