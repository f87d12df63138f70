"""Toy world (docs/design.md 9): a synthetic multi-subject world that verifies ID-Crafter on a CPU
without weights.

`world` draws identities (shape x palette x texture), short clips of 1-3 of them moving over a light
background with per-frame visible masks, augmented reference images and layout/motion prompts, and
writes them as a docs/design.md 8 manifest; `codec` is a lossless latent codec behind the VAE
interface; `embedder` and `metrics` give ToyID (the toy world's ArcFace and identity similarity); `build`
trains the toy-world model end to end; `evaluate` and `ablation` measure it.
"""
