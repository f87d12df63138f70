"""Benchmark evaluation of generated videos and images (OpenS2V-style columns and weighted total).

    from idcrafter.eval import EvalItem, evaluate, write_report
    report = evaluate(items, {"face": face_reward}, metrics=("motion",))
    write_report(report, "runs/eval")

`opens2v` holds OpenS2V-Eval's own computations and leaderboard totals (`--protocol opens2v`);
`metrics` holds the legacy columns, weights and `evaluate`; `motion` the optical flow; `inputs` the manifest
and file matching; `report` the output files; `run` the command line's steps (`scripts/evaluate.py`).
Imports `idcrafter.rewards`, `data`, `utils`, `core`, never a generator: --toyworld reads the model's
config (`idcrafter.video.infer`) and renders through the batch renderer in another process.
"""

from idcrafter.eval.metrics import (
    COLUMNS,
    DEFAULT_WEIGHTS,
    Column,
    EvalItem,
    Report,
    attention_leakage,
    evaluate,
    normalise,
    weighted_total,
)
from idcrafter.eval.motion import lucas_kanade_flow, motion_score
from idcrafter.eval.report import write_report

__all__ = [
    "COLUMNS",
    "DEFAULT_WEIGHTS",
    "Column",
    "EvalItem",
    "Report",
    "attention_leakage",
    "evaluate",
    "lucas_kanade_flow",
    "motion_score",
    "normalise",
    "weighted_total",
    "write_report",
]
