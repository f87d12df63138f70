"""The committed toy-world default model draws the identities it is given."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from idcrafter.video.defaults import TOYWORLD_MODEL, toyworld_available

TOYID = TOYWORLD_MODEL.parent / "toyid"
pytestmark = pytest.mark.skipif(not toyworld_available(), reason="the toy-world model is not installed in idcrafter/assets")


def held_out_samples(count: int, subjects: int):
    from idcrafter.toyworld.world import make_sample

    return [make_sample(i, seed=101, pool="held_out", subjects=(subjects, subjects)) for i in range(count)]


def generate(pipe, sample, refs, seed):
    frames = pipe(sample.clip.prompt, list(refs), generator=torch.Generator().manual_seed(seed)).frames[0]
    return (frames * 255).round().astype(np.uint8)


@pytest.mark.parametrize("subjects", [1, pytest.param(2, marks=pytest.mark.slow)])  # 2: -m slow (CI time)
def test_identity_comes_from_the_references(subjects):
    from idcrafter.toyworld.embedder import ToyIDEmbedder
    from idcrafter.toyworld.metrics import ToyIDScorer
    from idcrafter.video.defaults import default_pipeline

    pipe = default_pipeline()
    pipe.set_progress_bar_config(disable=True)
    scorer = ToyIDScorer(ToyIDEmbedder.load(TOYID))
    samples = held_out_samples(4, subjects)
    matched, shuffled = [], []
    for i, sample in enumerate(samples):
        other = samples[(i + 1) % len(samples)]
        matched.append(scorer.score(generate(pipe, sample, sample.references, i), sample.references)["toyid_mean"])
        shuffled.append(scorer.score(generate(pipe, sample, other.references, i), sample.references)["toyid_mean"])
    print(f"{subjects} subjects: matched {np.mean(matched):.3f}, shuffled {np.mean(shuffled):.3f}")
    assert np.mean(matched) > np.mean(shuffled) + 0.1


def test_assets_are_small():
    size = sum(p.stat().st_size for p in Path(TOYWORLD_MODEL).parent.rglob("*") if p.is_file())
    assert size < 20 * 2**20
