"""Analytic FLOP rules shared by the branches (docs/design.md 11): 2 FLOPs per multiply-add, the
matmuls only (norms, activations, rotary embeddings and softmax are left out, as in the usual MFU
accounting: Megatron-LM, PaLM Appendix B). Pure functions; no torch.

`idcrafter/video/flops.py` (Wan / ID-Crafter) and `mcimage/flops.py` (FLUX / MultiCrafter,
One-for-All) build their model counts from these.
"""

from __future__ import annotations

__all__ = ["attention_flops", "linear_flops", "moe_lora_flops", "training_step_flops"]


def linear_flops(tokens: int, d_in: int, d_out: int) -> int:
    """A linear layer on `tokens` rows: 2 * tokens * d_in * d_out."""
    return 2 * tokens * d_in * d_out


def attention_flops(queries: int, keys: int, dim: int) -> int:
    """Q K^T and P V over all heads (dim = heads * head_dim): 2 * 2 * queries * keys * dim."""
    return 4 * queries * keys * dim


def moe_lora_flops(tokens: int, d_in: int, d_out: int, rank: int, experts: int) -> int:
    """What a `MoELoRALinear` (idcrafter/core/moe_lora.py) adds to its base layer on `tokens` rows.

    Every expert runs densely (top-k only zeroes gates): the down projections to E * r, the up
    projection from E * r, and, for E > 1, the router (d_in -> E). With E = 1 it is a plain LoRA.
    """
    flops = linear_flops(tokens, d_in, experts * rank) + linear_flops(tokens, experts * rank, d_out)
    return flops + (linear_flops(tokens, d_in, experts) if experts > 1 else 0)


def training_step_flops(forward: int, checkpointing: bool) -> int:
    """Forward + backward (2x: gradients of inputs and of weights) + the recomputed forward of
    gradient checkpointing. Frozen weights skip their weight gradients, which this does not credit:
    MFU counts the model's FLOPs, not the ones skipped (PaLM Appendix B)."""
    return (4 if checkpointing else 3) * forward
