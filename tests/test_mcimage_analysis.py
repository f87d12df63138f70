"""mcimage.analysis, scripts/analyze_routing.py and the image-idar benchmark on tiny random models."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mcimage.analysis import (
    attention_figure,
    capture_enabled,
    routing_change_figure,
    routing_statistics,
    subject_attention_maps,
)
from mcimage.config import MCImageConfig
from mcimage.pipeline import MCImagePipeline
from mcimage.presets import TINY_T5_LENGTH, build_tiny_components
from mcimage.processors import MCFluxAttnProcessor

ROOT = Path(__file__).resolve().parents[1]
H = W = 32  # tiny VAE: /2, packed 2x2 -> an 8x8 token grid
GRID = (8, 8)
KW = dict(height=H, width=W, steps=2, seed=0, max_sequence_length=TINY_T5_LENGTH)


def _pipe(**overrides) -> MCImagePipeline:
    return MCImagePipeline.from_components(
        build_tiny_components(MCImageConfig.from_preset("tiny-multicrafter", **overrides), seed=0)
    )


def _refs() -> list[Image.Image]:
    red = np.zeros((20, 12, 3), np.uint8)
    red[..., 0] = 220
    blue = np.zeros((12, 20, 3), np.uint8)
    blue[4:, :, 2] = 200
    return [Image.fromarray(red), Image.fromarray(blue)]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class QKRecorder(MCFluxAttnProcessor):
    """The real processor that also keeps the q and k it computed the share from."""

    def _record(self, q: torch.Tensor, k: torch.Tensor, active) -> None:
        super()._record(q, k, active)
        self.qk = (q.detach().clone(), k.detach().clone())


@pytest.fixture(scope="module")
def pipe():
    return _pipe()


# ------------------------------------------------------------------------------ attention maps


def test_maps_equal_share_from_captured_queries_and_keys():
    pipe = _pipe()
    # Swap the double blocks' processors for recorders (no DAM here, so no weights to carry over).
    recorders = {}
    for i, block in enumerate(pipe.transformer.transformer_blocks):
        name = f"transformer_blocks.{i}"
        old = pipe.transformer.processors[name]
        rec = QKRecorder(block.attn.inner_dim, block.attn.heads, capture=old.capture)
        rec.name = name
        block.attn.set_processor(rec)
        pipe.transformer.processors[name] = rec
        recorders[name] = rec
    att = subject_attention_maps(pipe, "a red thing and a blue thing", _refs(), t=0.5, **KW)

    assert att.maps.shape == (2, *GRID) and att.grid == GRID and att.image.shape == (H, W, 3)
    assert att.blocks == tuple(recorders)
    np.testing.assert_allclose(att.maps, att.block_maps.mean(0), atol=1e-6)
    np.testing.assert_allclose(att.maps.sum(0), np.ones(GRID), atol=1e-5)

    text, target = TINY_T5_LENGTH, GRID[0] * GRID[1]
    ref_ranges = [(text + target, text + 2 * target), (text + 2 * target, text + 3 * target)]  # refs at target size
    expected = []
    for rec in recorders.values():
        q, k = (x.double() for x in rec.qk)  # [1, H, L, D]
        assert q.shape[2] == text + 3 * target
        probs = (q[:, :, text : text + target] @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
        mass_text = probs[..., :text].sum(-1)
        mass_target = probs[..., text : text + target].sum(-1)
        mass_refs = [probs[..., s:e].sum(-1) for s, e in ref_ranges]  # each [1, H, L_t]
        # The full row splits into text, target and the subjects' references.
        torch.testing.assert_close(mass_text + mass_target + sum(mass_refs), torch.ones_like(mass_text))
        ref_total = sum(mass_refs)
        share = torch.stack([m / ref_total for m in mass_refs], 1).mean(2)  # [1, N, L_t], mean over heads
        expected.append(share[0].reshape(2, *GRID).numpy())
    np.testing.assert_allclose(att.block_maps, np.stack(expected), atol=1e-5)
    np.testing.assert_allclose(att.maps, np.mean(expected, 0), atol=1e-5)
    assert att.maps.std() > 1e-4  # the maps vary over the image


def test_capture_context_turns_capture_on_and_restores():
    pipe = _pipe(idar=False)
    procs = pipe.transformer.processors
    assert not any(p.capture for p in procs.values())
    with capture_enabled(pipe.transformer) as names:
        assert names == ["transformer_blocks.0", "transformer_blocks.1"]
        assert [n for n, p in procs.items() if p.capture] == names
    assert not any(p.capture for p in procs.values())
    with pytest.raises(RuntimeError), capture_enabled(pipe.transformer, "single"):
        assert all(procs[n].capture for n in ("single_transformer_blocks.0", "single_transformer_blocks.1"))
        raise RuntimeError("inside")
    assert not any(p.capture for p in procs.values())
    with pytest.raises(ValueError, match="not attention blocks"):
        with capture_enabled(pipe.transformer, ["transformer_blocks.7"]):
            pass

    att = subject_attention_maps(pipe, "two things", _refs(), **KW)
    assert att.blocks == ("transformer_blocks.0", "transformer_blocks.1")
    assert not any(p.capture for p in procs.values())
    np.testing.assert_allclose(att.maps.sum(0), np.ones(GRID), atol=1e-5)
    single = subject_attention_maps(pipe, "two things", _refs(), blocks="single", **KW)
    assert single.blocks == ("single_transformer_blocks.0", "single_transformer_blocks.1")
    assert not np.allclose(single.maps, att.maps)
    np.testing.assert_array_equal(single.image, att.image)  # the same generation


def test_attention_figure_overlays_token_maps(tmp_path, pipe):
    maps = np.random.default_rng(0).random((2, *GRID)).astype(np.float32)
    image = np.random.default_rng(1).random((H, W, 3)).astype(np.float32)
    path = tmp_path / "fig" / "attention.png"
    big = attention_figure(image, _refs(), maps, path, titles=["red", "blue"])
    for k in range(2):  # each token's value over its 4x4 pixel patch
        np.testing.assert_array_equal(big[k], np.kron(maps[k], np.ones((4, 4), np.float32)))
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > 200
    assert [p.name for p in path.parent.iterdir()] == ["attention.png"]
    with pytest.raises(ValueError, match="1 references for 2 maps"):
        attention_figure(image, _refs()[:1], maps, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


# ------------------------------------------------------------------------------ routing


def test_routing_statistics_and_change(tmp_path, pipe):
    a = routing_statistics(pipe, "a red thing", _refs(), **KW)
    again = routing_statistics(pipe, "a red thing", _refs(), **KW)
    b = routing_statistics(pipe, "a blue box on a table", _refs(), **KW)
    n_layers = len([n for n in pipe.transformer.adapter_modules])
    assert a.probs.shape == (n_layers, 4) and a.layers == b.layers
    np.testing.assert_allclose(a.probs.sum(1), np.ones(n_layers), atol=1e-5)
    assert (a.probs >= 0).all()

    same = routing_change_figure(a, again, tmp_path / "same.png")
    np.testing.assert_array_equal(same, np.zeros_like(same))
    change = routing_change_figure(a, b, tmp_path / "change.png")
    np.testing.assert_allclose(change, np.abs(a.probs - b.probs) / (a.probs + 1e-6), rtol=1e-5)
    assert change.max() > 1e-3
    with Image.open(tmp_path / "change.png") as png:
        assert png.format == "PNG"


def test_routing_change_over_seeds_is_the_mean_of_each_seeds_change(pipe):
    """MultiCrafter supp. Sec. H: per-seed change ratios averaged over seeds, double blocks only."""
    from mcimage.analysis import routing_change_over_seeds

    kw = {**{k: v for k, v in KW.items() if k != "seed"}, "blocks": "double"}
    mean_a, mean_b, change = routing_change_over_seeds(pipe, "a red thing", "a blue box on a table", [0, 1],
                                                       refs=_refs(), **kw)
    runs = [(routing_statistics(pipe, "a red thing", _refs(), **{**kw, "seed": s}),
             routing_statistics(pipe, "a blue box on a table", _refs(), **{**kw, "seed": s})) for s in (0, 1)]
    per_seed = [np.abs(a.probs - b.probs) / (a.probs + 1e-6) for a, b in runs]
    np.testing.assert_allclose(change, np.mean(per_seed, 0), rtol=1e-5)
    np.testing.assert_allclose(mean_a.probs, (runs[0][0].probs + runs[1][0].probs) / 2, rtol=1e-6)
    assert mean_a.layers and all(n.startswith("transformer_blocks.") for n in mean_a.layers)
    every = routing_statistics(pipe, "a red thing", _refs(), **KW)
    assert len(every.layers) > len(mean_a.layers)  # the single blocks' routed layers are left out


def test_routing_needs_moe_lora():
    pipe = MCImagePipeline.from_components(build_tiny_components(MCImageConfig.from_preset("tiny-one-for-all"), seed=0))
    with pytest.raises(ValueError, match="has no MoE-LoRA layers"):
        routing_statistics(pipe, "a man", _refs()[:1], categories=["face"], **KW)


# ------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def ref_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("refs")
    paths = []
    for i, img in enumerate(_refs()):
        paths.append(str(folder / f"subject{i}.png"))
        img.save(paths[-1])
    return paths


def test_cli_writes_figures_and_json(tmp_path, ref_files):
    out = tmp_path / "analysis"
    rc = _script("analyze_routing").main([
        "--prompt-a", "a red thing", "--prompt-b", "a blue box on a table", "--refs", *ref_files,
        "--preset", "tiny-multicrafter", "--size", "32x32", "--steps", "2", "--out", str(out), "--attention",
        "--seeds", "1",  # one seed: the change is that of the recorded gates (several: test above)
    ])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "attention_maps.npz", "attention_maps.png", "routing.json", "routing_change.png",
    ]
    data = json.loads((out / "routing.json").read_text())
    assert data["seeds"] == [0] and data["blocks"] == "double"
    assert data["layers"] and all(n.startswith("transformer_blocks.") for n in data["layers"])
    gates_a, gates_b, change = (np.array(data[k]) for k in ("gates_a", "gates_b", "change"))
    assert gates_a.shape == (len(data["layers"]), data["experts"]) == change.shape
    np.testing.assert_allclose(gates_a.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(change, np.abs(gates_a - gates_b) / (gates_a + 1e-6), rtol=1e-5)
    np.testing.assert_allclose(data["mean_change_per_layer"], change.mean(1), rtol=1e-6)
    with np.load(out / "attention_maps.npz") as npz:
        assert npz["maps"].shape == (2, *GRID) and npz["image"].shape == (H, W, 3)
        np.testing.assert_allclose(npz["maps"], npz["block_maps"].mean(0), atol=1e-6)
        np.testing.assert_allclose(npz["maps"].sum(0), 1, atol=1e-5)
    for name in ("attention_maps.png", "routing_change.png"):
        with Image.open(out / name) as png:
            assert png.format == "PNG"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--preset", "tiny-one-for-all", "--categories", "face", "upper"], "has no MoE-LoRA layers"),
        (["--refs", "missing.png"], "missing.png does not exist"),
        (["--categories", "face"], "--categories has 1 entries for 2 --refs"),
        (["--size", "30x32"], "multiples of 4"),
        (["--preset", "flux-pro"], "unknown"),
    ],
)
def test_cli_bad_input_exit_2_nothing_written(tmp_path, ref_files, capsys, extra, message):
    out = tmp_path / "analysis"
    args = ["--prompt-a", "a", "--prompt-b", "b", "--refs", *ref_files, "--out", str(out), "--size", "32x32"]
    rc = _script("analyze_routing").main(args + extra)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


# ------------------------------------------------------------------------------ benchmark


def test_image_idar_benchmark_quick(tmp_path, capsys):
    path = tmp_path / "idar.json"
    rc = _script("benchmark").main([
        "image-idar", "--quick", "--device", "cpu", "--repeats", "1", "--share-chunk", "4", "--json", str(path),
    ])
    assert rc == 0
    report = json.loads(path.read_text())
    assert report["config"] == "tiny" and report["idar_blocks"] == 2
    assert list(report["results"]) == ["none", "idar", "idar/chunk=4"]
    for row in report["results"].values():
        assert row["seconds"] > 0 and row["peak_mib"] > 0 and row["time_ratio"] > 0 and row["memory_ratio"] > 0
    assert report["results"]["none"]["time_ratio"] == 1.0
    assert "idar/chunk=4" in capsys.readouterr().out
