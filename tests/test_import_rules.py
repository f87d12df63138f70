"""docs/design.md 2: the shared parts never import the branches; the image branch never imports the
video one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ["core", "flow", "rl", "rewards", "data", "train", "curate"]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", SHARED)
def test_shared_parts_do_not_import_branches(package):
    folder = ROOT / "idcrafter" / package
    for path in folder.rglob("*.py"):
        bad = {m for m in imported_modules(path) if m.startswith(("idcrafter.video", "mcimage"))}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_image_branch_does_not_import_video_branch():
    for path in (ROOT / "mcimage").rglob("*.py"):
        bad = {m for m in imported_modules(path) if m.startswith("idcrafter.video")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_importing_the_package_needs_no_optional_dependency():
    import subprocess
    import sys

    code = ("import sys, idcrafter, idcrafter.core, idcrafter.data, idcrafter.train, idcrafter.video, mcimage;"
            "bad = [m for m in ('flash_attn', 'insightface', 'decord', 'gradio') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stderr
