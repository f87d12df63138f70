"""The guidance interval (idcrafter.video.guidance): guidance passes only at sigmas in [low, high],
the last guidance term reused elsewhere; its command-line and job-file forms."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_data import video_refs as refs

from idcrafter.render import Job
from idcrafter.utils.cli import InputError
from idcrafter.utils.media import read_video
from idcrafter.video.config import IDCrafterConfig
from idcrafter.video.guidance import GuidanceInterval, as_interval, guided_steps
from idcrafter.video.infer import parse_guidance_interval
from idcrafter.video.pipeline import IDCrafterPipeline
from idcrafter.video.presets import build_components
from idcrafter.video.transformer import to_velocity

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red ball and a blue box"
STEPS = 6
# The tiny preset's 6 shifted sigmas (shift 3): 1, .9375, .857, .75, .6, .375. This interval leaves two
# steps before it (no guidance term yet), guides two, and reuses the term at the last two.
INTERVAL = (0.7, 0.9)
S_IMG, S_TXT = 3.0, 2.0


@pytest.fixture(scope="module")
def pipe():
    pipe = IDCrafterPipeline.from_components(build_components(IDCrafterConfig.from_preset("tiny"), seed=0))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # trained-looking adapter: the subjects change the velocity
        for p in pipe.transformer.adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return pipe


def noise(pipe):
    return pipe.prepare_latents(1, 64, 64, 9, torch.device("cpu"), torch.Generator().manual_seed(3))


def sample(pipe, interval=None, references=True, **kw):
    """Final latents [1, C, F, h, w] of a STEPS-step run from fixed noise."""
    return pipe(PROMPT, refs() if references else [], num_inference_steps=STEPS, guidance_image=S_IMG,
                guidance_text=S_TXT, latents=noise(pipe), output_type="latent", guidance_interval=interval, **kw).frames


def shifted_sigmas(steps: int, shift: float) -> list[float]:
    s = np.linspace(1.0, 1.0 / steps, steps)
    return [*(shift * s / (1 + (shift - 1) * s)).tolist(), 0.0]


@torch.no_grad()
def reference_sampling(pipe, interval, reuse=True):
    """Euler sampling written out from the transformer's three passes: inside the interval the full
    guided velocity, outside v_ref_txt plus the guidance term of the last step inside (none before)."""
    device = torch.device("cpu")
    text, negative = pipe.encode_prompt([PROMPT], device), pipe.encode_prompt([""], device)
    stream = pipe.encode_subjects(refs(), PROMPT, 64, 64, device)
    sigmas = shifted_sigmas(STEPS, pipe.config_idc.flow_shift)

    def velocity(x, sigma, states, subjects):
        t = torch.tensor([sigma * 1000.0])
        out = pipe.transformer(x, t, states, return_dict=False, subject_stream=subjects)[0]
        return to_velocity(pipe.config_idc, out, x, t / 1000.0)

    x, term = noise(pipe), None
    for k in range(STEPS):
        v_cond = velocity(x, sigmas[k], text, stream)
        if interval[0] <= sigmas[k] <= interval[1]:
            v_uncond, v_ref = velocity(x, sigmas[k], negative, None), velocity(x, sigmas[k], negative, stream)
            term = (S_IMG - 1) * (v_ref - v_uncond) + (S_TXT - 1) * (v_cond - v_ref)
            v = v_cond + term
        else:
            v = v_cond if term is None or not reuse else v_cond + term
        x = x + (sigmas[k + 1] - sigmas[k]) * v
    return x


def test_interval_type_and_steps():
    assert as_interval("0.2, 0.8") == as_interval([0.2, 0.8]) == GuidanceInterval(0.2, 0.8)
    assert as_interval(None) is None and str(GuidanceInterval(0.25, 1)) == "0.25,1"
    sigmas = shifted_sigmas(STEPS, 3.0)[:-1]
    np.testing.assert_allclose(sigmas, [1.0, 0.9375, 6 / 7, 0.75, 0.6, 0.375], atol=1e-12)
    assert guided_steps(sigmas, GuidanceInterval(*INTERVAL)) == [False, False, True, True, False, False]
    assert guided_steps(sigmas, GuidanceInterval(0.75, 1.0)) == [True, True, True, True, False, False]  # ends included
    assert guided_steps(sigmas, None) == [True] * STEPS


@pytest.mark.parametrize("value, problem", [
    ("0.8,0.2", "0 <= low <= high <= 1"),
    ("0.2,1.5", "0 <= low <= high <= 1"),
    ("-0.1,0.5", "0 <= low <= high <= 1"),
    ("0.5", "must be LOW,HIGH"),
    ("a,b", "two numbers"),
    ("nan,0.5", "finite number"),
    ([0.1, 0.2, 0.3], "a pair"),
    ([True, 0.5], "finite number"),
])
def test_bad_intervals_are_one_line_input_errors(value, problem):
    with pytest.raises(InputError) as err:
        parse_guidance_interval(value)
    message = str(err.value)
    assert message.startswith("--guidance-interval ") and problem in message and "\n" not in message


def test_the_pipeline_refuses_a_bad_interval(pipe):
    with pytest.raises(ValueError, match="0 <= low <= high <= 1"):
        pipe(PROMPT, refs(), num_inference_steps=1, guidance_interval=(0.9, 0.1), output_type="latent")


def test_default_is_full_guidance_and_an_interval_over_every_sigma_equals_it(pipe):
    default = sample(pipe)
    # The default is the written-out three-pass sampling at every step ...
    torch.testing.assert_close(default, reference_sampling(pipe, (0.0, 1.0)), atol=1e-5, rtol=1e-5)
    # ... and an interval holding every sigma runs exactly the same computation.
    assert torch.equal(sample(pipe, (0.0, 1.0)), default)
    assert torch.equal(sample(pipe, (0.0, 1.0), batched_guidance=False), sample(pipe, batched_guidance=False))
    assert torch.equal(sample(pipe, references=False), sample(pipe, (0.0, 1.0), references=False))
    assert pipe.guidance_interval == GuidanceInterval(0.0, 1.0)


def count_rows(pipe):
    """Transformer calls and the rows (batch entries) they ran, counted by a forward pre-hook."""
    counts = {"calls": 0, "rows": 0}

    def hook(module, args, kwargs):
        counts["calls"] += 1
        counts["rows"] += (args[0] if args else kwargs["hidden_states"]).shape[0]

    return counts, pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("batched", [True, False])
def test_interval_runs_the_expected_passes_and_matches_a_written_out_sampler(pipe, batched):
    counts, handle = count_rows(pipe)
    try:
        got = sample(pipe, INTERVAL, batched_guidance=batched)
    finally:
        handle.remove()
    # 2 guided steps x 3 passes + 4 conditional passes; batched, the 3 passes are one call of 3 rows.
    assert counts == ({"calls": 6, "rows": 10} if batched else {"calls": 10, "rows": 10})
    expected = reference_sampling(pipe, INTERVAL)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # What is checked is large next to the tolerance: the reused term and the interval both matter.
    assert (expected - reference_sampling(pipe, INTERVAL, reuse=False)).abs().max() > 1e-2
    assert (expected - sample(pipe)).abs().max() > 1e-2


def test_interval_without_references_skips_the_negative_pass(pipe):
    counts, handle = count_rows(pipe)
    try:
        sample(pipe, INTERVAL, references=False)
    finally:
        handle.remove()
    assert counts == {"calls": 6, "rows": 2 * 2 + 4}  # classifier-free guidance on the text: 2 rows a guided step


def test_job_files_take_a_guidance_interval(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    base = {"prompt": "p", "refs": ["a.png"], "output": "x.mp4"}
    assert Job.from_dict({**base, "guidance_interval": [0.2, 0.9]}, tmp_path).guidance_interval == (0.2, 0.9)
    assert Job.from_dict({**base, "guidance_interval": "0.2,0.9"}, tmp_path).guidance_interval == (0.2, 0.9)
    assert Job.from_dict(base, tmp_path).guidance_interval is None
    for bad, problem in (([0.9, 0.2], "0 <= low <= high <= 1"), ([0.2], "a pair"), ("x", "LOW,HIGH")):
        with pytest.raises(InputError, match="'guidance_interval'") as err:
            Job.from_dict({**base, "guidance_interval": bad}, tmp_path)
        assert problem in str(err.value), json.dumps(bad)
    with pytest.raises(InputError, match="'guidance_interval' is a video key"):
        Job.from_dict({**base, "output": "x.png", "guidance_interval": [0.2, 0.9]}, tmp_path)


EXAMPLES = [str(ROOT / "examples" / name) for name in ("subject_a.png", "subject_b.png")]


def test_infer_takes_a_guidance_interval(tmp_path, capsys):
    from idcrafter.cli import infer

    args = ["--refs", *EXAMPLES, "--prompt", "p", "--out", str(tmp_path / "x.mp4"), "--dry-run"]
    assert infer.main(args) == 0
    assert json.loads(capsys.readouterr().out)["guidance_interval"] is None
    assert infer.main([*args, "--guidance-interval", "0.2,0.9"]) == 0
    assert json.loads(capsys.readouterr().out)["guidance_interval"] == [0.2, 0.9]
    for extra, message in ((["--guidance-interval", "0.9,0.2"], "--guidance-interval '0.9,0.2': guidance interval"),
                           (["--guidance-interval", "0.2,0.9", "--mode", "image"], "not an option of image mode")):
        assert infer.main([*args, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


def test_render_batch_jobs_reach_the_pipeline_with_their_interval(tmp_path, monkeypatch):
    """Jobs of one seed on the built-in model: an interval holding every sigma renders the default's
    frames exactly; an empty one (no step guided: the conditional pass alone) other frames.

    The frames handed to the encoder are compared, not the files: x264 was seen to encode identical
    frames into two different bitstreams in different processes of the full suite."""
    import idcrafter.utils.media as media
    from idcrafter.cli import render_batch

    written = {}
    write_video = media.write_video

    def capture(frames, path, fps=16):
        written[Path(path).name] = np.asarray(frames).copy()
        return write_video(frames, path, fps)

    monkeypatch.setattr(media, "write_video", capture)  # render_batch imports it when it runs
    for src in EXAMPLES:
        shutil.copy(src, tmp_path)
    job = {"prompt": "two toys", "refs": ["subject_a.png", "subject_b.png"], "seed": 4, "steps": 3}
    intervals = {"default.mp4": None, "every.mp4": [0, 1], "none.mp4": "0,0"}
    (tmp_path / "jobs.jsonl").write_text("".join(
        json.dumps({**job, "output": name, **({} if v is None else {"guidance_interval": v})}) + "\n"
        for name, v in intervals.items()))
    out = tmp_path / "out"
    assert render_batch.main(["--jobs", str(tmp_path / "jobs.jsonl"), "--out", str(out), "--no-progress"]) == 0
    assert sorted(written) == sorted(intervals)
    assert np.array_equal(written["every.mp4"], written["default.mp4"])
    assert np.abs(written["none.mp4"] - written["default.mp4"]).mean() > 1.0 / 255
    assert all(len(read_video(out / name)) == len(written[name]) for name in intervals)


def test_toyworld_measurement_rows():
    """`scripts/benchmark.py guidance-interval --quick`: full guidance and one interval on one
    held-out sample, 2 steps (sigmas 1 and 0.75)."""
    from idcrafter.benchmarks import load_cases
    from idcrafter.toyworld.guidance_interval import pass_share

    sigmas = shifted_sigmas(20, 3.0)[:-1]  # the toy model's 20 steps: 16 at sigma >= 0.5
    assert pass_share(sigmas, GuidanceInterval(0.5, 1.0)) == pytest.approx((3 * 16 + 4) / 60)
    case = load_cases()["guidance-interval"]
    report = case.run(quick=True)
    full, interval = report["rows"]
    assert (full["interval"], full["guided_steps"], full["passes"]) == ("full", 2, 1.0)
    assert (interval["interval"], interval["guided_steps"]) == ("[0.25, 0.95]", 1)
    assert interval["passes"] == pytest.approx(4 / 6)
    assert full["delta_mean"] == full["delta_min"] == 0.0 and 0.0 < full["toyid_mean"] <= 1.0
    assert "| [0.25, 0.95] | 1/2 | 0.67 |" in case.format_table(report)
