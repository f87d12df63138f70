"""The command-line tools under hostile or careless input, in real processes: every case exits
with code 2 and one line `error: ...` naming the input, prints no traceback and writes nothing.

The cases run as real processes, two at a time (module fixture), and each is its own test so a
failure names its case. They cover bad numbers (NaN, infinities, values past the bounds the model
sets), devices, output places, damaged model and adapter folders, silently misread inputs and
the validator's decoding.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
REF = str(ROOT / "examples" / "subject_a.png")
TOY_VIDEO = ROOT / "idcrafter" / "assets" / "toyworld" / "model"
TOY_IMAGE = ROOT / "idcrafter" / "assets" / "toyimage" / "model"


def launcher_env() -> dict[str, str]:
    """What a one-process launch sets (torchrun, deepspeed, tests/test_train_video.py), with a free port."""
    from ports import free_port

    port = free_port()
    return dict(os.environ, PYTHONPATH=str(ROOT / "tests"), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def make_readonly(folder: Path) -> bool:
    """Make `folder` unwritable, also for root (chattr +i), and say whether it worked."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    if os.access(folder, os.W_OK) and os.geteuid() != 0:
        folder.chmod(0o555)
    try:
        (folder / "probe").touch()
    except OSError:
        return True
    (folder / "probe").unlink()
    return False


def damaged_models(root: Path) -> dict[str, Path]:
    """Copies of the built-in toy models, each broken one way."""
    made = {}

    def copy(name: str, src: Path = TOY_VIDEO) -> Path:
        made[name] = shutil.copytree(src, root / name)
        return made[name]

    with (copy("truncated_transformer") / "transformer" / "diffusion_pytorch_model.safetensors").open("r+b") as f:
        f.truncate(4000)
    shutil.rmtree(copy("no_vae") / "vae")
    only = copy("only_transformer")
    for name in ("vae", "text_encoder", "tokenizer", "scheduler", "idcrafter_adapter"):
        shutil.rmtree(only / name)
    config = copy("adapter_string_number") / "idcrafter_adapter" / "idcrafter_config.json"
    meta = json.loads(config.read_text())
    meta["config"]["num_blocks"] = "4"
    config.write_text(json.dumps(meta))
    config = copy("adapter_nan_guidance") / "idcrafter_adapter" / "idcrafter_config.json"
    config.write_text(config.read_text().replace('"guidance_image": 2.0', '"guidance_image": NaN'))
    (copy("adapter_list") / "idcrafter_adapter" / "idcrafter_config.json").write_text("[1, 2]")
    config = copy("adapter_other_preset") / "idcrafter_adapter" / "idcrafter_config.json"  # says tiny, is toy-sized
    config.write_text(config.read_text().replace('"preset": "toyworld"', '"preset": "tiny"'))
    with (copy("adapter_truncated") / "idcrafter_adapter" / "idcrafter_adapter.safetensors").open("r+b") as f:
        f.truncate(f.seek(0, 2) - 100)
    flux = copy("image_other_architecture", TOY_IMAGE) / "transformer" / "config.json"
    flux.write_text(flux.read_text().replace('"attention_head_dim": 32', '"attention_head_dim": 16'))
    image = copy("image_adapter_types", TOY_IMAGE) / "mcimage_adapter" / "mcimage_config.json"
    meta = json.loads(image.read_text())
    meta["config"]["ref_size"] = [32]
    image.write_text(json.dumps(meta))
    return made


def write_data(root: Path) -> dict[str, Path]:
    from tiny_data import write_manifest

    good = write_manifest(root / "data", n=2)
    bad = root / "data" / "bad.jsonl"
    bad.write_text(good.read_text() + '{"id": "x", "video": \n')
    empty = root / "data" / "empty.jsonl"
    empty.write_text("\n\n")
    undecodable = root / "data" / "undecodable.jsonl"
    (root / "data" / "refs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    lines = good.read_text().splitlines()
    lines.append(lines[0].replace('"s0"', '"s9"').replace("refs/0_0.png", "refs/broken.png"))
    undecodable.write_text("\n".join(lines) + "\n")
    images = root / "data" / "images.jsonl"  # one-subject image samples for the image branch
    images.write_text(json.dumps({"id": "i0", "image": "refs/0_0.png", "prompt": "a red square",
                                  "subjects": [{"image": "refs/0_1.png", "category": "face"}]}) + "\n")
    return {"good": good, "bad": bad, "empty": empty, "undecodable": undecodable, "images": images}


def cases(tmp: Path, models: dict[str, Path], data: dict[str, Path], readonly: Path | None):
    """(name, argv, expected exit code, text the one line must hold, path that must not appear)."""
    infer = ["scripts/infer.py", "--refs", REF, "--prompt", "a red square"]
    image = [*infer, "--mode", "image"]
    floats = tmp / "float.tif"
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(floats)
    loop = tmp / "loop.png"
    os.symlink(tmp / "loop2.png", loop)
    os.symlink(loop, tmp / "loop2.png")

    def out(name, suffix=".mp4"):
        return str(tmp / "out" / f"{name}{suffix}")

    def run_folder(name):
        return str(tmp / "runs" / name)

    video = [
        ("guidance_image_nan", ["--guidance-image", "nan"], "--guidance-image: must be a finite number"),
        ("guidance_image_inf", ["--guidance-image", "inf"], "must be a finite number"),
        ("guidance_image_minus_inf", ["--guidance-image=-inf"], "must be a finite number"),
        ("guidance_image_1e308", ["--guidance-image", "1e308"], "--guidance-image must be in [0, 100]"),
        ("guidance_text_nan", ["--guidance-text", "nan"], "--guidance-text: must be a finite number"),
        ("steps_huge", ["--steps", "1000000000"], "--steps must be in [1, 1000]"),
        ("frames_huge", ["--frames", "4000000001"], "rotary position range covers at most 64 frames"),
        ("size_huge", ["--size", "160000x160000"], "rotary position range covers at most 512x512"),
        ("frames_past_rope", ["--frames", "69"], "at most 64 frames"),
        ("seed_negative", ["--seed", "-1"], "--seed: must be in [0,"),
        ("device_unknown", ["--device", "gpu"], "--device 'gpu': not a device"),
        ("device_missing_gpu", ["--device", "cuda:7"], "--device cuda:7"),
        ("strength_zero", ["--strength", "0"], "--strength: must be in (0, 1]"),
        ("out_is_folder", ["--out", str(tmp)], "is a folder"),
        ("out_bad_suffix", ["--out", out("out_bad_suffix", ".avi")], "must end in"),
        ("model_truncated_weights", ["--model", str(models["truncated_transformer"])], "safetensors"),
        ("model_without_vae", ["--model", str(models["no_vae"])], "vae/ does not exist"),
        ("model_only_transformer", ["--model", str(models["only_transformer"])], "does not exist"),
        ("model_is_a_file", ["--model", REF], "is a file, not a folder"),
        ("adapter_string_number", ["--model", str(models["adapter_string_number"])],
         "'num_blocks' must be an integer, got the string '4'"),
        ("adapter_nan", ["--model", str(models["adapter_nan_guidance"])], "'guidance_image' must be a finite number"),
        ("adapter_json_list", ["--model", str(models["adapter_list"])], "must hold a JSON object"),
        ("adapter_truncated_weights", ["--model", str(models["adapter_truncated"])], "truncated"),
        ("vlm_missing_without_model", ["--vlm", str(tmp / "no_qwen")], "--vlm"),
        ("vlm_for_a_model_without_vlm", ["--vlm", str(tmp)], "trained without the VLM encoder"),
        ("preset_against_adapter", ["--preset", "tiny", "--adapter", str(TOY_VIDEO / "idcrafter_adapter")],
         "conflicts with the adapter"),
        ("adapter_for_another_base", ["--adapter", str(models["adapter_other_preset"] / "idcrafter_adapter"),
                                      "--preset", "tiny"], "trained for a base model with dim=128"),
        ("ref_float_image", ["--refs", str(floats)], "unsupported image mode 'F'"),
        ("ref_is_folder", ["--refs", str(tmp)], "is a folder, not a file"),
        ("ref_symlink_loop", ["--refs", str(loop)], "symbolic link loop"),
    ]
    out_cases = [(f"infer_{name}", [*infer, "--out", out(name), *extra], 2, needle, Path(out(name)))
                 for name, extra, needle in video]
    if readonly is not None:
        out_cases.append(("infer_out_readonly", [*infer, "--out", str(readonly / "x.mp4")], 2, "cannot write in",
                          readonly / "x.mp4"))
    images = [
        ("guidance_nan", ["--guidance", "nan"], "must be a finite number"),
        ("size_huge", ["--size", "160000x160000"], "at most 4096 pixels a side"),
        ("steps_huge", ["--steps", "5000"], "--steps must be in [1, 1000]"),
        ("adapter_wrong_types", ["--model", str(models["image_adapter_types"])], "'ref_size' needs 2 values"),
        ("adapter_for_another_base", ["--model", str(models["image_other_architecture"])],
         "different FLUX architecture"),
        ("float_reference", ["--refs", str(floats)], "unsupported image mode 'F'"),
    ]
    out_cases += [(f"image_{name}", [*image, "--out", out(name, ".png"), *extra], 2, needle, Path(out(name, ".png")))
                  for name, extra, needle in images]

    train = ["scripts/train_video.py", "--data", str(data["good"]), "--no-progress"]
    trains = [
        ("lr_nan", ["--lr", "nan"], "--lr: must be a finite number"),
        ("fps_zero", ["--fps", "0"], "--fps: must be in [1, 240]"),
        ("seed_negative", ["--seed", "-1"], "--seed: must be in [0,"),
        ("frames_past_rope", ["--frames", "129"], "at most 125 frames"),
        ("size_past_rope", ["--size", "1024x1024"], "at most 512x512"),
        ("bad_manifest", ["--data", str(data["bad"])], "1 bad lines (line 3"),
        ("empty_manifest", ["--data", str(data["empty"])], "no samples"),
        ("base_truncated", ["--base", str(models["truncated_transformer"])], "safetensors"),
        ("preset_against_adapter", ["--preset", "tiny", "--adapter", str(TOY_VIDEO / "idcrafter_adapter")],
         "conflicts with the adapter"),
        ("resume_path", ["--resume", "../elsewhere"], "checkpoint tag"),
    ]
    out_cases += [(f"train_video_{name}", [*train, "--output", run_folder(name), *extra], 2, needle,
                   Path(run_folder(name))) for name, extra, needle in trains]
    if readonly is not None:
        out_cases.append(("train_video_output_readonly", [*train, "--output", str(readonly / "run")], 2,
                          "cannot write in", readonly / "run"))
        out_cases.append(("train_video_resume_into_readonly_run", [*train, "--output", str(readonly),
                                                                  "--resume", "auto"], 2, "cannot write in",
                          readonly / "metrics.jsonl"))

    rl = ["scripts/train_rl.py", "--data", str(data["good"]), "--no-progress", "--reward", "toyid=1"]
    rls = [
        ("noise_level_nan", ["--noise-level", "nan"], "--noise-level: must be a finite number"),
        ("noise_level_zero", ["--noise-level", "0"], "--noise-level: must be in (0, 5]"),
        ("window_past_steps", ["--num-steps", "4", "--window", "6"], "does not fit in --num-steps 4"),
        ("size_on_video", ["--size", "64x64"], "--size applies to the image branch only"),
        ("vlm_on_image", ["--branch", "image", "--vlm", str(tmp)], "--vlm applies to the video branch only"),
    ]
    out_cases += [(f"train_rl_{name}", [*rl, "--output", run_folder(f"rl_{name}"), *extra], 2, needle,
                   Path(run_folder(f"rl_{name}"))) for name, extra, needle in rls]
    out_cases += [
        ("train_image_lr_nan", ["scripts/train_image.py", "--data", str(data["images"]), "--output", run_folder("img"),
                                "--lr", "nan"], 2, "--lr: must be a finite number", Path(run_folder("img"))),
        ("train_image_size_huge", ["scripts/train_image.py", "--data", str(data["images"]), "--output",
                                   run_folder("img2"), "--size", "8192x8192"], 2, "at most 4096", Path(run_folder("img2"))),
        ("evaluate_device", ["scripts/evaluate.py", "--toyworld", "--out", run_folder("eval"), "--device", "tpu"], 2,
         "--device 'tpu'", Path(run_folder("eval"))),
        ("cache_device", ["scripts/cache_features.py", "--data", str(data["good"]), "--out", run_folder("cache"),
                          "--device", "cuda:9"], 2, "--device cuda:9", Path(run_folder("cache"))),
        ("validate_empty_manifest", ["-m", "idcrafter.data.validate", str(data["empty"])], 2, "holds no samples", None),
        ("validate_undecodable_reference", ["-m", "idcrafter.data.validate", str(data["undecodable"])],
         1, "line 3: subjects[0].image", None),
        ("usage_error_is_one_line", ["scripts/infer.py", "--refs", REF], 2, "required: --prompt, --out", None),
    ]
    return out_cases


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Run every case, two processes at a time; {name: (case, CompletedProcess)}."""
    tmp = tmp_path_factory.mktemp("hostile")
    readonly_root = tmp / "readonly"
    readonly = readonly_root if make_readonly(readonly_root) else None
    all_cases = cases(tmp, damaged_models(tmp / "models"), write_data(tmp), readonly)
    def run(case):
        try:
            return subprocess.run([sys.executable, *case[1]], cwd=ROOT, capture_output=True, text=True, timeout=120,
                                  env=launcher_env())
        except subprocess.TimeoutExpired as err:  # a refusal takes a second; this ran on instead
            return subprocess.CompletedProcess(err.cmd, None, "", f"timed out after {err.timeout} s")

    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            done = dict(zip([c[0] for c in all_cases], pool.map(run, all_cases)))
    finally:
        subprocess.run(["chattr", "-i", str(readonly_root)], capture_output=True)
        readonly_root.chmod(0o755)
    return {c[0]: (c, done[c[0]]) for c in all_cases}, readonly is not None, tmp


def _case_names() -> list[str]:
    """The case names, computed without running anything (paths do not matter for names)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fake = {k: tmp for k in ("truncated_transformer", "no_vae", "only_transformer", "adapter_string_number",
                                 "adapter_nan_guidance", "adapter_list", "adapter_truncated", "image_adapter_types",
                                 "adapter_other_preset", "image_other_architecture")}
        data = {k: tmp / k for k in ("good", "bad", "empty", "undecodable", "images")}
        return [c[0] for c in cases(tmp, fake, data, tmp / "readonly")]


@pytest.mark.parametrize("name", _case_names())
def test_refused_with_one_line_and_nothing_written(results, name):
    table, have_readonly, _ = results
    if name not in table:
        assert "readonly" in name and not have_readonly
        pytest.skip("no way to make a folder unwritable here")
    (_, argv, code, needle, must_not_exist), proc = table[name]
    err = proc.stderr.strip()
    if code == 2:
        assert proc.returncode == 2, (name, proc.returncode, err[-2000:])
        assert "Traceback" not in proc.stderr, (name, err[-2000:])
        assert len(err.splitlines()) == 1 and err.startswith("error: "), (name, err[-2000:])
        assert needle in err, (name, needle, err)
    else:  # the validator's bad lines: exit 1, listed on stdout with their line numbers
        assert proc.returncode == code and needle in proc.stdout, (name, proc.returncode, proc.stdout, err)
    if must_not_exist is not None:
        assert not must_not_exist.exists(), (name, sorted(must_not_exist.parent.iterdir()))


@pytest.mark.slow  # kept out of CI for time; run with -m slow
def test_outputs_are_created_with_the_users_umask(tmp_path):
    """What a plain open() / mkdir() would give (mkstemp's 0600 used to leak through): the video of
    a real run under umask 027, and the atomic writers' files and folders (adapters, summaries)
    under three umasks."""
    out = tmp_path / "video.mp4"
    code = ("import os, sys, runpy; os.umask(0o027); sys.argv = sys.argv[1:]; "
            "runpy.run_path('scripts/infer.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, "scripts/infer.py", "--refs", REF, "--prompt", "a square",
                           "--out", str(out), "--steps", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.stat().st_mode & 0o777 == 0o640

    from idcrafter.utils.io import atomic_write, atomic_write_dir

    for umask, file_mode, dir_mode in [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)]:
        old = os.umask(umask)
        try:
            with atomic_write(tmp_path / f"summary{umask}.json") as tmp:
                tmp.write_text("{}")
            with atomic_write_dir(tmp_path / f"adapter{umask}") as tmp:
                (tmp / "config.json").write_text("{}")
        finally:
            os.umask(old)
        assert (tmp_path / f"summary{umask}.json").stat().st_mode & 0o777 == file_mode
        assert (tmp_path / f"adapter{umask}").stat().st_mode & 0o777 == dir_mode


def test_no_case_wrote_anything(results):
    """Every output and run folder the cases named lies under these two folders: both still empty."""
    _, _, tmp = results
    for folder in (tmp / "out", tmp / "runs"):
        assert not folder.exists() or not any(folder.rglob("*")), sorted(folder.rglob("*"))
