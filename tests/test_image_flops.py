"""Analytic FLOPs of the image transformer (mcimage/flops.py) against torch's FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from flop_counting import counted

from idcrafter.core.flops import moe_lora_flops
from mcimage import flops
from mcimage.config import MCImageConfig
from mcimage.transformer import MCImageTransformer

TARGET_HW, REF_HW, TEXT = (4, 4), (2, 2), 8  # 16 target tokens, 4 per reference

# (preset, overrides): both methods as their presets build them, and a variant that exercises the
# rest of the count: routed top-k experts, DAM per head in the single blocks only, LoRA on a DAM
# MLP layer, the patch embedding and an AdaLN modulation, no guidance embedder (toy FLUX).
CASES = {
    "multicrafter": ("tiny-multicrafter", {}),
    "one-for-all": ("tiny-one-for-all", {}),
    "variant": ("toyworld-multicrafter", dict(top_k=2, dam=True, dam_per_head=True, dam_blocks="single",
                                              lora_target_modules=("to_q", "proj_mlp", "temperature.mlp.0",
                                                                   "x_embedder", "norm1.linear"))),
}
# The FlopCounterMode totals, pinned so that a change of the count or of the model shows here.
EXPECTED = {
    ("multicrafter", 1): 5_552_128, ("multicrafter", 2): 6_393_856,
    ("one-for-all", 1): 4_025_344, ("one-for-all", 2): 4_648_960,
}


def _forward(model: MCImageTransformer, config: MCImageConfig, subjects: int, capture: bool):
    flux = config.flux
    g = torch.Generator().manual_seed(1)
    channels = flux["in_channels"]
    x = torch.randn(1, TARGET_HW[0] * TARGET_HW[1], channels, generator=g)
    refs = torch.randn(1, subjects, REF_HW[0] * REF_HW[1], channels, generator=g)
    text = torch.randn(1, TEXT, flux["joint_attention_dim"], generator=g)
    pooled = torch.randn(1, flux["pooled_projection_dim"], generator=g)
    guidance = torch.tensor([3.5]) if flux.get("guidance_embeds") else None
    categories = ["face", "upper"][:subjects] if config.uses_categories else None
    return lambda: model(x, refs, text, pooled, torch.tensor([0.5]), guidance, target_hw=TARGET_HW,
                         ref_hws=[REF_HW] * subjects, categories=categories,
                         attention_capture={} if capture else None)


@pytest.mark.parametrize("case", list(CASES))
def test_analytic_forward_equals_torch_flop_counter(case):
    """Exact, with 1 and 2 references, and with IDAR share capture where the config has IDAR."""
    preset, overrides = CASES[case]
    config = MCImageConfig.from_preset(preset, **overrides)
    model = MCImageTransformer.from_mc_config(config, seed=0).eval()
    for subjects in (1, 2):
        refs = subjects * REF_HW[0] * REF_HW[1]
        expected = flops.forward_flops(config, 16, TEXT, refs, subjects)
        with torch.no_grad():
            assert counted(_forward(model, config, subjects, capture=False)) == expected
            if config.idar:
                with_shares = flops.forward_flops(config, 16, TEXT, refs, subjects, capture=True)
                assert counted(_forward(model, config, subjects, capture=True)) == with_shares > expected
        if (case, subjects) in EXPECTED:
            assert expected == EXPECTED[case, subjects]


def test_the_parts_of_the_count():
    """The adapter and the shares by hand on the tiny MultiCrafter (dim 32, 2 heads, 2 + 2 blocks,
    MoE-LoRA E = 4, r = 4 on 12 projections per double and 5 per single block; IDAR on the double
    blocks), one reference of 4 tokens: 16 + 4 image and 8 text tokens."""
    config = MCImageConfig.from_preset("tiny-multicrafter")
    plain = MCImageConfig.from_preset("tiny-multicrafter", adapter="none")
    adapter = flops.forward_flops(config, 16, 8, 4, 1) - flops.forward_flops(plain, 16, 8, 4, 1)
    # MoE-LoRA of one d x d layer on n rows: 2n(d*16 + 16*d + d*4)
    assert moe_lora_flops(20, 32, 32, 4, 4) == 2 * 20 * (32 * 16 + 16 * 32 + 32 * 4) == 46_080
    per_double = (4 * moe_lora_flops(20, 32, 32, 4, 4) + 4 * moe_lora_flops(8, 32, 32, 4, 4)
                  + moe_lora_flops(20, 32, 128, 4, 4) + moe_lora_flops(20, 128, 32, 4, 4)
                  + moe_lora_flops(8, 32, 128, 4, 4) + moe_lora_flops(8, 128, 32, 4, 4))
    per_single = (moe_lora_flops(28, 32, 128, 4, 4) + 3 * moe_lora_flops(28, 32, 32, 4, 4)
                  + moe_lora_flops(28, 160, 32, 4, 4))
    assert adapter == 2 * per_double + 2 * per_single == 2_265_088
    # Shares: 16 target queries x 4 reference keys x dim 32, then x the [4, 1] membership per head.
    shares = flops.forward_flops(config, 16, 8, 4, 1, capture=True) - flops.forward_flops(config, 16, 8, 4, 1)
    assert shares == 2 * (2 * 16 * 4 * 32 + 2 * 2 * 16 * 4 * 1) == 8_704
    # A plain LoRA (E = 1) has no router: 2n(d*r + r*d).
    assert moe_lora_flops(10, 32, 32, 4, 1) == 2 * 10 * (32 * 4 + 4 * 32)


def test_flux_dev_forward_at_1024():
    """FLUX.1-dev at 1024x1024 (64 x 64 = 4,096 target tokens), 512 text tokens, no adapter: each
    token through its stream's weights (12 d^2 per double-block stream and per single block, d =
    3,072: 6.45B weights a token, 2 FLOPs each) plus 57 joint attentions over 4,608 tokens."""
    config = MCImageConfig.from_preset("multicrafter", adapter="none", idar=False)
    total = flops.forward_flops(config, 4096, 512)
    shape = flops.FluxShape.from_config(config.flux)
    attention = 57 * 4 * 4608**2 * 3072
    assert attention == 14_872_398_004_224
    assert round((total - attention) / 1e12, 2) == 59.51 and round(total / 1e12, 1) == 74.4
    assert (shape.dim, shape.double_layers, shape.single_layers, shape.guidance_embeds) == (3072, 19, 38, True)
    # With a reference of 1,024 tokens (512x512): the sequence grows to 5,632 tokens.
    assert round(flops.forward_flops(config, 4096, 512, 1024, 1) / total, 3) == 1.276
