"""`toyworld` case: the ablation table of ID-Crafter's attention on held-out toy identities.

Needs a toy-world build folder (`python -m idcrafter.toyworld.build --out runs/toyworld`); trains
each row for `--steps` (default 1000) from the same base and data, then evaluates. Writes
ablation.json and ablation.png next to the row runs.
"""

from __future__ import annotations

from pathlib import Path

from idcrafter.benchmarks import register
from idcrafter.toyworld.ablation import format_table, run_ablation


def run(root: Path = Path("runs/toyworld"), out: Path | None = None, steps: int = 1000, **_) -> dict:
    if not (Path(root) / "base").is_dir():
        raise ValueError(f"--root {root}: no toy-world build there; run `python -m idcrafter.toyworld.build --out {root}`")
    return run_ablation(Path(root), Path(out) if out else Path(root) / "ablation", steps=steps)


register("toyworld", format_table, "ablation table on the toy world (trains 4 rows; needs a toy-world build)")(run)
