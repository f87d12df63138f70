"""The toy-world ablation of ID-Crafter's attention (`scripts/benchmark.py toyworld`).

Rows, trained with the same data, steps and seeds from the same base:
  (a) plain:   reference tokens as extra keys of the stock text cross-attention (no hierarchy);
  (b) stage3:  cross-modal attention on the encoded references only;
  (c) full:    intra-subject + gated inter-subject + cross-modal attention;
  (d) full + IDAR (lambda = 0.3 on the toy masks);
  (e) full with stage 3 on attn2's query and output projection (rows b-d give stage 3 its own,
      `IDCrafterConfig.stage3_projections`), its value projection zero at first;
  (f) the same with its per-head gates zero at first instead (`IDCrafterConfig.stage3_init`);
  (g) full + IDAR with stage 3 on attn2's projections (the library default form).
Columns on held-out identities: ToyID mean and min of generated videos, leakage of the subject
attention at fixed noise levels, the flow-matching (reconstruction) loss at the same points, and
the training steps per second.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from idcrafter.core.regularization import leakage, masks_to_token_assignment
from idcrafter.flow import add_noise, flow_loss, flow_target
from idcrafter.video.transformer import to_velocity

# Every row names its stage-3 form, whatever the base folder's adapter has.
ROWS = {
    "a_plain_keys": ["--hierarchy", "plain"],
    "b_stage3_only": ["--hierarchy", "stage3", "--stage3-projections", "own"],
    "c_full": ["--hierarchy", "full", "--stage3-projections", "own"],
    "d_full_idar": ["--hierarchy", "full", "--stage3-projections", "own", "--attn-loss-weight", "0.3"],
    "e_full_attn2_proj": ["--hierarchy", "full", "--stage3-projections", "attn2", "--stage3-init", "value"],
    "f_full_attn2_gate0": ["--hierarchy", "full", "--stage3-projections", "attn2", "--stage3-init", "gate"],
    "g_full_idar_attn2": ["--hierarchy", "full", "--stage3-projections", "attn2", "--stage3-init", "value",
                          "--attn-loss-weight", "0.3"],
}
NOISE_LEVELS = (0.3, 0.5, 0.7)


@torch.no_grad()
def held_out_losses(pipe, manifest: str | Path, limit: int = 16, seed: int = 0) -> dict[str, float]:
    """Flow loss and subject-attention leakage on held-out clips with their masks, fixed t and noise."""
    from idcrafter.data.buckets import Bucket
    from idcrafter.data.dataset import VideoDataset, collate
    from idcrafter.data.manifest import load_manifest

    cfg = pipe.config_idc
    samples, _ = load_manifest(manifest)
    dataset = VideoDataset(samples[:limit], num_frames=cfg.num_frames, fps=cfg.fps, buckets=[Bucket(cfg.height, cfg.width)],
                           ref_size=cfg.ref_canvas(), max_subjects=cfg.max_subjects)
    device = torch.device("cpu")
    model = pipe.transformer
    losses, leaks = [], []
    g = torch.Generator().manual_seed(seed)
    for i in range(len(dataset)):
        batch = collate([dataset[i]])
        if batch is None:
            continue
        z0 = pipe.encode_video(batch["video"], device)
        refs = batch["refs"]
        ref_latents = pipe.encode_video(refs.flatten(0, 1)[:, :, None], device).unflatten(0, refs.shape[:2])
        text = pipe.encode_prompt(batch["prompts"], device)
        p = model.config.patch_size
        grid = (z0.shape[2] // p[0], z0.shape[3] // p[1], z0.shape[4] // p[2])
        assignment = masks_to_token_assignment(batch["masks"], grid) if batch.get("masks") is not None else None
        stream = model.encode_subjects(ref_latents, batch["subject_mask"])
        for t_value in NOISE_LEVELS:
            t = torch.tensor([t_value])
            noise = torch.randn(z0.shape, generator=g)
            capture = {}
            z_t = add_noise(z0, noise, t)
            pred = model(z_t, t * 1000, text, return_dict=False, subject_stream=stream, attention_capture=capture)[0]
            pred = to_velocity(model.idcrafter_config, pred, z_t, t)
            losses.append(float(flow_loss(pred, flow_target(z0, noise))))
            if assignment is not None and capture:
                leaks.append(float(leakage(list(capture.values()), assignment)))
    return {"recon_loss": float(np.mean(losses)), "leakage": float(np.mean(leaks)) if leaks else float("nan")}


def share_map(pipe, sample_refs, prompt: str, seed: int = 0) -> np.ndarray:
    """Subject-0 attention share over the frame at t = 0.5 of the first latent frame: [h, w]."""
    device = torch.device("cpu")
    cfg = pipe.config_idc
    model = pipe.transformer
    with torch.no_grad():
        stream = pipe.encode_subjects(sample_refs, prompt, cfg.height, cfg.width, device)
        shape = (1, pipe.vae.config.z_dim, cfg.num_frames, cfg.height // pipe.vae_scale_spatial, cfg.width // pipe.vae_scale_spatial)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        capture = {}
        model(x, torch.tensor([500.0]), pipe.encode_prompt([prompt], device), return_dict=False, subject_stream=stream,
              attention_capture=capture)
    share = torch.stack(list(capture.values())).mean(0)[0]  # [N, L]
    p = model.config.patch_size
    h, w = shape[3] // p[1], shape[4] // p[2]
    return share[0, : h * w].reshape(h, w).numpy()


def run_ablation(root: Path, out: Path, steps: int, batch_size: int = 8, lr: float = 5e-4, seed: int = 0,
                 eval_limit: int = 16, rows: dict[str, list[str]] | None = None) -> dict:
    """Train every row from `root` (a toy-world build folder: data, base, toyid), evaluate, report."""
    from idcrafter.toyworld.build import assemble_model, step_train
    from idcrafter.toyworld.evaluate import evaluate_model
    from idcrafter.video.pipeline import IDCrafterPipeline

    train, held = root / "data" / "train" / "manifest.jsonl", root / "data" / "held_out" / "manifest.jsonl"
    base, toyid = root / "base", root / "toyid"
    for path in (train, held, base / "model_index.json", toyid / "toyid.json"):
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run `python -m idcrafter.toyworld.build --out {root}` first")
    out.mkdir(parents=True, exist_ok=True)
    cache = root / "cache" if (root / "cache" / "done").is_file() else None  # the build's encodings, if kept
    table = {}
    for name, flags in (rows or ROWS).items():
        run = step_train(out, base, train, steps, batch_size, lr, seed, extra=[*flags, "--no-progress"], run_name=f"run_{name}",
                         cache=cache)
        model_dir = assemble_model(out, base, run, name=f"model_{name}")
        pipe = IDCrafterPipeline.from_pretrained(model_dir)
        toy = evaluate_model(model_dir, held, toyid, limit=eval_limit, seed=seed, pipe=pipe, progress=False)["summary"]
        losses = held_out_losses(pipe, held, limit=eval_limit, seed=seed)
        summary = json.loads((run / "summary.json").read_text())
        table[name] = {"toyid_mean": toy["gen_toyid_mean"], "toyid_min": toy["gen_toyid_min"],
                       "toyid_mean_shuffled": toy["gen_shuffled_toyid_mean"], **losses,
                       "steps_per_s": summary.get("steps_per_s")}
    report = {"case": "toyworld", "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
              "eval_samples": eval_limit, "rows": table}
    (out / "ablation.json").write_text(json.dumps(report, indent=2))
    figure(out, root, list(table))
    return report


def figure(out: Path, root: Path, rows: list[str], index: int = 0) -> Path:
    """One line per row: references, three generated frames, the subject-0 attention-share map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from idcrafter.data.manifest import load_manifest
    from idcrafter.video.pipeline import IDCrafterPipeline

    sample = load_manifest(root / "data" / "held_out" / "manifest.jsonl")[0][index]
    refs = [np.asarray(Image.open(s.image).convert("RGB")) for s in sample.subjects]
    fig, axes = plt.subplots(len(rows), len(refs) + 4, figsize=(1.6 * (len(refs) + 4), 1.7 * len(rows)), squeeze=False)
    for r, name in enumerate(rows):
        pipe = IDCrafterPipeline.from_pretrained(out / f"model_{name}")
        pipe.set_progress_bar_config(disable=True)
        frames = pipe(sample.prompt, refs, generator=torch.Generator().manual_seed(0)).frames[0]
        panels = [*refs, *[frames[i] for i in (0, len(frames) // 2, len(frames) - 1)]]
        for c, img in enumerate(panels):
            axes[r, c].imshow(img)
        axes[r, -1].imshow(share_map(pipe, refs, sample.prompt), vmin=0, vmax=1, cmap="magma")
        axes[r, 0].set_ylabel(name, fontsize=7)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, -1].set_title("share of ref 1", fontsize=7)
    fig.tight_layout()
    path = out / "ablation.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_table(report: dict) -> str:
    lines = [f"toyworld ablation: {report['steps']} steps x batch {report['batch_size']}, {report['eval_samples']} held-out samples",
             f"{'row':<16}{'ToyID mean':>11}{'ToyID min':>10}{'shuffled':>10}{'leakage':>9}{'recon':>8}{'steps/s':>9}"]
    for name, r in report["rows"].items():
        speed = r.get("steps_per_s")
        lines.append(f"{name:<16}{r['toyid_mean']:>11.3f}{r['toyid_min']:>10.3f}{r['toyid_mean_shuffled']:>10.3f}"
                     f"{r['leakage']:>9.3f}{r['recon_loss']:>8.3f}{'-' if speed is None else f'{speed:.2f}':>9}")
    return "\n".join(lines)
