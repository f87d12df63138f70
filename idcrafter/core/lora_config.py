"""MoE-LoRA hyper-parameters and target-module patterns, apart from the layers themselves
(`idcrafter.core.moe_lora`) so that configs can be read and checked without importing torch."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

__all__ = ["FLUX_TARGET_MODULES", "MoELoRAConfig", "module_matches"]

# Attention and feed-forward projections of FLUX double-stream (`transformer_blocks`) and
# single-stream (`single_transformer_blocks`) blocks. `proj_mlp` / `proj_out` are regexes so the
# model's final `proj_out` (latent head) and the AdaLN `norm*.linear` layers stay untouched.
FLUX_TARGET_MODULES: tuple[str, ...] = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    r"single_transformer_blocks\.\d+\.proj_mlp",
    r"single_transformer_blocks\.\d+\.proj_out",
)


# --------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass
class MoELoRAConfig:
    """Hyper-parameters of MoE-LoRA.

    rank, alpha: LoRA rank r and alpha; the update is scaled by alpha / r (peft's convention).
    num_experts: E; 1 gives a plain LoRA without router.
    top_k: keep the k largest gates and renormalise them; None routes densely over all experts.
    target_modules: patterns selecting the `nn.Linear` layers to wrap (rule: `module_matches`).
    dropout: dropout on the adapter input (peft's `lora_dropout`).
    load_balance_weight: weight of the switch load-balancing loss; > 0 makes the layers compute it.
    """

    rank: int = 16
    alpha: float = 16.0
    num_experts: int = 4
    top_k: int | None = None
    target_modules: tuple[str, ...] = FLUX_TARGET_MODULES
    dropout: float = 0.0
    load_balance_weight: float = 0.0

    def __post_init__(self) -> None:
        # JSON and YAML give lists; a tuple keeps the dataclass hashable-ish and immutable.
        self.target_modules = tuple(self.target_modules)
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"MoELoRAConfig.rank must be an integer >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"MoELoRAConfig.alpha must be > 0, got {self.alpha!r}")
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"MoELoRAConfig.num_experts must be an integer >= 1, got {self.num_experts!r}")
        if self.top_k is not None and not (1 <= self.top_k <= self.num_experts):
            raise ValueError(
                f"MoELoRAConfig.top_k must be None or in [1, num_experts={self.num_experts}], got {self.top_k!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MoELoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.load_balance_weight < 0:
            raise ValueError(
                f"MoELoRAConfig.load_balance_weight must be >= 0, got {self.load_balance_weight!r}"
            )
        _validate_patterns(self.target_modules)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["target_modules"] = list(self.target_modules)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoELoRAConfig:
        """Inverse of `to_dict`; unknown keys are an error so a typo never passes silently."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"MoELoRAConfig: unknown key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**data)


def _validate_patterns(patterns: Sequence[str]) -> None:
    if isinstance(patterns, str) or not patterns:
        raise ValueError(f"target_modules must be a non-empty list of patterns, got {patterns!r}")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"target_modules pattern {pattern!r} is not a valid regex: {err}") from None


def module_matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether the qualified module name `name` is selected by one of `patterns`.

    A pattern selects `name` when it is its dotted suffix (`name == p` or `name` ends with
    `"." + p`, so "to_q" selects "transformer_blocks.0.attn.to_q" but not "add_to_q"), or when
    `re.fullmatch(p, name)` succeeds. These are peft's two rules (list / string `target_modules`)
    applied per pattern, so both "ff.net.2" and r"single_transformer_blocks\\.\\d+\\.proj_out" work.
    """
    return any(name == p or name.endswith("." + p) or re.fullmatch(p, name) for p in patterns)
