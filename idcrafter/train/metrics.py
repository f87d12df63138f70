"""Training logs people can read: TensorBoard scalars, a JSONL of every logged step, PNG curves."""

from __future__ import annotations

import json
from pathlib import Path

from idcrafter.utils.errors import FileFormatError
from idcrafter.utils.io import atomic_write


def kept_lines(text: str, through: int | None) -> list[str]:
    """The lines of a metrics.jsonl a run continues from: the rows of steps <= `through` (None: a
    fresh start keeps nothing). A last line without its newline is a row a kill cut short: dropped."""
    if through is None:
        return []
    kept = []
    for number, line in enumerate(text.split("\n")[:-1], 1):  # the last piece: "" or a row cut short
        if not line.strip():
            continue
        try:
            keep = json.loads(line)["step"] <= through
        except (json.JSONDecodeError, TypeError, KeyError):
            raise FileFormatError(f"metrics.jsonl line {number} is not a logged row: {line[:80]!r}") from None
        if keep:
            kept.append(line)
    return kept


class MetricLog:
    """Rank-0 logger: `log(step, **scalars)`; `plot()` draws each metric against the step.

    A run resumed from the checkpoint of step s continues the logs of step s: rows of later steps,
    which an interrupted attempt logged after that checkpoint, are dropped from metrics.jsonl
    (atomically) and purged from TensorBoard (`purge_step`), so each step appears once. A fresh
    start (`resume_step` None) starts both over. Nothing is written before the trainer opens the
    log, i.e. once the model, the data and the engine are built and the resume point is known.
    """

    def __init__(self, folder: str | Path, enabled: bool = True, resume_step: int | None = None):
        self.folder = Path(folder)
        self.enabled = enabled
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.writer = None
        if enabled:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / "metrics.jsonl"
            lines = kept_lines(path.read_text() if path.is_file() else "", resume_step)
            with atomic_write(path) as tmp:
                tmp.write_text("".join(line + "\n" for line in lines))
            for line in lines:
                row = json.loads(line)
                step = row.pop("step")
                for key, value in row.items():
                    self.history.setdefault(key, []).append((step, value))
            from torch.utils.tensorboard import SummaryWriter

            purge = 0 if resume_step is None else resume_step + 1
            self.writer = SummaryWriter(str(self.folder / "tensorboard"), purge_step=purge)
            self._jsonl = path.open("a")

    def log(self, step: int, **scalars: float) -> None:
        if not self.enabled:
            return
        for key, value in scalars.items():
            self.history.setdefault(key, []).append((step, float(value)))
            self.writer.add_scalar(key, float(value), step)
        self._jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}}) + "\n")
        self._jsonl.flush()

    def plot(self, name: str = "training.png", keys: list[str] | None = None) -> Path | None:
        if not self.enabled or not self.history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = [k for k in (keys or sorted(self.history)) if k in self.history]
        fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.4 * len(keys)), squeeze=False, sharex=True)
        for ax, key in zip(axes[:, 0], keys):
            steps, values = zip(*sorted(dict(self.history[key]).items()))
            ax.plot(steps, values, lw=1)
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        fig.tight_layout()
        path = self.folder / name
        with atomic_write(path) as tmp:
            fig.savefig(tmp, dpi=100)
        plt.close(fig)
        return path

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self._jsonl.close()


class DrawLog:
    """Every sample a rank trained on: `draws/rank{r}.jsonl`, one line per micro-batch,
    {"step", "ids", "categories"}, so a run's data order and its category balance can be audited.
    A resumed run continues from the resumed step like `MetricLog` (later lines dropped)."""

    def __init__(self, folder: str | Path, rank: int, resume_step: int | None = None):
        self.path = Path(folder) / "draws" / f"rank{rank}.jsonl"
        self.resume_step = resume_step
        self._file = None  # opened at the first draw: trainers without batches (RL) write nothing

    def _open(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = kept_lines(self.path.read_text() if self.path.is_file() else "", self.resume_step)
        with atomic_write(self.path) as tmp:
            tmp.write_text("".join(line + "\n" for line in lines))
        return self.path.open("a")

    def log(self, step: int, batch: dict) -> None:
        if self._file is None:
            self._file = self._open()
        counts = batch["subject_mask"].sum(1).tolist()
        row = {"step": step, "ids": list(batch["ids"]),
               "categories": [list(c[:n]) for c, n in zip(batch["categories"], counts)]}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
