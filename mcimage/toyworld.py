"""The toy image world: MultiCrafter / One-for-All trained and measured on a CPU (docs/design.md 9).

Still frames of the toy world's identities (`idcrafter.toyworld.world.write_image_dataset`), the
lossless pixel-unshuffle codec as VAE, ToyID (the toy world's ArcFace) as identity metric and
reward. `python -m mcimage.toyworld --out runs/toyimage` writes the data, trains the ablation rows
with `scripts/train_image.py` (same steps, batch, lr and seed each) and evaluates them on held-out
identities with two and three subjects:

    in_context      reference tokens in context, UNO ids, no IDAR, no adapter (full fine-tuning)
    idar            + IDAR (lambda 0.3 on the double blocks' ref-restricted shares)
    idar_moe        + MoE-LoRA (E = 4): MultiCrafter
    in_context_single  the in_context row trained on the single-subject pairs (the control for
                    One-for-All's single-to-multi generalisation)
    one_for_all     condition ids (eq. 2) + CCPA + DAM, trained on single-subject pairs of the
                    category world, each reference keeping its true category, pairs resampled
                    2:2:2:1 (face, upper, lower, bag); evaluated on 2-3 subjects of that world
    one_for_all_random  the same with category_binding=random (a random category block each step,
                    whatever the reference shows): the binding ablation

In the category world a subject's category shows in its sprite (world.CATEGORY_STYLES): faces are
circles, rings or hexagons high in the frame, upper garments large squares or crosses in the
middle, lower garments triangles or diamonds low, bags small stars anywhere.

Every row trains the whole model from the same random base (`--trainable all`): the adapter rows
measure the MoE-LoRA / LoRA + DAM as extra capacity trained with the base, not as adapters on a
frozen pretrained model (a toy world has none). Rows already in OUT/ablation.json are kept, so
rows can be added in later invocations (`--rows in_context_single`).

Columns: ToyID mean / min of generated images against their references (Hungarian matching),
the same against another sample's references (shuffled), leakage of the double blocks'
ref-restricted attention on held-out images at t = 0.3, 0.5, 0.7 (1 - share of a token's own
subject, inside the masks), and the held-out flow loss at the same t.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from mcimage.config import MODEL_CONFIG_FIELD

ROOT = Path(__file__).resolve().parents[1]
TOYID = ROOT / "idcrafter" / "assets" / "toyworld" / "toyid"
SIZE, REF_SIZE = 64, 32
# One-for-All's four categories, each with its own look in the toy world (world.CATEGORY_STYLES).
CATEGORIES = ("face", "upper", "lower", "bag")
NOISE_LEVELS = (0.3, 0.5, 0.7)

# name -> (preset, training data, held-out data, extra train_image.py flags). The One-for-All rows
# train on single-subject pairs of the category world, where a subject's category shows in its
# shape, size and place, and are evaluated on 2-3 subjects of held-out identities there.
ROWS: dict[str, tuple[str, str, str, list[str]]] = {
    "in_context": ("toyworld-multicrafter", "train", "held_out", ["--set", "adapter=none", "idar=false"]),
    "idar": ("toyworld-multicrafter", "train", "held_out", ["--set", "adapter=none", "--attn-loss-weight", "0.3"]),
    "idar_moe": ("toyworld-multicrafter", "train", "held_out", ["--attn-loss-weight", "0.3"]),
    # Control for One-for-All's claim: the in-context baseline trained on the same single-subject data.
    "in_context_single": ("toyworld-multicrafter", "single", "held_out", ["--set", "adapter=none", "idar=false"]),
    # One-for-All as published: each reference keeps its category (Sec. 3.2), pairs resampled 2:2:2:1.
    "one_for_all": ("toyworld-one-for-all", "single_categories", "held_out_categories", []),
    # The ablation: a random category each step, whatever the reference shows.
    "one_for_all_random": ("toyworld-one-for-all", "single_categories", "held_out_categories",
                           ["--set", "category_binding=random"]),
}


def log(message: str) -> None:
    print(f"[toyimage {time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_data(out: Path, train: int, held_out: int, seed: int = 0) -> dict[str, Path]:
    """train (1-3 subjects), single (1 subject) and held_out (2-3 subjects) manifests, and the same
    for the category world (single_categories, held_out_categories: One-for-All's rows)."""
    from idcrafter.toyworld.world import write_image_dataset

    specs = {"train": (train, seed, "train", (1, 3), None), "single": (train, seed + 2, "train", (1, 1), None),
             "held_out": (held_out, seed + 1, "held_out", (2, 3), None),
             "single_categories": (train, seed + 3, "train", (1, 1), CATEGORIES),
             "held_out_categories": (held_out, seed + 4, "held_out", (2, 3), CATEGORIES)}
    paths = {}
    for name, (count, s, pool, subjects, categories) in specs.items():
        path = out / "data" / name / "manifest.jsonl"
        if not path.is_file():
            write_image_dataset(path.parent, count, seed=s, pool=pool, size=SIZE, ref_size=REF_SIZE, subjects=subjects,
                                categories=categories)
        paths[name] = path
    return paths


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_row(out: Path, name: str, data: Path, steps: int, batch_size: int, lr: float, seed: int) -> Path:
    """Run scripts/train_image.py for one row (skipped when its summary exists) -> the model folder."""
    preset, _, _, flags = ROWS[name]
    run = out / f"run_{name}"
    if not (run / "summary.json").is_file():
        cmd = [sys.executable, str(ROOT / "scripts" / "train_image.py"), "--preset", preset, "--data", str(data),
               "--output", str(run), "--size", f"{SIZE}x{SIZE}", "--ref-size", f"{REF_SIZE}x{REF_SIZE}",
               "--trainable", "all", "--max-steps", str(steps), "--batch-size", str(batch_size), "--lr", str(lr),
               "--weight-decay", "0", "--warmup-steps", "50", "--ema-decay", "0.995", "--seed", str(seed),
               "--save-every", str(max(steps // 2, 1)), "--log-every", "20", "--resume", "auto", "--no-progress",
               "--deepspeed_config", str(ROOT / "ds_configs" / "zero2.json"), *flags]
        env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(_free_port()))
        subprocess.run(cmd, check=True, env=env)
    return run / "adapter" / "pipeline"


def load_pipeline(model: str | Path):
    import logging

    from mcimage.pipeline import MCImagePipeline

    # The toy captions are longer than the tiny CLIP's 16 tokens; FluxPipeline warns at every call.
    logging.getLogger("diffusers.pipelines.flux.pipeline_flux").setLevel(logging.ERROR)
    pipe = MCImagePipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def eval_categories(pipe, sample) -> list[str] | None:
    """The sample's own categories when the model places references by category; UNO ids take none."""
    return [s.category for s in sample.subjects] if pipe.mc_config.uses_categories else None


def generate(pipe, prompt: str, refs: list, seed: int, categories: list[str] | None = None) -> np.ndarray:
    """One image uint8 [H, W, 3] for a held-out prompt, its reference files and their categories."""
    out = pipe(prompt, refs, categories=categories, height=SIZE, width=SIZE,
               ref_size=(REF_SIZE, REF_SIZE), generator=torch.Generator().manual_seed(seed), output_type="np",
               max_sequence_length=pipe.mc_config.text_length)
    return (out.images[0] * 255).round().astype(np.uint8)


def evaluate_identity(pipe, manifest: Path, toyid: Path = TOYID, limit: int = 32, seed: int = 0) -> dict:
    """ToyID of generated images on held-out samples (matched and shuffled references, ground truth)."""
    from idcrafter.data.manifest import load_manifest
    from idcrafter.toyworld.embedder import ToyIDEmbedder
    from idcrafter.toyworld.evaluate import shuffled_partner
    from idcrafter.toyworld.metrics import ToyIDScorer

    samples = load_manifest(manifest)[0][:limit]
    scorer = ToyIDScorer(ToyIDEmbedder.load(toyid))
    refs = [[_rgb(s.image) for s in sample.subjects] for sample in samples]
    counts = [len(r) for r in refs]
    rows, images = [], []
    for i, sample in enumerate(samples):
        image = generate(pipe, sample.prompt, [s.image for s in sample.subjects], seed + i, eval_categories(pipe, sample))
        images.append(image)
        other = refs[shuffled_partner(counts, i)]
        truth = _rgb(sample.media)
        rows.append({"id": sample.id, "subjects": counts[i],
                     **{f"gen_{k}": v for k, v in scorer.score(image[None], refs[i]).items()},
                     **{f"gen_shuffled_{k}": v for k, v in scorer.score(image[None], other).items()},
                     **{f"truth_{k}": v for k, v in scorer.score(truth[None], refs[i]).items()}})
    keys = [k for k in rows[0] if k not in ("id", "subjects")]
    summary = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    for n in sorted(set(counts)):
        summary[f"gen_toyid_mean_{n}subj"] = float(np.mean([r["gen_toyid_mean"] for r in rows if r["subjects"] == n]))
    return {"summary": summary, "samples": rows, "images": images}


@torch.no_grad()
def held_out_attention(pipe, manifest: Path, limit: int = 16, seed: int = 0) -> dict[str, float]:
    """Flow loss and double-block leakage on held-out images with their masks, at fixed t and noise."""
    from idcrafter.core.regularization import leakage, masks_to_token_assignment
    from idcrafter.data.buckets import Bucket
    from idcrafter.data.dataset import VideoDataset, collate
    from idcrafter.data.manifest import load_manifest
    from idcrafter.flow import add_noise, flow_loss, flow_target
    from mcimage.transformer import pack_latents

    model = pipe.transformer
    config = model.mc_config
    if not config.idar:  # measure with the same capture layers as the IDAR rows
        model.set_capture_config(replace(config, idar=True))
    samples = load_manifest(manifest)[0][:limit]
    dataset = VideoDataset(samples, num_frames=1, buckets=[Bucket(SIZE, SIZE)], ref_size=(REF_SIZE, REF_SIZE),
                           max_subjects=config.max_subjects)
    vae = pipe.vae
    g = torch.Generator().manual_seed(seed)

    def encode(pixels):
        z = vae.encode(pixels).latent_dist.mode()
        return pack_latents((z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor)

    losses, leaks = [], []
    try:
        for i in range(len(dataset)):
            batch = collate([dataset[i]])
            if batch is None:  # the sample failed to decode (counted by the dataset)
                continue
            z0, grid = encode(batch["video"][:, :, 0])
            n = int(batch["subject_mask"][0].sum())
            refs, ref_hw = encode(batch["refs"][0, :n])
            text, pooled, _ = pipe.encode_prompt(prompt=batch["prompts"], prompt_2=None, device=z0.device,
                                                 max_sequence_length=config.text_length)
            assignment = masks_to_token_assignment(batch["masks"][:, :n, 0], grid)
            for t_value in NOISE_LEVELS:
                t = torch.tensor([t_value])
                noise = torch.randn(z0.shape, generator=g)
                capture = {}
                v = model(add_noise(z0, noise, t), refs[None], text, pooled, t, None, target_hw=grid,
                          ref_hws=[ref_hw] * n, categories=eval_categories(pipe, samples[i]), attention_capture=capture)
                losses.append(float(flow_loss(v, flow_target(z0, noise))))
                leaks.append(float(leakage(list(capture.values()), assignment)))
    finally:
        model.set_capture_config(config)
    return {"recon_loss": float(np.mean(losses)), "leakage": float(np.mean(leaks))}


@torch.no_grad()
def share_maps(pipe, sample, seed: int = 0) -> np.ndarray:
    """Per-subject double-block ref share on the token grid at t = 0.5 for a generated image: [N, h, w]."""
    from mcimage.transformer import pack_latents

    model = pipe.transformer
    config = model.mc_config
    if not config.idar:
        model.set_capture_config(replace(config, idar=True))
    try:
        refs = [s.image for s in sample.subjects]
        n = len(refs)
        image = generate(pipe, sample.prompt, refs, seed, eval_categories(pipe, sample))
        pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
        scaling, shift = pipe._latent_affine()
        z0, grid = pack_latents((pipe.vae.encode(pixels).latent_dist.mode() - shift) * scaling)
        ref_tokens, ref_hws = pipe.encode_references(refs, REF_SIZE, REF_SIZE, 1, z0.device, z0.dtype)
        text, pooled, _ = pipe.encode_prompt(prompt=[sample.prompt], prompt_2=None, device=z0.device,
                                             max_sequence_length=config.text_length)
        t = torch.tensor([0.5])
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed))
        capture = {}
        model((1 - t) * z0 + t * noise, ref_tokens, text, pooled, t, None, target_hw=grid, ref_hws=ref_hws,
              categories=eval_categories(pipe, sample), attention_capture=capture)
        share = torch.stack(list(capture.values())).mean(0)[0]  # [N, L]
        return share.reshape(n, *grid).numpy()
    finally:
        model.set_capture_config(config)


def figure(out: Path, pipes: dict, manifest: Path, index: int = 0, seed: int = 0, name: str = "ablation.png") -> Path:
    """One line per row: references, the generated image, each subject's attention-share map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from idcrafter.data.manifest import load_manifest
    from idcrafter.utils.io import atomic_write

    samples = load_manifest(manifest)[0]
    sample = next((s for s in samples[index:] if len(s.subjects) == 3), samples[index])
    n = len(sample.subjects)
    fig, axes = plt.subplots(len(pipes), 2 * n + 1, figsize=(1.6 * (2 * n + 1), 1.7 * len(pipes)), squeeze=False)
    for r, (row, pipe) in enumerate(pipes.items()):
        maps = share_maps(pipe, sample, seed)
        image = generate(pipe, sample.prompt, [s.image for s in sample.subjects], seed, eval_categories(pipe, sample))
        panels = [(_rgb(s.image), f"ref {k + 1}") for k, s in enumerate(sample.subjects)] + [(image, row)]
        panels += [(maps[k], f"share {k + 1}") for k in range(n)]
        for c, (panel, title) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(panel, vmin=0, vmax=1, cmap="magma") if panel.ndim == 2 else ax.imshow(panel)
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    fig.suptitle(sample.prompt[:90], fontsize=7)
    fig.tight_layout()
    path = out / name
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def format_table(report: dict) -> str:
    cols = ["toyid_mean", "toyid_min", "toyid_mean_shuffled", "toyid_mean_2subj", "toyid_mean_3subj", "leakage",
            "recon_loss"]
    width = max([len("row"), *map(len, report["rows"])]) + 2
    lines = [f"{'row':<{width}}" + "  ".join(f"{c:>19}" for c in cols)]
    for name, row in report["rows"].items():
        lines.append(f"{name:<{width}}" + "  ".join(f"{row[c]:>19.3f}" for c in cols))
    return "\n".join(lines)


def run_ablation(out: Path, steps: int, batch_size: int, lr: float, seed: int, train: int, held_out: int,
                 eval_limit: int, rows: list[str], toyid: Path = TOYID) -> dict:
    data = write_data(out, train, held_out, seed)
    log(f"data: {', '.join(f'{k} {v}' for k, v in data.items())}")
    table, pipes = {}, {}
    for name in rows:
        started = time.perf_counter()
        model = train_row(out, name, data[ROWS[name][1]], steps, batch_size, lr, seed)
        pipe = load_pipeline(model)
        manifest = data[ROWS[name][2]]
        ident = evaluate_identity(pipe, manifest, toyid, limit=eval_limit, seed=seed)["summary"]
        attn = held_out_attention(pipe, manifest, limit=min(eval_limit, 16), seed=seed)
        table[name] = {"toyid_mean": ident["gen_toyid_mean"], "toyid_min": ident["gen_toyid_min"],
                       "toyid_mean_shuffled": ident["gen_shuffled_toyid_mean"],
                       "toyid_mean_2subj": ident.get("gen_toyid_mean_2subj", float("nan")),
                       "toyid_mean_3subj": ident.get("gen_toyid_mean_3subj", float("nan")),
                       "truth_toyid_mean": ident["truth_toyid_mean"], **attn}
        pipes[name] = pipe
        log(f"{name}: {json.dumps({k: round(v, 4) for k, v in table[name].items()})} ({time.perf_counter() - started:.0f} s)")
    previous = out / "ablation.json"
    if previous.is_file():  # rows of earlier invocations with the same budget stay in the table
        old = json.loads(previous.read_text())
        if (old["steps"], old["batch_size"], old["lr"], old["seed"]) == (steps, batch_size, lr, seed):
            table = {**{k: v for k, v in old["rows"].items() if k not in table}, **table}
    for name in table:
        if name not in pipes:
            pipes[name] = load_pipeline(out / f"run_{name}" / "adapter" / "pipeline")
    table = {name: table[name] for name in ROWS if name in table}
    report = {"case": "toyimage", "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
              "eval_samples": eval_limit, "rows": table}
    previous.write_text(json.dumps(report, indent=2))
    (out / "ablation.md").write_text(format_table(report) + "\n")
    for split in dict.fromkeys(ROWS[name][2] for name in table):  # one figure per held-out set
        rows_here = {name: pipes[name] for name in table if ROWS[name][2] == split}
        figure(out, rows_here, data[split], seed=seed,
               name="ablation.png" if split == "held_out" else f"ablation_{split.removeprefix('held_out_')}.png")
    return report


ASSETS = ROOT / "idcrafter" / "assets" / "toyimage"


def assemble(pipeline: Path, adapter: Path | None, dest: Path) -> Path:
    """A model folder: a trained row's pipeline (either layout), its adapter optionally replaced (e.g.
    by an RL run's), written by `MCImagePipeline.save_pretrained`."""
    from mcimage.pipeline import MCImagePipeline

    folder = MCImagePipeline.from_pretrained(pipeline, adapter=adapter).save_pretrained(dest)
    # Models trained before configs carried the reference canvas: record the one training used.
    path = folder / "transformer" / "config.json"
    config = json.loads(path.read_text())
    if config[MODEL_CONFIG_FIELD].get("ref_size") is None:
        config[MODEL_CONFIG_FIELD]["ref_size"] = [REF_SIZE, REF_SIZE]
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def install(model: Path) -> Path:
    """Copy a model folder into the package assets with float16 weights: `scripts/infer.py --mode
    image` then uses it when no --model is given. The codec (vae/) has no weights and stays float32."""
    from idcrafter.utils.io import copy_as_float16

    return copy_as_float16(model, ASSETS / "model", keep=("vae",))


def main(argv=None) -> int:
    from idcrafter.utils.cli import ArgumentParser

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/toyimage")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-samples", type=int, default=2000)
    p.add_argument("--held-out-samples", type=int, default=64)
    p.add_argument("--eval-limit", type=int, default=32)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--toyid", default=str(TOYID), help="ToyID embedder folder")
    p.add_argument("--install", default=None, metavar="PIPELINE",
                   help="instead of the ablation: install this trained pipeline folder as the built-in image model")
    p.add_argument("--rl-adapter", default=None, help="with --install: the adapter of an RL run on that pipeline")
    args = p.parse_args(argv)
    if args.install:
        model = assemble(Path(args.install), Path(args.rl_adapter) if args.rl_adapter else None, Path(args.out) / "model")
        print(f"installed {install(model)}")
        return 0
    report = run_ablation(Path(args.out), args.steps, args.batch_size, args.lr, args.seed, args.train_samples,
                          args.held_out_samples, args.eval_limit, args.rows, Path(args.toyid))
    print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
