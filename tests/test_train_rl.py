"""RL post-training end to end: real DeepSpeed engines, tiny preset, a real ToyID reward model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ports import free_port
from safetensors.torch import load_file
from tiny_data import write_manifest

ROOT = Path(__file__).resolve().parents[1]


def train_rl(output: Path, data: Path, *extra: str, ranks: int = 1, timeout: int = 400, port: int | None = None):
    args = ["scripts/train_rl.py", "--branch", "video", "--preset", "tiny", "--data", str(data), "--output", str(output),
            "--deepspeed_config", "ds_configs/zero3.json", "--num-steps", "4", "--window", "2", "--group-size", "4",
            "--lr", "1e-3", "--lora-rank", "4", "--no-progress", *extra]
    port = str(port or free_port())
    if ranks > 1:
        cmd, env = ["deepspeed", "--num_gpus", str(ranks), "--master_port", port, *args], dict(os.environ)
    else:
        cmd = [sys.executable, *args]
        env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from idcrafter.toyworld.embedder import ToyIDEmbedder

    root = tmp_path_factory.mktemp("rl")
    data = write_manifest(root / "data", n=4)
    ToyIDEmbedder().save(root / "toyid")  # random weights: a real model, its scores are just not meaningful
    return root, data


def test_two_ranks_zero3_two_iterations(setup, tmp_path):
    root, data = setup
    out = tmp_path / "run"
    port = free_port()
    proc = train_rl(out, data, "--max-steps", "2", "--save-every", "2", "--reward", "toyid=1",
                    "--reward-option", f"toyid.path={root / 'toyid'}", "--kl-weight", "0.01", "--eval-data", str(data),
                    "--eval-every", "2", "--eval-limit", "2", "--normalise-rewards", "--trainable", "lora",
                    "--peak-tflops", "100", ranks=2, port=port)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # DeepSpeed's CPU allreduce buffers (69 MB a rank in /dev/shm) do not outlive the run.
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("reward_toyid", "clip_fraction", "kl", "window_start", "approx_kl", "policy_loss"):
        assert key in steps[-1], key
    assert all(0 <= r["reward"] <= 1 for r in steps)
    # Throughput: every transformer row of an iteration, counted by hand. Per rank: the rollout's 4
    # sampling steps x 4 samples x 3 guidance passes (no grad), the 2 window steps re-scored with
    # grad and by the KL reference (the LoRA off, no grad): 48 + 24 + 24 rows, each a 2-subject
    # row of the tiny preset; the stream of 2 subjects is encoded 3 times (rollout, update,
    # reference), without grad as only the LoRA trains.
    from idcrafter.video import flops
    from idcrafter.video.config import IDCrafterConfig

    config = IDCrafterConfig.from_preset("tiny")
    count = flops.for_config(config, subjects=2)
    tokens = flops.video_tokens(config.height, config.width, config.num_frames, flops.WanShape.from_config(config.wan).patch)
    for r in steps:
        assert r["tokens_per_s"] * r["step_seconds"] == pytest.approx(2 * 96 * tokens, rel=1e-9)
        work = (48 + 24) * count.cached_forward + 3 * 24 * count.cached_forward + 3 * count.stream
        assert r["tflops_per_gpu"] * r["step_seconds"] * 1e12 == pytest.approx(work, rel=1e-9)
        assert r["mfu"] == pytest.approx(r["tflops_per_gpu"] / 100, rel=1e-12)
    assert [r["step"] for r in rows if "eval_reward" in r] == [0, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    assert (out / "reward_curve.png").stat().st_size > 1000
    assert any((out / "tensorboard").iterdir())
    # Only LoRA trained (policy lora): B left zero would mean no update reached the exported weights.
    lora = load_file(str(next((out / "adapter").rglob("*lora*.safetensors"))))
    b = [v for k, v in lora.items() if "lora_B" in k]
    assert b and max(float(v.abs().max()) for v in b) > 0


def test_bad_arguments_exit_2(setup, tmp_path):
    root, data = setup
    cases = [
        (["--reward", "nonsense=1"], "nonsense"),
        (["--reward", "toyid=0"], "positive"),
        (["--reward", "toyid=abc"], "number"),
        (["--branch", "audio"], "--branch"),
        (["--data", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
        (["--objective", "ppo"], "objective"),
        (["--group-size", "1"], "--group-size"),
        (["--window", "half"], "--window"),
        (["--trainable", "dam"], "--trainable"),
    ]
    for extra, needle in cases:
        proc = train_rl(tmp_path / "bad", data, "--max-steps", "1", "--reward-option", f"toyid.path={root / 'toyid'}",
                        *(["--reward", "toyid=1"] if "--reward" not in extra else []), *extra)
        assert proc.returncode == 2, (extra, proc.stderr[-2000:])
        assert needle in proc.stderr and "Traceback" not in proc.stderr, (extra, proc.stderr[-2000:])
        assert not (tmp_path / "bad").exists()


def rows_of(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "reward" in r]


def test_video_defaults_train_the_identity_modules_against_the_starting_policy(setup, tmp_path):
    """ID-Crafter's RL by default: Flow-GRPO on every sampling step, the identity modules trained,
    the KL reference the policy as RL found it (a frozen copy of those modules, saved with the
    checkpoints). At the first update the policy is that reference (KL 0); after it, it is not.
    A run resumed from its step-1 checkpoint reproduces the uninterrupted run's step 2."""
    root, data = setup
    common = ["--reward", "toyid=1", "--reward-option", f"toyid.path={root / 'toyid'}", "--kl-weight", "0.1",
              "--save-every", "1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    for out, extra in ((straight, ["--max-steps", "2"]), (split, ["--max-steps", "1"]),
                       (split, ["--max-steps", "2", "--resume", "auto"])):
        proc = train_rl(out, data, *common, *extra, "--window", "full")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["policy"] == "new-modules" and summary["objective"] == "grpo"
    rows = rows_of(straight)
    assert rows[0]["kl"] == 0.0 and rows[1]["kl"] > 0
    assert all(r["window_start"] == 0 for r in rows)
    assert (straight / "checkpoints" / "step_00000001" / "start_policy_rank0.pt").is_file()
    again = rows_of(split)
    assert [r["step"] for r in again] == [1, 2]
    for key in ("kl", "reward", "policy_loss"):
        np.testing.assert_allclose(again[1][key], rows[1][key], rtol=1e-5, atol=1e-9)
    # The identity modules trained: the exported stage-3 value projections left zero.
    state = load_file(str(straight / "adapter" / "idcrafter_adapter.safetensors"))
    assert float(state["cross_modal_attn.0.to_v.weight"].abs().max()) > 0


@pytest.mark.parametrize("branch, expected", [
    # ID-Crafter App. A.2 / Tab. S.6 and its Fig. S.7 (800 steps); MultiCrafter supp. Sec. B (IPPO).
    ("video", dict(objective="grpo", window=20, trainable="new-modules", max_steps=800)),
    ("image", dict(objective="gspo", window=2, trainable="lora", max_steps=300)),
])
def test_branch_defaults_are_the_papers(branch, expected, monkeypatch):
    """Options left out take the branch's paper values (--window full becomes the step count);
    options given keep theirs."""
    from idcrafter.cli import train_rl as script

    base = ["--branch", branch, "--data", "d.jsonl", "--output", "o", "--num-steps", "20"]
    args = script.build_parser().parse_args(base)
    script.resolve_branch_defaults(args)
    assert {k: getattr(args, k) for k in expected} == expected
    args = script.build_parser().parse_args([*base, "--max-steps", "7", "--window", "3", "--objective", "grpo"])
    script.resolve_branch_defaults(args)
    assert (args.max_steps, args.window, args.objective) == (7, 3, "grpo")
