"""Build the toy-world model from scratch: data, ToyID embedder, base folder, training, evaluation.

    python -m idcrafter.toyworld.build --out runs/toyworld [--steps 3000] [--install]

Steps (each skipped when its output exists, so a stopped build continues):
1. data: train-pool clips and held-out clips (`world.write_dataset`);
2. toyid: the ToyID embedder on the train pool, with its held-out retrieval accuracy;
3. base: a Wan diffusers folder of the `toyworld` preset (character tokenizer, tiny UMT5, the
   lossless pixel-unshuffle codec, a randomly initialised Wan transformer);
   cache: the codec latents and text states of every training clip (`scripts/cache_features.py`);
4. train: `scripts/train_video.py --trainable full` on the train clips;
5. eval: ToyID on held-out identities with the matching references vs shuffled ones;
6. install (--install): copy the model and the embedder into `idcrafter/assets/toyworld`, where
   `scripts/infer.py` finds its default model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "idcrafter" / "assets" / "toyworld"


def log(message: str) -> None:
    print(f"[toyworld {time.strftime('%H:%M:%S')}] {message}", flush=True)


def step_data(out: Path, train_samples: int, eval_samples: int, seed: int) -> tuple[Path, Path]:
    from idcrafter.toyworld.world import write_dataset
    from idcrafter.video.config import IDCrafterConfig

    frames = IDCrafterConfig.from_preset("toyworld").num_frames
    train = out / "data" / "train" / "manifest.jsonl"
    held = out / "data" / "held_out" / "manifest.jsonl"
    if not train.is_file():
        write_dataset(train.parent, train_samples, seed=seed, pool="train", num_frames=frames)
    if not held.is_file():
        write_dataset(held.parent, eval_samples, seed=seed + 1, pool="held_out", num_frames=frames)
    return train, held


def step_toyid(out: Path, steps: int, seed: int) -> dict:
    from idcrafter.toyworld.embedder import ToyIDEmbedder, train_embedder

    folder = out / "toyid"
    if (folder / "toyid.json").is_file():
        return json.loads((folder / "toyid.json").read_text())["metrics"]
    model, report = train_embedder(steps=steps, seed=seed)
    metrics = report.__dict__
    ToyIDEmbedder.save(model, folder, metrics)
    return metrics


def step_base(out: Path, seed: int) -> Path:
    from idcrafter.video.config import IDCrafterConfig
    from idcrafter.video.pipeline import IDCrafterPipeline
    from idcrafter.video.presets import build_components

    folder = out / "base"
    if not (folder / "model_index.json").is_file():
        pipe = IDCrafterPipeline.from_components(build_components(IDCrafterConfig.from_preset("toyworld"), seed=seed))
        pipe.save_pretrained(folder)
    return folder


def step_cache(out: Path, base: Path, data: Path) -> Path:
    """Codec latents, reference latents and text states of every training clip, encoded once."""
    cache = out / "cache"
    if not (cache / "done").is_file():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "cache_features.py"), "--preset", "toyworld",
                        "--base", str(base), "--data", str(data), "--out", str(cache), "--fps", "8"], check=True)
        (cache / "done").write_text("ok\n")
    return cache


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_train(out: Path, base: Path, data: Path, steps: int, batch_size: int, lr: float, seed: int,
               extra: list[str] | None = None, run_name: str = "run", cache: Path | None = None) -> Path:
    run = out / run_name
    if (run / "summary.json").is_file():
        return run
    cached = ["--cache", str(cache)] if cache is not None else []
    cmd = [sys.executable, str(ROOT / "scripts" / "train_video.py"), "--preset", "toyworld", "--base", str(base),
           "--data", str(data), *cached, "--output", str(run), "--deepspeed_config", str(ROOT / "ds_configs" / "zero2.json"),
           "--trainable", "full", "--max-steps", str(steps), "--batch-size", str(batch_size), "--lr", str(lr),
           "--warmup-steps", "100", "--ema-decay", "0.995", "--save-every", str(max(steps // 4, 1)), "--log-every", "10",
           "--seed", str(seed), "--resume", "auto", "--fps", "8", *(extra or [])]
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    subprocess.run(cmd, check=True, env=env)
    return run


def assemble_model(out: Path, base: Path, run: Path, name: str = "model") -> Path:
    """A self-contained model folder: the base components + the trained transformer with its adapter
    (the run exports the adapter with the fine-tuned transformer beside it; saved as one model)."""
    from idcrafter.video.pipeline import IDCrafterPipeline

    model = out / name
    IDCrafterPipeline.from_pretrained(base, adapter=run / "adapter").save_pretrained(model)
    return model


def step_eval(out: Path, model: Path, held: Path, seed: int = 0, limit: int = 32) -> dict:
    from idcrafter.toyworld.evaluate import evaluate_model

    report = evaluate_model(model, held, out / "toyid", limit=limit, seed=seed)
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    return report


def install(model: Path, toyid: Path) -> Path:
    """Copy the model (float16 weights) and the embedder into the package assets."""
    from idcrafter.utils.io import copy_as_float16

    if ASSETS.exists():
        shutil.rmtree(ASSETS)
    copy_as_float16(model, ASSETS / "model")
    shutil.copytree(toyid, ASSETS / "toyid")
    return ASSETS


def main(argv=None) -> int:
    from idcrafter.utils.cli import ArgumentParser

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/toyworld")
    p.add_argument("--train-samples", type=int, default=2000)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--toyid-steps", type=int, default=500)
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--attn-loss-weight", type=float, default=0.3, help="IDAR on the toy masks (0 turns it off)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--install", action="store_true", help="copy the result into idcrafter/assets/toyworld")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log("data")
    train, held = step_data(out, args.train_samples, args.eval_samples, args.seed)
    log("toyid embedder")
    toyid = step_toyid(out, args.toyid_steps, args.seed)
    log(f"toyid: {toyid}")
    base = step_base(out, args.seed)
    log("cache")
    cache = step_cache(out, base, train)
    log("train")
    run = step_train(out, base, train, args.steps, args.batch_size, args.lr, args.seed,
                     extra=["--attn-loss-weight", str(args.attn_loss_weight)], cache=cache)
    model = assemble_model(out, base, run)
    log("eval")
    report = step_eval(out, model, held)
    log(f"eval: {json.dumps(report['summary'])}")
    if args.install:
        log(f"installed in {install(model, out / 'toyid')}")
    log(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
