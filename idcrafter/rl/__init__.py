"""Online RL: group advantages, GRPO / GSPO losses, KL to the reference, sliding SDE window."""

from idcrafter.rl.losses import (
    group_advantages,
    grpo_loss,
    gspo_loss,
    kl_to_reference,
    sequence_ratio,
    weighted_rewards,
)
from idcrafter.rl.window import SlidingWindow

__all__ = [
    "SlidingWindow",
    "group_advantages",
    "grpo_loss",
    "gspo_loss",
    "kl_to_reference",
    "sequence_ratio",
    "weighted_rewards",
]
