"""Optional-dependency errors, atomic writes, seeding, memory tracking and the benchmark CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from idcrafter.utils import MissingDependencyError, atomic_write, atomic_write_dir, require, seed_everything
from idcrafter.utils.profiling import TensorMemoryTracker

ROOT = Path(__file__).resolve().parents[1]


def test_require_names_the_extra():
    assert require("json") is json
    with pytest.raises(MissingDependencyError, match=r'pip install -e "\.\[flash\]"'):
        require("flash_attn_not_installed_here", extra="flash")
    with pytest.raises(MissingDependencyError, match="pip install some-missing-pkg"):
        require("some_missing_pkg")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            assert tmp.suffix == ".mp4" and tmp.parent == tmp_path
            tmp.write_bytes(b"partial")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []
    with atomic_write(target) as tmp:
        tmp.write_bytes(b"done")
    assert target.read_bytes() == b"done" and list(tmp_path.iterdir()) == [target]


def test_atomic_write_dir_replaces_whole_folder(tmp_path):
    folder = tmp_path / "adapter"
    with atomic_write_dir(folder) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_write_dir(folder) as tmp:
            (tmp / "b.txt").write_text("2")
            raise RuntimeError
    assert sorted(p.name for p in folder.iterdir()) == ["a.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_seed_everything_repeats():
    seed_everything(7)
    a = torch.randn(3)
    g = seed_everything(7)
    assert torch.equal(a, torch.randn(3))
    assert torch.equal(torch.randn(2, generator=g), torch.randn(2, generator=torch.Generator().manual_seed(7)))


def test_memory_tracker_counts_live_storages():
    x = torch.randn(256, 256)  # created outside: not counted
    mib = 256 * 256 * 4
    with TensorMemoryTracker() as tracker:
        y = x @ x  # 1 buffer
        z = y.exp()  # 2 buffers live
        del y
        w = z.view(-1)  # a view adds nothing
        del z, w
        v = x + 1  # back to 1 live
    assert tracker.peak_bytes == 2 * mib
    assert tracker.live == mib
    del v


def run_script(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_benchmark_attention_memory_ratios(tmp_path):
    """IDAR's memory overhead is small; the naive full softmax's is several times the baseline."""
    out = tmp_path / "attention.json"
    proc = run_script("scripts/benchmark.py", "attention", "--repeats", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "idar" in proc.stdout and "naive" in proc.stdout
    results = json.loads(out.read_text())["results"]
    assert results["none"]["memory_ratio"] == 1.0
    assert results["idar"]["memory_ratio"] <= 1.3
    assert results["naive"]["memory_ratio"] >= 3.0


def test_benchmark_bad_input_exits_2(tmp_path):
    proc = run_script("scripts/benchmark.py", "attention", "--chunk-size", "0")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr


def test_benchmark_toyworld_refuses_a_missing_build_and_unknown_rows(tmp_path, capsys):
    """The checks run before anything trains: one line each, exit 2."""
    from idcrafter.cli.benchmark import main

    assert main(["toyworld", "--root", str(tmp_path), "--device", "cpu"]) == 2
    assert "no toy-world build there" in capsys.readouterr().err
    (tmp_path / "base").mkdir()
    assert main(["toyworld", "--root", str(tmp_path), "--device", "cpu", "--rows", "c_full", "z_bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--rows z_bogus: not a toyworld row; rows: a_plain_keys" in err
    assert "g_full_idar_attn2" in err


@pytest.mark.parametrize("case", ["video-overhead", "video-step-cache"])
def test_benchmark_video_cases(case, tmp_path):
    out = tmp_path / "report.json"
    quick = ["--quick"] if case == "video-overhead" else []
    proc = run_script("scripts/benchmark.py", case, "--repeats", "1", *quick, "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    results = report["results"]
    if case == "video-overhead":
        forms = ("attn2", "own")
        assert report["stage3_projections"] == list(forms) and "attn2 FLOPs" in proc.stdout
        assert set(results) == {f"{kind}/stock" for kind in ("step", "train")} | {
            f"{kind}/{form}/{n}_subjects" for kind in ("step", "train") for form in forms for n in (1, 2, 3)}
        assert results["step/stock"]["time_ratio"] == 1.0 == results["step/stock"]["flop_ratio"]
        for form in forms:  # more subjects never need less memory in training
            mem = [results[f"train/{form}/{n}_subjects"]["peak_mib"] for n in (1, 2, 3)]
            assert mem == sorted(mem) and mem[0] > results["train/stock"]["peak_mib"]
        # Counted FLOPs of a cached step (--quick: 48 video tokens of width D = 128, 16 per reference,
        # stage 3 in K = 4 blocks): the subject attention costs 4 L R D K per subject in either form
        # (two matmuls), and the own form adds its query and output projections, 2 x 2 L D^2 K.
        length, width, blocks = 48, 128, 4
        for n in (1, 2, 3):
            step = {form: results[f"step/{form}/{n}_subjects"]["flops"] for form in forms}
            assert step["attn2"] - results["step/stock"]["flops"] == 4 * length * 16 * n * width * blocks
            assert step["own"] - step["attn2"] == 4 * length * width ** 2 * blocks
        # The analytic FLOP ratios of the cached steps (idcrafter/video/flops.py) equal the counted ones.
        steps = [key for key in results if key.startswith("step/")]
        assert len(steps) == 7 and all("analytic_ratio" not in results[k] for k in results if k not in steps)
        for key in steps:
            assert results[key]["analytic_ratio"] == pytest.approx(results[key]["flop_ratio"], rel=1e-6), key
    else:
        assert set(results) == {"cached", "recomputed"} and results["cached"]["time_ratio"] == 1.0


def test_benchmark_lora_ours_equals_peft():
    """Our plain LoRA and peft's (diffusers' add_adapter) on the same stock Wan and the same LoRA
    weights compute the same function with the same trainable parameters."""
    from idcrafter.benchmarks import load_cases

    case = load_cases()["lora"]
    report = case.run(device="cpu", full=False, repeats=1, quick=True)
    assert report["max_abs_diff"] < 1e-5 and report["grad_max_abs_diff"] < 1e-6
    assert report["lora_effect"] > 1e-3  # the LoRA changes the output: the equality is not vacuous
    rows = report["results"]
    # 2 blocks x rank 4 x (8 attention projections 32 -> 32, FFN 32 -> 64 -> 32): r (in + out) each.
    assert report["layers"] == 20
    assert rows["ours"]["trainable"] == rows["peft"]["trainable"] == 2 * 4 * (8 * 64 + 2 * 96) == 5632
    assert rows["none"]["trainable"] == 0 and rows["none"]["time_ratio"] == 1.0
    assert rows["ours"]["peak_mib"] > rows["none"]["peak_mib"]  # the LoRA activations are counted
    assert "ours / peft" in case.format_table(report)


def test_session_releases_only_its_own_deepspeed_shm_names(tmp_path):
    """conftest's end-of-session release: names of this session's ports and user, created during it
    and mapped by no live process; a live mapping keeps its name."""
    import mmap

    from ports import SHM_PREFIX, free_port, owned_leftovers, release_leftovers, shm_names

    port, other = free_port(), 1

    def name(uid, port, rank=0):
        return f"{SHM_PREFIX}{uid}_127.0.0.1_{port}_{rank}"

    uid = os.getuid()
    ours = {name(uid, port, 0), name(uid, port, 1)}
    old, foreign, other_user = name(uid, port, 2), name(uid, other), name(uid + 1, port)
    names = ours | {old, foreign, other_user, f"{SHM_PREFIX}garbage", "unrelated"}
    assert owned_leftovers(names, {old}, {port}, set(), uid) == sorted(ours)
    assert owned_leftovers(names, {old}, {port}, {name(uid, port, 1)}, uid) == [name(uid, port, 0)]
    # On files: the name this process maps stays, the other one of ours goes, the rest stay.
    for n in names:
        (tmp_path / n).write_bytes(b"x" * 4096)
    with open(tmp_path / name(uid, port, 1), "r+b") as f, mmap.mmap(f.fileno(), 4096):
        assert release_leftovers({old}, tmp_path) == [name(uid, port, 0)]
    assert shm_names(tmp_path) == names - {name(uid, port, 0), "unrelated"}


def test_copy_as_float16_converts_floats_outside_kept_folders(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from idcrafter.utils.io import copy_as_float16

    src = tmp_path / "src"
    for sub in ("transformer", "vae"):
        (src / sub).mkdir(parents=True)
        save_file({"w": torch.tensor([0.1, 2.5]), "n": torch.tensor([3, 4])}, str(src / sub / "m.safetensors"))
    (src / "model_index.json").write_text("{}")
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "stale.txt").write_text("old")
    dest = copy_as_float16(src, tmp_path / "dest", keep=("vae",))
    converted, kept = load_file(str(dest / "transformer" / "m.safetensors")), load_file(str(dest / "vae" / "m.safetensors"))
    assert converted["w"].dtype == torch.float16 and torch.equal(converted["w"], torch.tensor([0.1, 2.5]).half())
    assert converted["n"].dtype == torch.int64 and kept["w"].dtype == torch.float32
    assert (dest / "model_index.json").is_file() and not (dest / "stale.txt").exists()
    assert load_file(str(src / "transformer" / "m.safetensors"))["w"].dtype == torch.float32  # source untouched


def test_safetensors_check_agrees_with_the_safetensors_loader(tmp_path):
    """Our header-only check (no tensors read) against safetensors' own loader: the whole file passes
    both; every truncation is refused by ours and fails (or loses tensors) in the loader."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    from idcrafter.utils.cli import InputError
    from idcrafter.utils.folders import check_safetensors

    whole = tmp_path / "whole.safetensors"
    save_file({"a": torch.randn(7, 5), "b": torch.arange(11, dtype=torch.int64)}, str(whole), metadata={"format": "pt"})
    check_safetensors(whole, "--adapter")
    assert set(load_file(str(whole))) == {"a", "b"}
    data = whole.read_bytes()
    for cut in sorted({1, 7, 8, 20, len(data) // 2, len(data) - 8, len(data) - 1}):
        part = tmp_path / f"cut{cut}.safetensors"
        part.write_bytes(data[:cut])
        with pytest.raises(InputError, match=f"{part.name}"):
            check_safetensors(part, "--adapter")
        with pytest.raises((SafetensorError, OSError, RuntimeError)):
            load_file(str(part))


def test_benchmark_meta_device_is_for_video_overhead_only(capsys):
    from idcrafter.cli.benchmark import main

    assert main(["attention", "--device", "meta"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --device meta: only video-overhead runs without computing (FLOPs), not attention"
