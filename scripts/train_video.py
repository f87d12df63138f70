#!/usr/bin/env python
"""Train ID-Crafter (SFT) with DeepSpeed, from one CPU to many GPU nodes.

    deepspeed --num_gpus 8 scripts/train_video.py --preset wan-1.3b --base Wan2.1-T2V-1.3B-Diffusers \\
        --data data/train.jsonl --deepspeed_config ds_configs/zero3.json --output runs/idcrafter \\
        --max-steps 20000 --lr 1e-5 --attn-loss-weight 0.3 --gradient-checkpointing --resume auto
    deepspeed --hostfile hosts.txt scripts/train_video.py ...        # many nodes

With --vlm QWEN_DIR (a Qwen2.5-VL folder) the VLM semantic encoder trains as well (ID-Crafter
Sec. 3.2): the frozen VLM reads each sample's prompt and references on every rank (or its states
come from a feature cache built with the same --vlm), and the connector joins the adapter, which
records the VLM folder for inference and RL.

Without --base the preset's transformer starts from random weights (tests, toy models). Writes
OUTPUT/checkpoints (DeepSpeed, for --resume), OUTPUT/adapter (for inference), OUTPUT/tensorboard,
OUTPUT/metrics.jsonl, OUTPUT/training.png and OUTPUT/summary.json.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from idcrafter.cli.train_video import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
