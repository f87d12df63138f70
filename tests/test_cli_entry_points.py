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
    assert len(points) == 9 and all(name.startswith("idcrafter-") for name in points)
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
