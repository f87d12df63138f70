"""The committed toy image model (MultiCrafter on the toy image world) draws the identities it is given."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mcimage.infer import BUILTIN_MODEL, builtin_available

TOYID = Path(__file__).resolve().parents[1] / "idcrafter" / "assets" / "toyworld" / "toyid"
pytestmark = pytest.mark.skipif(not builtin_available(), reason="the toy image model is not installed in idcrafter/assets")


@pytest.mark.slow  # kept out of CI for time; run with -m slow
def test_identity_comes_from_the_references(tmp_path):
    from idcrafter.data.manifest import load_manifest
    from idcrafter.toyworld.embedder import ToyIDEmbedder
    from idcrafter.toyworld.metrics import ToyIDScorer
    from idcrafter.toyworld.world import write_image_dataset
    from mcimage import toyworld

    # Held-out identities (another seed than the build's), two subjects each.
    manifest = write_image_dataset(tmp_path, 6, seed=202, pool="held_out", size=toyworld.SIZE,
                                   ref_size=toyworld.REF_SIZE, subjects=(2, 2))
    samples = load_manifest(manifest)[0]
    pipe = toyworld.load_pipeline(BUILTIN_MODEL)
    scorer = ToyIDScorer(ToyIDEmbedder.load(TOYID))
    refs = [[toyworld._rgb(s.image) for s in sample.subjects] for sample in samples]
    matched, shuffled = [], []
    for i, sample in enumerate(samples):
        image = toyworld.generate(pipe, sample.prompt, [s.image for s in sample.subjects], seed=i)[None]
        matched.append(scorer.score(image, refs[i])["toyid_mean"])
        shuffled.append(scorer.score(image, refs[(i + 1) % len(samples)])["toyid_mean"])
    print(f"matched {np.mean(matched):.3f}, shuffled {np.mean(shuffled):.3f}")
    assert np.mean(matched) > np.mean(shuffled) + 0.1


def test_infer_uses_it_by_default(tmp_path):
    import subprocess
    import sys

    from PIL import Image

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out.png"
    proc = subprocess.run([sys.executable, "scripts/infer.py", "--mode", "image", "--refs", "examples/subject_a.png",
                           "examples/subject_b.png", "--prompt", "two objects: the first stays on the left, the second "
                           "stays on the right.", "--out", str(out)], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with Image.open(out) as im:
        assert im.size == (64, 64)


def test_assets_are_small():
    size = sum(p.stat().st_size for p in BUILTIN_MODEL.rglob("*") if p.is_file())
    assert size < 20 * 2**20
