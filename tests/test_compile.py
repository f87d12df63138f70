"""Both transformers compile as one graph: `torch.compile(model, fullgraph=True)` raises on any
graph break, so these tests fail if the subject tower, stage 3, the subject context travelling
through Wan's forward, the reference sequence building or the IDAR capture break the graph
(docs/design.md 11). backend="eager" runs dynamo's graph without inductor, which keeps the
tests to seconds on CPU; the compiled model gives the eager model's output."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mcimage.config import MCImageConfig
from mcimage.transformer import MCImageTransformer

sys.path.insert(0, str(Path(__file__).parent))
from test_mcimage_diffusers import _inputs, _perturb  # noqa: E402
from test_video_diffusers import model_and_inputs  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled_matches_eager(model, forward) -> None:
    """forward(model) compiled with fullgraph=True equals forward(model) eagerly (1e-5)."""
    with torch.no_grad():
        expected = forward(model)
        got = forward(torch.compile(model, fullgraph=True, backend="eager"))
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=0)


@pytest.mark.parametrize("padded", [False, True])
def test_video_transformer_compiles_without_graph_breaks(padded):
    """With subjects (tower, stage 3 and its ref shares), a padded subject or none."""
    model, x, subjects = model_and_inputs()
    mask = torch.tensor([[True, True], [True, False]]) if padded else None

    def forward(m):
        capture = {}
        out = m(**x, subjects=subjects, subject_mask=mask, attention_capture=capture, return_dict=False)[0]
        assert sorted(capture) == ["blocks.0.stage3", "blocks.1.stage3"]
        return [out, *(capture[k] for k in sorted(capture))]

    compiled_matches_eager(model, forward)


def test_video_transformer_compiles_with_a_precomputed_stream_and_without_subjects():
    model, x, subjects = model_and_inputs()
    stream = model.encode_subjects(subjects)
    compiled_matches_eager(model, lambda m: [m(**x, subject_stream=stream, return_dict=False)[0],
                                            m(**x, return_dict=False)[0]])


def test_image_transformer_compiles_without_graph_breaks():
    """References with categories, and the IDAR shares of every block."""
    model = _perturb(MCImageTransformer.from_mc_config(
        MCImageConfig.from_preset("tiny-one-for-all", idar=True, idar_blocks="all"), seed=0)).eval()
    args, kwargs = _inputs(model)

    def forward(m):
        capture = {}
        out = m(*args, **kwargs, attention_capture=capture)
        assert len(capture) == 4
        return [out, *(capture[k] for k in sorted(capture))]

    compiled_matches_eager(model, forward)


@pytest.mark.parametrize("kind", ["video", "image"])
def test_compile_repeated_blocks(kind):
    """diffusers' regional compilation (each Wan / FLUX block compiled once, fullgraph) takes the
    blocks with our processors: the subject context reaches attn2, the share capture the FLUX
    processors."""
    if kind == "video":
        model, x, subjects = model_and_inputs()

        def forward(m):
            capture = {}
            return [m(**x, subjects=subjects, attention_capture=capture, return_dict=False)[0], *capture.values()]
    else:
        model = _perturb(MCImageTransformer.from_mc_config(
            MCImageConfig.from_preset("tiny-one-for-all", idar=True, idar_blocks="all"), seed=0)).eval()
        args, kwargs = _inputs(model)

        def forward(m):
            capture = {}
            return [m(*args, **kwargs, attention_capture=capture), *capture.values()]

    with torch.no_grad():
        expected = forward(model)
        torch._dynamo.utils.counters.clear()
        model.compile_repeated_blocks(fullgraph=True, backend="eager")
        got = forward(model)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the blocks did run compiled
    assert len(got) == len(expected) == (3 if kind == "video" else 5)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=0)
