"""The presets at their real sizes: Wan 2.1 T2V 1.3B / 14B and FLUX.1-dev (12B).

- Unmarked (CI): models built on the meta device. The stock parameter counts are the released
  checkpoints' (Wan2.1-T2V-1.3B: 1,418,996,800; Wan2.1-T2V-14B: 14,288,491,584; FLUX.1-dev:
  11,901,408,320, "12B"), our wrappers' base parts are exactly the stock models (names and shapes),
  and what we add equals the closed-form counts of docs/design.md 3.4, 3.6 and 4. A forward at
  480p x 81 frames (Wan) and 1024x1024 (FLUX) runs on meta tensors: shapes only.
- `slow` (CPU, random weights): the parity claim at full width, adapter at zero init.
- `gpu` (CUDA): attention backends at 480p x 81 frames in bf16, and diffusers' CPU offloads on the
  tiny pipelines with a real accelerator as execution device.
"""

from __future__ import annotations

import time

import pytest
import torch
from diffusers import FluxTransformer2DModel, WanTransformer3DModel

from idcrafter.video.config import WAN_CONFIGS, IDCrafterConfig
from idcrafter.video.transformer import IDCrafterTransformer
from mcimage.config import FLUX_CONFIGS, MCImageConfig
from mcimage.transformer import MCImageTransformer

# Parameter counts of the released transformers (diffusers layout, the configs in WAN_CONFIGS / FLUX_CONFIGS).
STOCK_COUNTS = {"wan-1.3b": 1_418_996_800, "wan-14b": 14_288_491_584, "flux-dev": 11_901_408_320}


def count(params) -> int:
    return sum(p.numel() for p in params)


def shapes(state: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


# ------------------------------------------------------------------------------ closed forms


def wan_adapter_count(config: IDCrafterConfig) -> int:
    """Parameters of the ID-Crafter adapter, full hierarchy (docs/design.md 4), width D, H heads, K blocks:

    subject encoder: 2x2 conv C -> D (D C p^2 + D), index embedding (N D), LayerNorm (2 D);
    per block: stage 1 attention (q, k, v, out: 4 (D^2 + D); RMS q/k norms: 2 D), stage 2 the same
    plus the gate W_g (D^2 + D), stage 3 on attn2's projections k, v (2 (D^2 + D)), RMS k norm (D)
    and a gate per head (H): 11 D^2 + 16 D + H (stage 3 on its own projections: the full attention,
    13 D^2 + 19 D); VLM connector: LayerNorm (2 V), V -> D -> D MLP.
    """
    wan = config.wan
    d = wan["num_attention_heads"] * wan["attention_head_dim"]
    k = min(config.num_blocks, wan["num_layers"])
    attention = 4 * (d * d + d) + 2 * d
    stage3 = attention if config.stage3_projections == "own" else 2 * (d * d + d) + d + wan["num_attention_heads"]
    encoder = d * config.latent_channels * config.subject_patch ** 2 + d + config.max_subjects * d + 2 * d
    vlm = 2 * config.vlm_dim + config.vlm_dim * d + d + d * d + d if config.use_vlm else 0
    return encoder + k * (2 * attention + d * d + d + stage3) + vlm


def wan_lora_count(wan: dict, rank: int) -> int:
    """LoRA of rank r on WAN_LORA_TARGETS: r (in + out) per layer; per block 8 D -> D attention
    projections (attn1 and attn2: q, k, v, out) and the FFN D -> F -> D."""
    d = wan["num_attention_heads"] * wan["attention_head_dim"]
    return wan["num_layers"] * rank * (8 * 2 * d + 2 * (d + wan["ffn_dim"]))


def flux_lora_count(flux: dict, rank: int, experts: int) -> int:
    """MoE-LoRA on FLUX_TARGET_MODULES (docs/design.md 3.6): E r (in + out) per layer plus a router
    (in -> E, no bias) when E > 1. Double blocks: 8 D -> D attention projections (image and text
    streams) and two D -> 4D -> D feed-forwards: 36 D per expert-rank, inputs 18 D. Single blocks:
    q, k, v (D -> D), proj_mlp (D -> 4D), proj_out (5D -> D): 17 D, inputs 9 D."""
    d = flux["num_attention_heads"] * flux["attention_head_dim"]
    router = experts if experts > 1 else 0
    double = experts * rank * 36 * d + router * 18 * d
    single = experts * rank * 17 * d + router * 9 * d
    return flux["num_layers"] * double + flux["num_single_layers"] * single


def flux_dam_count(flux: dict) -> int:
    """DAM in every attention (docs/design.md 3.4): an MLP D -> max(32, D / 4) -> 1 per block."""
    d = flux["num_attention_heads"] * flux["attention_head_dim"]
    hidden = max(32, d // 4)
    return (flux["num_layers"] + flux["num_single_layers"]) * (d * hidden + hidden + hidden + 1)


# ------------------------------------------------------------------------------ meta device: counts


@pytest.mark.parametrize("preset", ["wan-1.3b", "wan-14b"])
def test_wan_presets_are_the_released_models_plus_the_closed_form_adapter(preset):
    config = IDCrafterConfig.from_preset(preset)
    with torch.device("meta"):
        stock = WanTransformer3DModel(**WAN_CONFIGS[preset])
        ours = IDCrafterTransformer.from_idcrafter_config(config)
    assert count(stock.parameters()) == STOCK_COUNTS[preset]
    base = {k: v for k, v in ours.state_dict().items() if not k.startswith("adapter.")}
    assert shapes(base) == shapes(stock.state_dict())
    assert count(ours.base_parameters()) == STOCK_COUNTS[preset]
    assert count(ours.adapter.parameters()) == wan_adapter_count(config)
    assert count(ours.parameters()) == STOCK_COUNTS[preset] + wan_adapter_count(config)
    assert config.stage3_projections == "attn2"
    assert wan_adapter_count(config) == {"wan-1.3b": 519_644_400, "wan-14b": 5_769_165_600}[preset]
    # Stage 3 on its own projections adds its query / output projections and q norm, drops the gates.
    own = IDCrafterConfig.from_preset(preset, stage3_projections="own")
    assert wan_adapter_count(own) == {"wan-1.3b": 614_108_160, "wan-14b": 6_818_048_000}[preset]
    with torch.device("meta"):
        assert count(IDCrafterTransformer.from_idcrafter_config(own).adapter.parameters()) == wan_adapter_count(own)


def test_wan_1_3b_with_the_vlm_connector_and_lora():
    config = IDCrafterConfig.from_preset("wan-1.3b", use_vlm=True)
    with torch.device("meta"):
        ours = IDCrafterTransformer.from_idcrafter_config(config)
        names = ours.add_lora(rank=64)
    assert len(names) == 30 * 10
    assert count(ours.adapter.vlm_connector.parameters()) == 2 * 3584 + 3584 * 1536 + 1536 + 1536 ** 2 + 1536
    assert count(ours.adapter.parameters()) == wan_adapter_count(config)
    lora = [p for n, p in ours.named_parameters() if "lora_" in n]
    assert count(lora) == wan_lora_count(config.wan, 64) == 30 * 64 * (16 * 1536 + 2 * (1536 + 8960))
    assert count(ours.base_parameters()) == STOCK_COUNTS["wan-1.3b"]
    assert count(ours.trainable_parameters("lora")) == wan_lora_count(config.wan, 64)


@pytest.mark.parametrize("preset", ["multicrafter", "one-for-all"])
def test_flux_presets_are_flux_dev_plus_the_closed_form_adapter(preset):
    config = MCImageConfig.from_preset(preset)
    with torch.device("meta"):
        stock = FluxTransformer2DModel(**FLUX_CONFIGS["flux-dev"])
        ours = MCImageTransformer.from_mc_config(config)
    assert count(stock.parameters()) == STOCK_COUNTS["flux-dev"]
    assert shapes(ours.base_state_dict()) == shapes(stock.state_dict())
    experts = 1 if config.adapter == "lora" else config.num_experts
    lora = flux_lora_count(config.flux, config.lora_rank, experts)
    dam = flux_dam_count(config.flux) if config.dam else 0
    assert count(ours._added_parameters("lora").values()) == lora
    assert count(ours._added_parameters("dam").values()) == dam
    assert count(ours.parameters()) == STOCK_COUNTS["flux-dev"] + lora + dam
    # MultiCrafter: E = 4, r = 16; One-for-All: r = 512 and DAM in all 57 blocks.
    assert (lora, dam) == {"multicrafter": (269_893_632, 0), "one-for-all": (2_091_909_120, 134_567_481)}[preset]


# ------------------------------------------------------------------------------ meta device: forward shapes


def test_wan_1_3b_forward_at_480p_81_frames_on_meta():
    """81 frames at 480x832: latent 21 x 60 x 104 (VAE /4 in time, /8 in space); three subjects
    at the output size; the VLM's 3584-wide states join stage 3."""
    config = IDCrafterConfig.from_preset("wan-1.3b", use_vlm=True)
    with torch.device("meta"):
        model = IDCrafterTransformer.from_idcrafter_config(config).eval()
        x = torch.empty(1, 16, 21, 60, 104)
        args = (x, torch.empty(1), torch.empty(1, 512, 4096))
        subjects = torch.empty(1, 3, 16, 60, 104)
        stream = model.encode_subjects(subjects, vlm_states=torch.empty(1, 300, 3584))
        plain = model(*args, return_dict=False)[0]
        ours = model(*args, return_dict=False, subject_stream=stream)[0]
    assert plain.shape == ours.shape == x.shape and ours.is_meta
    assert len(stream.kv) == 20
    # Keys: 3 subjects x (60 / 2) x (104 / 2) patch tokens + 300 VLM tokens, 12 heads of 128.
    assert stream.kv[0].k.shape == (1, 12, 3 * 30 * 52 + 300, 128)


@pytest.mark.parametrize("preset", ["multicrafter", "one-for-all"])
def test_flux_dev_forward_at_1024_on_meta(preset):
    """1024x1024: packed latent grid 64 x 64 (VAE /8, 2x2 packing), two 512x512 references (32 x 32)."""
    config = MCImageConfig.from_preset(preset)
    with torch.device("meta"):
        model = MCImageTransformer.from_mc_config(config).eval()
        x = torch.empty(1, 64 * 64, 64)
        refs = [torch.empty(1, 32 * 32, 64), torch.empty(1, 32 * 32, 64)]
        shares = {} if config.idar else None
        out = model(x, refs, torch.empty(1, 512, 4096), torch.empty(1, 768), torch.empty(1), torch.empty(1),
                    target_hw=(64, 64), ref_hws=[(32, 32), (32, 32)], categories=["face", "upper"],
                    attention_capture=shares)
    assert out.shape == x.shape and out.is_meta
    if config.idar:  # IDAR's shares of the 19 double blocks: [B, N refs, L_target]
        assert len(shares) == 19 and all(s.shape == (1, 2, 4096) for s in shares.values())


# ------------------------------------------------------------------------------ slow: full-width parity on CPU


def _rss_gib() -> float:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    return kib / 2**20


@pytest.mark.slow
def test_wan_1_3b_parity_at_init_on_cpu():
    """Full-size Wan 2.1 1.3B in float32 (5.7 GB, adapter 2.1 GB): with three subjects and the
    adapter at zero init, our model equals the stock one to 1e-5 (a small latent: 2 x 8 x 8)."""
    start = time.perf_counter()
    torch.manual_seed(0)
    stock = WanTransformer3DModel(**WAN_CONFIGS["wan-1.3b"]).eval()
    ours = IDCrafterTransformer.from_wan(stock, IDCrafterConfig.from_preset("wan-1.3b")).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 2, 8, 8, generator=g)
    args = (x, torch.tensor([500.0]), torch.randn(1, 32, 4096, generator=g))
    subjects = torch.randn(1, 3, 16, 8, 8, generator=g)
    with torch.no_grad():
        expected = stock(*args, return_dict=False)[0]
        got = ours(*args, return_dict=False, subjects=subjects)[0]
        assert expected.abs().mean() > 0.1
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        # A trained stage 3 moves the output: the comparison above can fail.
        torch.nn.init.normal_(ours.adapter.cross_modal_attn[0].to_v.weight, std=0.02)
        assert (ours(*args, return_dict=False, subjects=subjects)[0] - expected).abs().max() > 1e-3
    print(f"wan-1.3b parity: {time.perf_counter() - start:.0f} s, peak RSS {_rss_gib():.1f} GiB")


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["multicrafter", "one-for-all"])
def test_flux_full_width_parity_at_init_on_cpu(preset):
    """FLUX.1-dev's width (24 heads x 128, T5 4096, CLIP 768, 64 latent channels) with 2 double and
    2 single blocks in float32 (all 57 blocks would be 48 GB): with references, the preset's adapter
    (MoE-LoRA E = 4 / LoRA r = 512 and DAM) at zero init equals the same model without it."""
    start = time.perf_counter()
    flux = dict(FLUX_CONFIGS["flux-dev"], num_layers=2, num_single_layers=2)
    torch.manual_seed(0)
    base = FluxTransformer2DModel(**flux).eval()
    plain = MCImageTransformer.from_flux(base, MCImageConfig.from_preset(  # both share the weights of `base`
        preset, adapter="none", dam=False)).eval()
    ours = MCImageTransformer.from_flux(base, MCImageConfig.from_preset(preset)).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 64, 64, generator=g)
    refs = [torch.randn(1, 16, 64, generator=g), torch.randn(1, 16, 64, generator=g)]
    args = (torch.randn(1, 32, 4096, generator=g), torch.randn(1, 768, generator=g), torch.tensor([0.5]),
            torch.tensor([3.5]))
    extra = dict(target_hw=(8, 8), ref_hws=[(4, 4), (4, 4)], categories=["face", "upper"])
    with torch.no_grad():
        expected = plain(x, refs, *args, **extra)
        got = ours(x, refs, *args, **extra)
        assert expected.abs().mean() > 0.1
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        if preset == "multicrafter":  # without references (UNO ids: the target grid at t = 0): the stock FLUX
            ids = torch.cat([torch.zeros(64, 1), torch.cartesian_prod(torch.arange(8.0), torch.arange(8.0))], 1)
            flux_out = plain.to_flux()(hidden_states=x, encoder_hidden_states=args[0], pooled_projections=args[1],
                                       timestep=args[2], guidance=args[3], img_ids=ids, txt_ids=torch.zeros(32, 3),
                                       return_dict=False)[0]
            torch.testing.assert_close(ours(x, None, *args, target_hw=(8, 8)), flux_out, atol=1e-5, rtol=0)
        # A trained adapter moves the output: the comparisons above can fail.
        for name, p in ours.named_parameters():
            if ".lora_B" in name:
                p.normal_(std=0.02)
        assert (ours(x, refs, *args, **extra) - expected).abs().max() > 1e-3
    print(f"flux full width ({preset}): {time.perf_counter() - start:.0f} s, peak RSS {_rss_gib():.1f} GiB")


# ------------------------------------------------------------------------------ gpu


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def _keep_active_backend():
    """`set_attention_backend` also sets diffusers' process-wide active backend: put it back."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(active)


@pytest.mark.gpu
@needs_cuda
def test_wan_1_3b_attention_backends_at_480p_81_frames(_keep_active_backend):
    """One bf16 denoising forward of the full-size 1.3B model (32,760 video tokens, three subjects,
    a trained-looking adapter) per available backend equals "native" within bf16 tolerance."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = IDCrafterTransformer.from_idcrafter_config(IDCrafterConfig.from_preset("wan-1.3b"))
    model = model.to(device, torch.bfloat16).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.adapter.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p))
    x = torch.randn(1, 16, 21, 60, 104, generator=g).to(device, torch.bfloat16)
    args = (x, torch.tensor([500.0], device=device), torch.randn(1, 512, 4096, generator=g).to(device, torch.bfloat16))
    subjects = torch.randn(1, 3, 16, 60, 104, generator=g).to(device, torch.bfloat16)

    def forward():
        with torch.no_grad():
            return model(*args, return_dict=False, subjects=subjects)[0].float()

    model.set_attention_backend("native")
    expected = forward()
    ran = []
    for backend in ("flash", "_native_cudnn"):
        try:
            model.set_attention_backend(backend)
        except (RuntimeError, ImportError, ValueError) as err:  # not installed / not supported here
            print(f"{backend}: unavailable ({err})")
            continue
        got = forward()
        rel = ((got - expected).norm() / expected.norm()).item()
        print(f"{backend}: relative L2 difference to native {rel:.2e}")
        assert rel < 2e-2
        ran.append(backend)
    assert "_native_cudnn" in ran or "flash" in ran, "no backend besides native ran"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_video_pipeline_offload_on_cuda_equals_plain(mode):
    from test_video_pipeline_api import latents, make_pipe

    plain = latents(make_pipe().to("cuda")).cpu()
    pipe = make_pipe()
    getattr(pipe, f"enable_{mode}_cpu_offload")(device="cuda")
    assert pipe._execution_device.type == "cuda"
    torch.testing.assert_close(latents(pipe).cpu(), plain, atol=1e-5, rtol=0)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_image_pipeline_offload_on_cuda_equals_plain(mode):
    import numpy as np
    from test_mcimage_pipeline_api import _call, _pipe

    plain = _call(_pipe().to("cuda"), seed=3)
    pipe = _pipe()
    getattr(pipe, f"enable_{mode}_cpu_offload")(device="cuda")
    assert pipe._execution_device.type == "cuda"
    np.testing.assert_allclose(_call(pipe, seed=3), plain, atol=1e-5, rtol=0)
