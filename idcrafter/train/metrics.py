"""Training logs people can read: TensorBoard scalars, a JSONL of every logged step, PNG curves."""

from __future__ import annotations

import json
from pathlib import Path

from idcrafter.utils.io import atomic_write


class MetricLog:
    """Rank-0 logger: `log(step, **scalars)`; `plot()` draws each metric against the step."""

    def __init__(self, folder: str | Path, enabled: bool = True):
        self.folder = Path(folder)
        self.enabled = enabled
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.writer = None
        if enabled:
            self.folder.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.folder / "tensorboard"))
            self._jsonl = (self.folder / "metrics.jsonl").open("a")

    def log(self, step: int, **scalars: float) -> None:
        if not self.enabled:
            return
        for key, value in scalars.items():
            self.history.setdefault(key, []).append((step, float(value)))
            self.writer.add_scalar(key, float(value), step)
        self._jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}}) + "\n")
        self._jsonl.flush()

    def load_previous(self) -> None:
        """Rebuild the history from metrics.jsonl (a resumed run plots the whole curve)."""
        path = self.folder / "metrics.jsonl"
        if not (self.enabled and path.is_file()):
            return
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                step = row.pop("step")
                for key, value in row.items():
                    self.history.setdefault(key, []).append((step, value))

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
