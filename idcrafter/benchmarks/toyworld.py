"""`toyworld` case: the ablation table of ID-Crafter's attention on held-out toy identities.

Needs a toy-world build folder (`python -m idcrafter.toyworld.build --out runs/toyworld`); trains
each row for `--steps` (default 1000) from the same base and data, then evaluates. Writes
ablation.json and ablation.png next to the row runs.
"""

from __future__ import annotations

from pathlib import Path

from idcrafter.benchmarks import register
from idcrafter.toyworld.ablation import ROWS, format_table, run_ablation


def run(root: Path = Path("runs/toyworld"), out: Path | None = None, steps: int = 1000, rows: tuple[str, ...] = (),
        seed: int = 0, **_) -> dict:
    """`rows`: names of `ROWS` to train (default all), `seed`: the training and evaluation seed."""
    if not (Path(root) / "base").is_dir():
        raise ValueError(f"--root {root}: no toy-world build there; run `python -m idcrafter.toyworld.build --out {root}`")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ValueError(f"--rows {' '.join(unknown)}: not a toyworld row; rows: {', '.join(ROWS)}")
    chosen = {name: ROWS[name] for name in rows} if rows else None
    return run_ablation(Path(root), Path(out) if out else Path(root) / "ablation", steps=steps, seed=seed, rows=chosen)


register("toyworld", format_table, f"ablation table on the toy world (trains {len(ROWS)} rows, or --rows; "
                                   "needs a toy-world build)")(run)


def run_image(out: Path | None = None, steps: int = 1000, **_) -> dict:
    """The image branch's toy ablation (`mcimage.toyworld`): writes its own data, trains every row."""
    from mcimage.toyworld import ROWS
    from mcimage.toyworld import run_ablation as run_image_ablation

    return run_image_ablation(Path(out) if out else Path("runs/toyimage"), steps=steps, batch_size=8, lr=5e-4, seed=0,
                              train=2000, held_out=64, eval_limit=32, rows=list(ROWS))


def _format_image(report: dict) -> str:
    from mcimage.toyworld import format_table as image_table

    return image_table(report)


register("toyimage", _format_image, "image-branch ablation on the toy image world (trains 5 rows, --out DIR)")(run_image)


def run_guidance_interval(quick: bool = False, **_) -> dict:
    """ToyID and s/video of guidance intervals against full guidance (`idcrafter.toyworld.guidance_interval`)."""
    from idcrafter.toyworld.guidance_interval import INTERVALS, measure

    return measure(INTERVALS[:2], samples=1, steps=2, progress=False) if quick else measure(samples=24)


def _format_interval(report: dict) -> str:
    from idcrafter.toyworld.guidance_interval import format_table as interval_table

    return interval_table(report)


register("guidance-interval", _format_interval,
         "ToyID and s/video of guidance intervals vs full guidance on the built-in toy model (--quick: 1 sample)")(
    run_guidance_interval)
