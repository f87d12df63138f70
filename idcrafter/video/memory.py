"""Per-GPU memory of ID-Crafter training: weights, gradients, optimizer states, activations.

The parameter counts are exact (the model is built on the meta device). The activation model
counts the tensors autograd saves for backward in one Wan block, walked op by op through
diffusers' `WanTransformerBlock` with every weight trainable (full fine-tuning; LoRA saves the
same linear inputs): per video token 22 D + 2 FFN + 2 heads + 9 elements (norm inputs and
outputs, q/k/v before and after QK-norm and rotary, attention outputs and log-sum-exp, the FFN
hidden twice), per text token 4 D + 1 (attn2's keys and values before and after its norm), and
8 D for the modulation. In bf16 the block's `.float()` norms and modulations, the fp32 rotary
products and the gated residuals keep fp32 copies: 17 D-sized fp32 tensors per token and block
instead of bf16 ones (fitted to the measured bytes; the op-by-op count finds the six norm
inputs/outputs and FFN gate, the rest come from mixed-dtype products). Stage 3 adds per video
token and block 4 D + heads + 1 on its own projections (its query before and after the norm, its
output, the log-sum-exp) and 2 D + heads on attn2's (the subject attention's output before and
after the gate, the log-sum-exp: the query is attn2's, saved already); a subject-tower layer
26 D + 14 per reference token. A frozen base saves less (no inputs of frozen linears), so
the model is an upper bound there. `tests/test_plan.py` checks the model against the bytes
autograd really saves in tiny configurations (docs/design.md 11).

With gradient checkpointing (one checkpoint per block, as diffusers' Wan and `SubjectTower`) the
forward keeps each block's input (L x D) and backward recomputes one block at a time.

ZeRO (DeepSpeed): stage 1 partitions optimizer states, 2 also gradients, 3 also the weights over
the sequence-and-data-parallel group, i.e. every GPU (the ranks of an SP group hold the same
weights; DeepSpeed's engine partitions over its `seq_data_parallel_group`); optimizer offload moves the states (and with stage 3,
`offload_param`, the weights) to CPU memory. Sequence parallelism (Ulysses) splits every
sequence over SP ranks, so activations divide by the SP size.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from idcrafter.video.flops import WanShape, reference_tokens, training_step_flops, video_tokens
from idcrafter.video.flops import for_config as flops_for_config

GIB = 1024**3
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
FP32_COPIES_PER_TOKEN = 17  # D-sized fp32 tensors per token a bf16 Wan block saves (see module docstring)


def wan_block_activation_elements(shape: WanShape, tokens: int, text_tokens: int) -> int:
    """Elements autograd saves in one Wan block (every weight trainable), one sample."""
    d = shape.dim
    return tokens * (22 * d + 2 * shape.ffn + 2 * shape.heads + 9) + text_tokens * (4 * d + 1) + 8 * d


def wan_block_activation_bytes(shape: WanShape, tokens: int, text_tokens: int, dtype: str = "bf16") -> int:
    """Bytes of `wan_block_activation_elements`: `dtype` elements, six fp32 per token and D in bf16."""
    size = DTYPE_BYTES[dtype]
    elements = wan_block_activation_elements(shape, tokens, text_tokens)
    return elements * size + (4 - size) * FP32_COPIES_PER_TOKEN * tokens * shape.dim


def stage3_activation_elements(shape: WanShape, tokens: int, form: str = "attn2") -> int:
    """Stage 3 of one block, in either form (`IDCrafterConfig.stage3_projections`): "own", its query
    before/after the norm, the attention's output and to_out's input, the log-sum-exp; "attn2", the
    subject attention's output before and after the gate and the log-sum-exp."""
    if form == "own":
        return tokens * (4 * shape.dim + shape.heads + 1)
    return tokens * (2 * shape.dim + shape.heads)


def tower_layer_activation_elements(shape: WanShape, ref_tokens_all: int) -> int:
    """One subject-tower layer (stages 1-2) plus the stage-3 keys/values it feeds, all subjects."""
    return ref_tokens_all * (26 * shape.dim + 14)


def head_activation_elements(shape: WanShape, tokens: int) -> int:
    """Outside the blocks: patch embedding, output norm and projection (a few D per token)."""
    return 9 * shape.dim * tokens


@dataclass(frozen=True)
class TrainSetup:
    """One training configuration: what `scripts/plan.py` takes on the command line."""

    height: int
    width: int
    frames: int
    subjects: int = 1
    batch: int = 1  # micro-batch per GPU
    zero: int = 2
    sp: int = 1
    gpus: int = 8
    offload: bool = False
    checkpointing: bool = True
    trainable: str = "new-modules"  # new-modules | full
    dtype: str = "bf16"

    def __post_init__(self) -> None:
        if self.zero not in (0, 1, 2, 3):
            raise ValueError(f"ZeRO stage must be 0-3, got {self.zero}")
        if self.sp < 1 or self.gpus % self.sp:
            raise ValueError(f"SP size {self.sp} must divide the number of GPUs {self.gpus}")
        if self.trainable not in ("new-modules", "full"):
            raise ValueError(f"trainable must be new-modules or full, got {self.trainable!r}")

    @property
    def data_parallel(self) -> int:
        return self.gpus // self.sp


@functools.lru_cache(maxsize=16)
def _parameter_counts(config_json: str) -> tuple[int, int, int]:
    """(base, adapter, largest block) parameter counts of a config, built on the meta device."""
    import json

    from idcrafter.video.config import IDCrafterConfig
    from idcrafter.video.transformer import IDCrafterTransformer

    config = IDCrafterConfig.from_dict(json.loads(config_json))
    with torch.device("meta"):
        model = IDCrafterTransformer.from_idcrafter_config(config)
    adapter = sum(p.numel() for p in model.adapter.parameters())
    base = sum(p.numel() for p in model.parameters()) - adapter
    block = max(sum(p.numel() for p in b.parameters()) for b in model.blocks)
    return base, adapter, block


def parameter_counts(config) -> tuple[int, int, int]:
    """(base, adapter, largest block) parameter counts of an `IDCrafterConfig` (exact)."""
    import json

    return _parameter_counts(json.dumps(config.to_dict(), sort_keys=True))


def activation_bytes(config, setup: TrainSetup) -> int:
    """Activations of one sample on one SP rank at the peak of backward (bytes)."""
    shape = WanShape.from_config(config.wan)
    tokens = -(-video_tokens(setup.height, setup.width, setup.frames, shape.patch) // setup.sp)
    ref_h, ref_w = config.ref_canvas(setup.height, setup.width)
    refs = setup.subjects * reference_tokens(ref_h, ref_w, config.subject_patch)
    size = DTYPE_BYTES[setup.dtype]
    k = min(config.num_blocks, shape.layers) if setup.subjects else 0
    block = wan_block_activation_bytes(shape, tokens, config.text_length, setup.dtype)
    stage3 = stage3_activation_elements(shape, tokens, config.stage3_projections) * size if config.uses_stage3 else 0
    tower = tower_layer_activation_elements(shape, refs) * size if config.uses_tower else 0
    head = head_activation_elements(shape, tokens) * size
    if not setup.checkpointing:
        return shape.layers * block + k * (stage3 + tower) + head
    # Block inputs kept by the checkpoints + one block (and one tower layer) recomputed in backward.
    kept = shape.layers * tokens * shape.dim * size + k * refs * shape.dim * size
    return kept + block + stage3 + tower + head


@dataclass(frozen=True)
class MemoryPlan:
    """Per-GPU bytes and the step's analytic FLOPs (all GPUs together)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    zero3_gather: int  # full weights of the blocks ZeRO-3 gathers at a time (current + prefetched)
    step_flops: int
    cpu_offloaded: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.zero3_gather

    def fits(self, gpu_gib: float, reserve: float = 0.9) -> bool:
        """Leaves (1 - reserve) of the GPU to the allocator's fragmentation and CUDA context."""
        return self.total <= reserve * gpu_gib * GIB


def plan(config, setup: TrainSetup) -> MemoryPlan:
    """The memory of one GPU and the FLOPs of one optimizer step for `setup`."""
    base, adapter, block = parameter_counts(config)
    trainable = adapter + (base if setup.trainable == "full" else 0)
    size = DTYPE_BYTES[setup.dtype]
    dp = setup.gpus  # ZeRO's partition group: every rank (see the module docstring)
    weights_total = (base + adapter) * size
    weights = weights_total // dp if setup.zero == 3 else weights_total
    gradients = trainable * size // (dp if setup.zero >= 2 else 1)
    optimizer_total = trainable * 12  # AdamW: fp32 master weights + two fp32 moments
    optimizer = optimizer_total // (dp if setup.zero >= 1 else 1)
    offloaded = 0
    if setup.offload:
        offloaded, optimizer = optimizer, 0
        if setup.zero == 3:
            offloaded, weights = offloaded + weights, 0
    gather = 2 * block * size if setup.zero == 3 else 0
    activations = setup.batch * activation_bytes(config, setup)
    flops = flops_for_config(config, setup.height, setup.width, setup.frames, setup.subjects)
    step = training_step_flops(flops.full_forward, setup.checkpointing) * setup.batch * setup.data_parallel
    return MemoryPlan(weights, gradients, optimizer, activations, gather, step, offloaded)
