"""Rewards for online RL (docs/design.md 7): identity matching, face / object / subject / quality scorers.

`idcrafter.rewards.identity` holds the matching core shared by the multi-ID face reward (ArcFace or
dlib embeddings of detected faces) and the toy world's ToyID metric. Heavy scorer backends are
imported inside their factories, so importing this package needs only torch, numpy and scipy.
"""

from idcrafter.rewards.base import (
    IMAGE_OBJECT_WEIGHTS,
    IMAGE_WEIGHTS,
    VIDEO_WEIGHTS,
    CompositeReward,
    RewardModel,
    RewardOutput,
    build_reward,
    list_rewards,
    parse_weights,
    register_reward,
)

__all__ = [
    "CompositeReward",
    "IMAGE_OBJECT_WEIGHTS",
    "IMAGE_WEIGHTS",
    "RewardModel",
    "RewardOutput",
    "VIDEO_WEIGHTS",
    "build_reward",
    "list_rewards",
    "parse_weights",
    "register_reward",
]
