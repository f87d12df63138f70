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


# docs/design.md 10: InputError (a user's mistake, exit 2) is raised only at the boundary.
BOUNDARY = {
    "idcrafter/utils/cli.py",
    "idcrafter/utils/folders.py",
    "idcrafter/utils/settings_file.py",
    "idcrafter/data/manifest.py",
    "idcrafter/data/validate.py",
    "idcrafter/render.py",
    "idcrafter/train/cli.py",
    "idcrafter/video/infer.py",
    "idcrafter/eval/inputs.py",
    "mcimage/infer.py",
}
# the command-line tools, and the web demo, whose page shows bad input as one line as they print it
BOUNDARY_FOLDERS = ("idcrafter/cli/", "idcrafter/demo/")


def names_input_error(path: Path) -> list[int]:
    """Lines where the module imports or names InputError (docstrings and comments do not count)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
                alias.name.rsplit(".", 1)[-1] == "InputError" for alias in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.Name) and node.id == "InputError":
            lines.append(node.lineno)
        elif isinstance(node, ast.Attribute) and node.attr == "InputError":
            lines.append(node.lineno)
    return lines


def library_modules() -> list[str]:
    paths = sorted(p.relative_to(ROOT).as_posix() for package in ("idcrafter", "mcimage")
                   for p in (ROOT / package).rglob("*.py"))
    return [p for p in paths if p not in BOUNDARY and not p.startswith(BOUNDARY_FOLDERS)]


def test_library_code_never_names_input_error():
    modules = library_modules()
    assert len(modules) > 50 and "idcrafter/train/trainer.py" in modules and "mcimage/pipeline.py" in modules
    bad = {m: names_input_error(ROOT / m) for m in modules}
    assert not {m: lines for m, lines in bad.items() if lines}


def test_the_input_error_check_finds_every_spelling(tmp_path):
    """The check itself catches an import, a raise, an except clause and `cli.InputError`."""
    path = tmp_path / "m.py"
    path.write_text('"""InputError in a docstring is fine."""\n'
                    "from idcrafter.utils.cli import InputError\n"
                    "import idcrafter.utils.cli as cli\n"
                    "try:\n    raise InputError('x')\nexcept cli.InputError:\n    pass\n")
    assert sorted(names_input_error(path)) == [2, 5, 6]
    for boundary in BOUNDARY:
        assert (ROOT / boundary).is_file(), boundary
