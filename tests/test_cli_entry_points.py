"""The console entry points of setup.cfg and the scripts/*.py shims run the same `main`."""

from __future__ import annotations

import configparser
import importlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def entry_points() -> dict[str, str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = [line.strip() for line in config["options.entry_points"]["console_scripts"].splitlines()]
    return dict((part.strip() for part in line.split("=", 1)) for line in lines if line and not line.startswith("#"))


def test_every_entry_point_resolves_to_a_main_and_has_its_script():
    points = entry_points()
    scripts = sorted(p.stem for p in (ROOT / "scripts").glob("*.py"))
    modules = sorted(target.split(":")[0].rsplit(".", 1)[1] for target in points.values())
    assert modules == scripts  # one entry point per script, and no other
    assert len(points) == 12 and all(name.startswith("idcrafter-") for name in points)
    for name, target in points.items():
        module_name, function = target.split(":")
        main = getattr(importlib.import_module(module_name), function)
        assert callable(main), name
        shim = (ROOT / "scripts" / f"{module_name.rsplit('.', 1)[1]}.py").read_text()
        assert f"from {module_name} import main" in shim, name


def test_module_help_exits_0_and_matches_the_script():
    by_module = subprocess.run([sys.executable, "-m", "idcrafter.cli.infer", "--help"], cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
    assert by_module.returncode == 0, by_module.stderr[-2000:]
    by_script = subprocess.run([sys.executable, "scripts/infer.py", "--help"], cwd=ROOT, capture_output=True,
                               text=True, timeout=120)
    assert by_script.returncode == 0
    # argparse names the program after argv[0]: infer.py both ways
    assert by_module.stdout == by_script.stdout and "--refs" in by_script.stdout


def test_usage_error_exits_2_through_the_shim():
    proc = subprocess.run([sys.executable, "scripts/train_video.py", "--data", "x.jsonl"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: the following arguments are required: --output "
                                                "(see train_video.py --help)"]


def test_every_tool_reads_a_config_file():
    """--config FILE is an option of every entry point, not only the trainers (the benchmark's
    --config names a model size, one of its cases' options)."""
    for name, target in entry_points().items():
        if name == "idcrafter-benchmark":
            continue
        module = importlib.import_module(target.split(":")[0])
        proc = subprocess.run([sys.executable, "-m", module.__name__, "--help"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0 and "--config" in proc.stdout, name


def test_infer_settings_from_a_file_and_the_command_line_overrides(tmp_path, capsys):
    import json

    from idcrafter.cli.infer import main

    refs = [str(ROOT / "examples" / "subject_a.png"), str(ROOT / "examples" / "subject_b.png")]
    config = tmp_path / "infer.yaml"
    config.write_text(f"refs: [{refs[0]}, {refs[1]}]\nprompt: two toys\nout: {tmp_path / 'a.mp4'}\n"
                      "steps: 3\nguidance-image: 1.5\nseed: 7\n")
    assert main(["--config", str(config), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["refs"], plan["prompt"], plan["steps"], plan["guidance_image"], plan["seed"]) == (
        refs, "two toys", 3, 1.5, 7)
    assert main(["--config", str(config), "--steps", "5", "--refs", refs[1], "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["steps"], plan["refs"], plan["seed"]) == (5, refs[1:], 7)


def test_a_bad_config_file_of_a_tool_is_one_line_exit_2(tmp_path):
    config = tmp_path / "jobs.yaml"
    config.write_text("jobs: a.jsonl\nout: o\nbogus: 1\n")
    proc = subprocess.run([sys.executable, "scripts/render_batch.py", "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: --config {config}: unknown key 'bogus' (not an option; see --help)"]
    assert not (tmp_path / "o").exists() and not (ROOT / "o").exists()
