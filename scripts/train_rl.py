#!/usr/bin/env python
"""Online RL post-training (Flow-GRPO / GSPO with an SDE window) on DeepSpeed.

    deepspeed scripts/train_rl.py --branch video --base BASE [--adapter ADAPTER] \\
        --data prompts.jsonl --eval-data held_out.jsonl --output runs/rl \\
        --reward "face=0.3,nexus=0.3,aesthetic=0.24,natural=0.16" --reward-option face.backend=dlib
    deepspeed scripts/train_rl.py --branch image --preset multicrafter \\
        --base FLUX.1-dev --adapter runs/mc_multi/adapter --data prompts.jsonl --output runs/ippo \\
        --reward "face=0.5,clip_text=1.4,hps=0.7" --size 512x512 --max-steps 300

Defaults follow each paper. Video (ID-Crafter App. A.2, Tab. S.6): Flow-GRPO (the per-step
objective) with the SDE at every sampling step (`--window full`, noise level a = 1.0), refining
the identity modules (`--trainable new-modules`), lr 1e-5, AdamW (0.9, 0.95), gradient norm 1.0,
800 steps (the length of its Fig. S.7). Image (MultiCrafter supp. Sec. B, IPPO): GSPO on the sliding
window T = 16, w = 2, tau = 50, s = 1, 300 steps, the MoE-LoRA trained (`--trainable lora`). The KL
reference (`--kl-weight`) is the policy as it was when RL started in both branches: the model with
its LoRA off when RL trains a fresh LoRA (exactly that policy), else a frozen copy of the trained
weights.

The data is a standard manifest (docs/design.md 8): only each line's prompt and subject images are used.
--reward takes name=weight pairs (default: the video composite of docs/design.md 7); --reward-option
passes NAME.KEY=VALUE to one reward model (paths of its weights, device, ...). Writes TensorBoard
logs, training.png and reward_curve.png, checkpoints (resume with --resume auto) and the adapter.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from idcrafter.cli.train_rl import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
