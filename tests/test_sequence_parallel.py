"""Sequence parallelism (idcrafter.core.sequence_parallel): group layout, size checks, and two gloo
ranks splitting the tiny transformer's video tokens giving the single-rank output, IDAR shares and
every gradient."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sp_worker
import torch
from ports import free_port

from idcrafter.core.sequence_parallel import sp_layout, sp_size_problem
from idcrafter.utils.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_layout_is_deepspeeds_consecutive_groups():
    # 8 ranks, groups of 4: ranks 0-3 and 4-7 each render one sample; rank 6 is place 2 of group 1.
    assert [sp_layout(r, 8, 4) for r in (0, 3, 4, 6)] == [(0, 0, 2), (3, 0, 2), (0, 1, 2), (2, 1, 2)]
    assert sp_layout(1, 2, 1) == (0, 1, 2)


def test_size_problems_name_the_number():
    assert sp_size_problem(2, 4, heads=12, tokens=32760) is None
    assert sp_size_problem(3, 4) == "3 does not divide the 4 ranks launched"
    assert sp_size_problem(0, 4) == "must be at least 1, got 0"
    assert sp_size_problem(8, 8, heads=12) == "8 does not divide the model's 12 attention heads"
    assert "does not divide the 45 video tokens" in sp_size_problem(2, 2, heads=2, tokens=45)


def test_more_ranks_than_heads_is_refused():
    model = sp_worker.build()  # 2 heads
    sp = type("SP", (), {"size": 4})()
    with pytest.raises(ConfigError, match="size 4 does not divide the model's 2 attention heads"):
        model.enable_sequence_parallel(sp)


def run_two_ranks(out: Path, *extra: str) -> dict[str, torch.Tensor]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "tests/sp_worker.py", str(out), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


# Activation checkpointing recomputes blocks (and their collectives) in backward, and stage 3 on its
# own projections takes the other path of the processor; slow: each a second launch.
@pytest.mark.parametrize("checkpointing, form", [(False, "attn2"), pytest.param(True, "attn2", marks=pytest.mark.slow),
                                                 pytest.param(False, "own", marks=pytest.mark.slow)],
                         ids=["plain", "checkpointed", "own-projections"])
def test_two_ranks_equal_one(tmp_path, checkpointing, form):
    extra = (("--checkpointing",) if checkpointing else ()) + (("--own",) if form == "own" else ())
    got = run_two_ranks(tmp_path / "sp2.pt", *extra)
    ref = sp_worker.forward_backward(sp_worker.build(form), checkpointing)
    # output, loss, the 2 blocks' stage-3 shares and a gradient for every parameter (base and adapter)
    assert set(got) == set(ref)
    grads = [k for k in ref if k.startswith("grad.")]
    assert len(grads) == sum(1 for _ in sp_worker.build(form).parameters())
    assert {k for k in ref if k.startswith("share.")} == {"share.blocks.0.stage3", "share.blocks.1.stage3"}
    assert ref["share.blocks.0.stage3"].shape == (1, 2, 48)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-5, msg=key)
    # the comparison is not of zeros: stage 3 and its gradients are live
    assert ref["grad.adapter.cross_modal_attn.0.to_v.weight"].abs().max() > 1e-3
    assert ref["grad.blocks.0.attn1.to_q.weight"].abs().max() > 1e-4


def test_two_ranks_render_the_single_rank_latents(tmp_path):
    got = run_two_ranks(tmp_path / "pipe.pt", "--pipeline")
    with torch.no_grad():
        ref = sp_worker.render(sp_worker.build_pipeline())
    # 2 steps x 1 batched call of the 3 guidance passes, each rank's blocks on 24 of the 48 tokens
    assert got["block_tokens"].tolist() == [24, 24]
    assert ref["latents"].shape == (1, 16, 3, 8, 8) and ref["latents"].abs().max() > 1.0
    torch.testing.assert_close(got["latents"], ref["latents"], rtol=0, atol=1e-5)


EXAMPLES = [str(ROOT / "examples" / "subject_a.png"), str(ROOT / "examples" / "subject_b.png")]


def infer(*args: str, ranks: int = 1, world: str | None = None) -> subprocess.CompletedProcess:
    """scripts/infer.py on the tiny preset: plain python, or `torchrun --nproc_per_node ranks`;
    `world` fakes the WORLD_SIZE a launcher sets (for the checks that run before anything starts)."""
    base = ["scripts/infer.py", "--preset", "tiny", "--refs", *EXAMPLES, "--prompt", "a red cat", "--steps", "2", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if world is not None:
        env["WORLD_SIZE"] = world
    launch = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(free_port())]
    cmd = [sys.executable, *(launch if ranks > 1 else []), *base]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, world, message", [
    (("--sp-size", "2"), None, "--sp-size 2: one video is rendered by all ranks together; launch 2 "
                               "(torchrun --nproc_per_node 2), not 1"),
    (("--sp-size", "4"), "4", "--sp-size 4: 4 does not divide the model's 2 attention heads"),
    (("--sp-size", "2", "--size", "48x48", "--frames", "1"), "2",
     "--sp-size 2: 2 does not divide the 9 video tokens of a sample (choose frames / size)"),
    (("--sp-size", "2", "--cpu-offload"), "2", "--cpu-offload with --sp-size: each rank holds the whole model"),
    (("--sp-size", "0"), None, "--sp-size"),
], ids=["not-launched", "heads", "tokens", "offload", "zero"])
def test_bad_sp_size_is_one_line(tmp_path, args, world, message):
    proc = infer("--out", str(tmp_path / "x.mp4"), "--dry-run", *args, world=world)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


@pytest.mark.slow  # two launches (~40 s); test_two_ranks_render_the_single_rank_latents covers the numbers
def test_infer_on_two_ranks_writes_the_single_rank_video(tmp_path):
    from idcrafter.utils.media import read_video

    one, two = tmp_path / "one.mp4", tmp_path / "two.mp4"
    assert infer("--out", str(one)).returncode == 0
    proc = infer("--out", str(two), "--sp-size", "2", ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (torch.as_tensor(read_video(str(p), 9)).int() for p in (one, two))
    assert a.shape == (9, 64, 64, 3) and (a - b).abs().max() == 0


def write_jobs(folder: Path) -> Path:
    """3 video jobs on the tiny model; the last one's 48x48 x 1 frame is 9 tokens, not divisible by 2."""
    lines = [{"prompt": f"scene {i}", "refs": EXAMPLES[: 1 + i % 2], "output": f"v{i}.mp4", "seed": i, "steps": 2}
             for i in range(2)]
    lines.append({"prompt": "odd", "refs": EXAMPLES[:1], "output": "odd.mp4", "size": "48x48", "frames": 1, "steps": 2})
    path = folder / "jobs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def render_batch(jobs: Path, out: Path, *extra: str, ranks: int = 1, world: str | None = None):
    args = ["scripts/render_batch.py", "--preset", "tiny", "--jobs", str(jobs), "--out", str(out), "--no-progress", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if world is not None:
        env["WORLD_SIZE"] = world
    launch = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(free_port())]
    cmd = [sys.executable, *(launch if ranks > 1 else []), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)


def test_render_batch_bad_sp_size_is_one_line(tmp_path):
    proc = render_batch(write_jobs(tmp_path), tmp_path / "out", "--sp-size", "2", world="3")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --sp-size 2: 2 does not divide the 3 ranks launched"]


@pytest.mark.slow  # 4 + 1 processes (~1 min)
def test_render_batch_groups_of_two_ranks_render_the_single_rank_videos(tmp_path):
    from idcrafter.utils.media import read_video

    jobs = write_jobs(tmp_path)
    proc = render_batch(jobs, tmp_path / "sp", "--sp-size", "2", ranks=4)
    assert proc.returncode == 1, proc.stderr[-3000:]  # the odd job fails, the others are rendered
    summary = json.loads((tmp_path / "sp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and sorted(summary["rendered"]) == ["v0.mp4", "v1.mp4"]
    assert [f["output"] for f in summary["failed"]] == ["odd.mp4"]
    assert "9 video tokens, not divisible by --sp-size 2" in summary["failed"][0]["message"]
    single = render_batch(jobs, tmp_path / "one")
    assert single.returncode == 0, single.stderr[-3000:]
    for name in ("v0.mp4", "v1.mp4"):
        a, b = (torch.as_tensor(read_video(str(root / name), 9)).int() for root in (tmp_path / "one", tmp_path / "sp"))
        assert a.shape == (9, 64, 64, 3) and (a - b).abs().max() == 0


# ------------------------------------------------------------------ training (DeepSpeed, ZeRO-3)
def train(out: Path, data: Path, *extra: str, ranks: int = 1, zero: int = 3, steps: int = 3) -> subprocess.CompletedProcess:
    """scripts/train_video.py through tests/sp_train_worker.py (which records every full gradient into
    out/grads.pt): 3 steps of full fine-tuning of the tiny preset with the IDAR loss, 2 subjects a sample.

    lr 1e-4: AdamW moves an element whose gradient is near zero by up to lr whatever its size, so the
    1e-8 differences of summation order in such gradients reach a fraction of lr in the weights."""
    args = ["tests/sp_train_worker.py", "--preset", "tiny", "--data", str(data), "--output", str(out),
            "--deepspeed_config", f"ds_configs/zero{zero}.json", "--lr", "1e-4", "--log-every", "1", "--no-progress",
            "--max-steps", str(steps), "--save-every", str(steps), "--attn-loss-weight", "0.3", "--trainable", "full", *extra]
    port = str(free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1", SP_GRADS=str(out / "grads.pt"))
    if ranks > 1:
        cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", port, *args]
    else:
        cmd = [sys.executable, *args]
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_training(one: Path, two: Path, steps: int = 3) -> None:
    """Loss, flow and IDAR losses, leakage (from the IDAR shares), every gradient at every step and the
    exported adapter of the two runs agree to 1e-5."""
    from safetensors.torch import load_file

    rows_1, rows_2 = metrics(one), metrics(two)
    assert [r["step"] for r in rows_1] == [r["step"] for r in rows_2] == list(range(1, steps + 1))
    for a, b in zip(rows_1, rows_2):
        for key in ("loss", "loss_flow", "loss_attn", "leakage"):
            assert abs(a[key] - b[key]) < 1e-5, (a["step"], key, a[key], b[key])
    grads_1, grads_2 = torch.load(one / "grads.pt", weights_only=True), torch.load(two / "grads.pt", weights_only=True)
    # one record per optimizer step, a gradient for every parameter of the model (base and adapter)
    assert len(grads_1) == len(grads_2) == steps
    assert len(grads_1[0]) == sum(1 for _ in sp_worker.build().parameters())
    for step, (g1, g2) in enumerate(zip(grads_1, grads_2)):
        assert set(g1) == set(g2)
        for name in g1:
            torch.testing.assert_close(g2[name], g1[name], rtol=0, atol=1e-5, msg=f"step {step + 1} {name}")
    assert grads_1[0]["adapter.cross_modal_attn.0.to_v.weight"].abs().max() > 1e-2  # live, not zeros
    w1, w2 = (load_file(str(run / "adapter" / "idcrafter_adapter.safetensors")) for run in (one, two))
    assert set(w1) == set(w2) and len(w1) > 20
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-5, msg=name)
    assert w1["cross_modal_attn.0.to_v.weight"].abs().max() > 5e-5  # steps of 1e-4 away from zero


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tiny_data import write_manifest

    return write_manifest(tmp_path_factory.mktemp("data"), n=2)


@pytest.mark.parametrize("zero", [3, pytest.param(2, marks=pytest.mark.slow)])
def test_zero_training_on_a_sequence_group_of_two_equals_one_rank(tmp_path, data, zero):
    one, two = tmp_path / "one", tmp_path / "two"
    proc = train(one, data, zero=zero)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = train(two, data, "--sp-size", "2", ranks=2, zero=zero)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == zero
    assert_same_training(one, two)


@pytest.mark.slow  # 2 + 4 ranks (~2 min)
def test_two_sequence_groups_of_two_equal_two_data_parallel_ranks(tmp_path, tmp_path_factory):
    """4 ranks, --sp-size 2: two groups, each one sample of the batch; the same as 2 plain data-parallel
    ranks, whose gradients DeepSpeed averages."""
    from tiny_data import write_manifest

    data = write_manifest(tmp_path_factory.mktemp("data4"), n=4)
    dp, both = tmp_path / "dp", tmp_path / "sp_dp"
    proc = train(dp, data, ranks=2, steps=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = train(both, data, "--sp-size", "2", ranks=4, steps=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_same_training(dp, both, steps=2)


@pytest.mark.parametrize("script, extra, world, message", [
    ("train_video", (), None, "--sp-size 2: 2 does not divide the 1 ranks launched"),
    ("train_video", (), "4", None),
    ("train_video", ("--frames", "1", "--size", "48x48"), "2",
     "--sp-size 2: 2 does not divide the 9 video tokens of a sample (choose frames / size)"),
    ("train_rl", ("--branch", "image"), "2", "--sp-size applies to the video branch only"),
], ids=["not-launched", "heads", "tokens", "rl-image"])
def test_bad_training_sp_size_is_one_line(tmp_path, data, script, extra, world, message):
    size = "4" if world == "4" else "2"
    message = message or "--sp-size 4: 4 does not divide the model's 2 attention heads"
    args = [f"scripts/{script}.py", "--data", str(data), "--output", str(tmp_path / "run"), "--sp-size", size, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    if world is not None:
        env["WORLD_SIZE"] = world
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [f"error: {message}"]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # 1 + 2 ranks of RL (~1.5 min)
def test_rl_on_a_sequence_group_of_two_equals_one_rank(tmp_path, data):
    from idcrafter.toyworld.embedder import ToyIDEmbedder

    ToyIDEmbedder().save(tmp_path / "toyid")  # random weights: a real reward model
    args = ["scripts/train_rl.py", "--branch", "video", "--preset", "tiny", "--data", str(data),
            "--deepspeed_config", "ds_configs/zero3.json", "--num-steps", "4", "--window", "2", "--group-size", "4",
            "--lr", "1e-4", "--lora-rank", "4", "--no-progress", "--max-steps", "2", "--save-every", "2",
            "--reward", "toyid=1", "--reward-option", f"toyid.path={tmp_path / 'toyid'}", "--kl-weight", "0.01",
            "--eval-data", str(data), "--eval-every", "2", "--eval-limit", "2", "--trainable", "lora"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, *args, "--output", str(tmp_path / "one")], cwd=ROOT, capture_output=True,
                         text=True, timeout=400, env=dict(env, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                                                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())))
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), *args, "--output",
                          str(tmp_path / "two"), "--sp-size", "2"], cwd=ROOT, capture_output=True, text=True,
                         timeout=400, env=env)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    rows_1, rows_2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in rows_1] == [r["step"] for r in rows_2] == [0, 1, 2]
    for a, b in zip(rows_1, rows_2):
        assert set(a) == set(b)
        for key in a:
            assert abs(a[key] - b[key]) < 1e-5, (a["step"], key, a[key], b[key])
    from safetensors.torch import load_file

    w1, w2 = (load_file(str(tmp_path / run / "adapter" / "lora" / "adapter_model.safetensors")) for run in ("one", "two"))
    assert set(w1) == set(w2) and w1
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-5, msg=name)
