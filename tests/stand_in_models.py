"""Tiny random stand-ins for every OpenS2V-Eval column model, written to one folder: a check that every
column runs end to end through scripts/evaluate.py on real files (the numbers mean nothing).

    python tests/stand_in_models.py runs/o2s/standins

then pass the folders as README.md ("The published OpenS2V-Eval files") shows. The builders are the
test suite's own (tests/tiny_insightface.py, tests/test_eval_facesim.py, tests/test_eval_gme.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(out: Path) -> None:
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    sys.path[:0] = [str(HERE), str(HERE.parent)]
    from test_eval_facesim import TINY_ARCH, _random_state
    from test_eval_gme import build_tiny_gme, build_tiny_owlv2
    from tiny_insightface import tiny_pack

    from idcrafter.eval.facesim import curricular_backbone
    from idcrafter.eval.opens2v import aesthetic_head
    from idcrafter.video.vlm import build_tiny_qwen2_5_vl

    out.mkdir(parents=True, exist_ok=True)
    tiny_pack(out / "insightface", "buffalo_l")  # facesim.root
    torch.save(_random_state(curricular_backbone(TINY_ARCH), 7), out / "curricular.bin")  # facesim.arch=TINY_ARCH
    build_tiny_gme(out / "gme")  # gmescore.path, nexusscore.gme
    build_tiny_owlv2(out / "owlv2")  # nexusscore.detector
    build_tiny_qwen2_5_vl(out / "qwen", seed=0)  # naturalscore.path, smoothness.path
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=24)
    CLIPVisionModelWithProjection(config).save_pretrained(out / "clip")  # aesthetics.clip
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out / "clip")
    head = aesthetic_head(24)
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, out / "head.pth")  # aesthetics.head
    print(f"wrote {out}; facesim.arch={TINY_ARCH}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/stand_in_models.py OUT_FOLDER")
    main(Path(sys.argv[1]))
