"""scripts/train_video.py, unchanged, with every trainable parameter's full gradient recorded before each
optimizer step (ZeRO-3 keeps only partitions: `deepspeed.utils.safe_get_full_grad` gathers them).
tests/test_sequence_parallel.py launches it on one rank and on two (`deepspeed --num_gpus 2 ... --sp-size 2`)
and compares.

    SP_GRADS=GRADS.pt python tests/sp_train_worker.py TRAIN_VIDEO_ARGS...

(the path travels in the environment: the deepspeed launcher puts --local_rank first on the command line)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from idcrafter.cli import train_video  # noqa: E402
from idcrafter.train.trainer import Trainer  # noqa: E402

RECORD: list[dict[str, torch.Tensor]] = []
_build_engine = Trainer.build_engine


def build_recording_engine(self: Trainer) -> None:
    """The trainer's engine, whose `step` first records the full gradient of every trainable parameter."""
    from deepspeed.utils import safe_get_full_grad

    _build_engine(self)
    step = self.engine.step
    named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def recording_step(*args, **kwargs):
        RECORD.append({n: safe_get_full_grad(p).detach().clone() for n, p in named})
        return step(*args, **kwargs)

    self.engine.step = recording_step


if __name__ == "__main__":
    Trainer.build_engine = build_recording_engine
    code = train_video.main(sys.argv[1:])
    if os.environ.get("RANK", "0") == "0":
        torch.save(RECORD, os.environ["SP_GRADS"])
    sys.exit(code)
