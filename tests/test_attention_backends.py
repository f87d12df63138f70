"""diffusers' `set_attention_backend` picks the kernel of every attention of both transformers: the
stock blocks', the subject tower's (intra / inter-subject), stage 3's and the FLUX processors'
(docs/design.md 3.7). Which kernel ran is read from the profiler: on CPU "native" SDPA runs the
flash-for-CPU kernel and "_native_math" the math one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

from idcrafter.core.attention import DispatchAttnProcessor
from idcrafter.video.attention import CrossModalAttention, SharedQueryCrossAttention
from mcimage.config import MCImageConfig
from mcimage.processors import MCFluxAttnProcessor
from mcimage.transformer import MCImageTransformer

sys.path.insert(0, str(Path(__file__).parent))
from test_mcimage_diffusers import _inputs, _perturb  # noqa: E402
from test_video_diffusers import model_and_inputs  # noqa: E402

MATH = "aten::_scaled_dot_product_attention_math"
FLASH_CPU = "aten::_scaled_dot_product_flash_attention_for_cpu"


@pytest.fixture(autouse=True)
def _keep_active_backend():
    """`set_attention_backend` also sets diffusers' process-wide active backend, which
    `reset_attention_backend` leaves as it is: put it back for the other tests."""
    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(active)


def sdpa_kernels(fn) -> tuple[torch.Tensor, dict[str, int]]:
    """fn()'s result and how often each SDPA kernel ran in it."""
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, {e.key: e.count for e in prof.key_averages() if e.key in (MATH, FLASH_CPU)}


def backends(model) -> list:
    return [m.processor._attention_backend for m in model.modules() if isinstance(m, AttentionModuleMixin)]


def check_backends(model, forward, calls: int):
    """The default backend, then "native" and "_native_math" set on every attention module: each
    runs all `calls` attention calls of a forward on its own kernel, with the same output."""
    expected, kernels = sdpa_kernels(forward)
    assert kernels == {FLASH_CPU: calls}
    for backend in ("native", "_native_math"):
        model.set_attention_backend(backend)
        assert backends(model) == [AttentionBackendName(backend)] * len(backends(model))
        got, kernels = sdpa_kernels(forward)
        assert kernels == {FLASH_CPU if backend == "native" else MATH: calls}  # every call, ours included
        if backend == "native":  # the default is diffusers' active backend, "native"
            assert torch.equal(got, expected)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    model.reset_attention_backend()
    assert set(backends(model)) == {None}
    _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)
    assert torch.equal(sdpa_kernels(forward)[0], expected)


def test_video_backend_reaches_subject_tower_and_stage3():
    model, x, subjects = model_and_inputs()
    mask = torch.tensor([[True, True], [True, False]])  # a padded subject: masked inter-subject and stage 3
    ours = [m for m in model.adapter.modules() if isinstance(m, AttentionModuleMixin)]
    layers = len(model.adapter.subject_tower.layers)
    stage3 = [m for m in ours if isinstance(m, (CrossModalAttention, SharedQueryCrossAttention))]
    assert layers == len(stage3) == 2 and len(ours) == 2 * layers + len(stage3)
    assert all(type(m.processor) is DispatchAttnProcessor for m in ours)
    assert "adapter.subject_tower.layers.0.intra_subject_attn.processor" in model.attn_processors

    def forward():
        return model(**x, subjects=subjects, subject_mask=mask, return_dict=False)[0]

    # Per forward: attn1 and attn2 of the 3 blocks, two tower layers x (intra + inter), stage 3 twice.
    assert model.config.num_layers == 3
    check_backends(model, forward, calls=2 * 3 + 2 * layers + len(stage3))


def test_image_backend_reaches_every_processor():
    model = _perturb(MCImageTransformer.from_mc_config(
        MCImageConfig.from_preset("tiny-one-for-all", idar=True, idar_blocks="all"), seed=0)).eval()
    args, kwargs = _inputs(model)
    procs = [m.processor for m in model.modules() if isinstance(m, AttentionModuleMixin)]
    assert len(procs) == 4 and all(isinstance(p, MCFluxAttnProcessor) for p in procs)
    shares = {}

    def forward():
        return model(*args, **kwargs, attention_capture=shares)

    check_backends(model, forward, calls=len(procs))
    assert len(shares) == 4
