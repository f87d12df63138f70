"""Importing this module registers the built-in rewards (`build_reward` does it for you).

Each scorer module imports its heavy backend (dlib, insightface, transformers models) lazily, when
its model first loads, so registering them all is cheap.
"""

from idcrafter.rewards import clip, faces, hps, natural, nexus, objects, toyid  # noqa: F401

__all__ = ["clip", "faces", "hps", "natural", "nexus", "objects", "toyid"]
