"""Rewards for online RL (DESIGN 7): identity matching, face / subject / quality scorers.

`idcrafter.rewards.identity` holds the matching core shared by the multi-ID face reward (ArcFace or
dlib embeddings of detected faces) and the toy world's ToyID metric. Heavy scorer backends are
imported inside their factories, so importing this package needs only torch, numpy and scipy.
"""
