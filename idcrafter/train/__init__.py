"""Training on DeepSpeed: config filling, the SFT trainer, checkpoints, export, EMA, logging."""
