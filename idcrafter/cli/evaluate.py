"""Score generated videos / images on a benchmark manifest. --protocol opens2v (default): OpenS2V-Eval's
own columns and leaderboard totals (idcrafter/eval/opens2v.py); --protocol legacy (default with
--toyworld, --metrics, --weights or a reward's --model-option): FaceSim, NexusScore, CLIP-T, CLIP-I, DINO-I, Aesthetic,
NaturalScore, ToyID, Motion, Leakage and an OpenS2V-style weighted total.

    python scripts/evaluate.py --data bench.jsonl --videos outputs/ --out runs/eval
    python scripts/evaluate.py --data bench.jsonl --videos outputs/ --out runs/eval --protocol legacy \\
        --model-option face.backend=dlib --model-option clip_text.path=/models/clip
    python scripts/evaluate.py --data bench.jsonl --videos a.mp4 b.mp4 c.png --out runs/eval
    python scripts/evaluate.py --opens2v Open-Domain_Eval.json --images-root OpenS2V-Eval --videos OUT --out runs/eval
    python scripts/evaluate.py --toyworld [--model FOLDER] [--samples 8] --out runs/eval_toy

Files in a --videos folder are matched to samples by id (<id>.mp4, <id>.png); a list of files is
taken in manifest order. With --opens2v (a published OpenS2V-Eval file: Open-Domain_Eval.json,
Human-Domain_Eval.json, SingleObject_Eval.json) each case (or --cases ID ... / the first --limit N)
is scored on --videos FOLDER/<id>.mp4 with its prompt and its img_paths under --images-root; an
unknown id, a missing image or a missing video is one line, exit 2, before any model loads. A reward whose model is not given or cannot load is skipped with its
reason. Writes per_sample.csv, summary.json, table.md (also printed) and summary.png to --out.
Weights and normalisation ranges: idcrafter/eval/metrics.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from idcrafter.utils.cli import (
    MAX_SAMPLING_STEPS,
    ArgumentParser,
    InputError,
    check_device,
    fail,
    integer,
    seed,
    user_file,
)
from idcrafter.utils.settings_file import add_config_argument, parse_command_line


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="benchmark manifest (JSONL: id, prompt, subjects with image and category)")
    p.add_argument("--videos", nargs="+", default=[], help="a folder of <id>.mp4 / <id>.png, or one file per sample in manifest order")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--protocol", default=None, choices=("opens2v", "multicrafter", "one-for-all", "legacy"),
                   help="opens2v: OpenS2V-Eval's columns and leaderboard totals (default); multicrafter / one-for-all: "
                        "those papers' image tables; legacy: the reward-based columns and weighted total (default "
                        "with --toyworld, --metrics, --weights or a reward's --model-option)")
    p.add_argument("--leaderboard", default="v1.0", choices=("v1.0", "v1.1"),
                   help="--protocol opens2v: the leaderboard version whose weights make the totals (v1.1 adds "
                        "Motion Smoothness, --model-option smoothness.path=QWEN2.5-VL-DIR)")
    p.add_argument("--nexus", default=None, choices=("benchmark", "idcrafter"),
                   help="NexusScore of --protocol opens2v: benchmark (get_nexusscore.py: image-guided detection + GME; "
                        "default) or idcrafter (ID-Crafter App. C: Grounded-SAM masks + CLIP); sets "
                        "--model-option nexusscore.variant")
    p.add_argument("--metrics", default=None,
                   help="comma list of face, nexus, clip_text, clip_image, dino_image, aesthetic, natural, toyid, motion, "
                        "leakage (default: all; --toyworld: toyid,motion)")
    p.add_argument("--model-option", dest="model_options", action="append", default=[], metavar="NAME.KEY=VALUE",
                   help="reward model option, e.g. clip_text.path=/models/clip or face.backend=dlib (repeatable)")
    p.add_argument("--weights", default=None, help="weights of the total, name=w,... (replaces the defaults)")
    p.add_argument("--device", default="cpu", help="device of the reward models")
    p.add_argument("--batch-size", type=integer(1, 1024), default=4, help="samples decoded and scored at once")
    p.add_argument("--flow", default="lucas-kanade", help="optical flow of Motion: lucas-kanade (numpy) or farneback (OpenCV)")
    p.add_argument("--examples", type=integer(0, 1000), default=8, help="samples shown as frame strips in summary.png")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    bench = p.add_argument_group("published OpenS2V-Eval file (instead of --data)")
    bench.add_argument("--opens2v", default=None, help="Open-Domain_Eval.json, Human-Domain_Eval.json or SingleObject_Eval.json")
    bench.add_argument("--images-root", default=None, help="the benchmark's data folder, holding the img_paths")
    bench.add_argument("--cases", nargs="+", default=None, metavar="ID", help="score only these case ids")
    bench.add_argument("--limit", type=integer(1), default=None, help="score only the first N (chosen) cases")
    toy = p.add_argument_group("toy world (--toyworld)")
    toy.add_argument("--toyworld", action="store_true", help="generate held-out toy-world samples with --model and score them")
    toy.add_argument("--model", default=None, help="model folder (default: the installed toy-world model)")
    toy.add_argument("--samples", type=integer(1, 100000), default=8, help="held-out samples to generate")
    toy.add_argument("--seed", type=seed, default=0, help="seed of the samples and of the generation noise")
    toy.add_argument("--steps", type=integer(1, MAX_SAMPLING_STEPS), default=None, help="sampling steps (default: the model's)")
    add_config_argument(p)
    return p


def main(argv=None) -> int:
    args = parse_command_line(build_parser(), argv)
    from idcrafter.eval.report import markdown_table
    from idcrafter.eval.run import EvalRequest, run

    request = {k: v for k, v in vars(args).items() if k not in ("config", "nexus")}
    if args.nexus is not None:
        if args.protocol not in (None, "opens2v"):
            return fail(f"--nexus {args.nexus}: the NexusScore variants are columns of --protocol opens2v")
        request["model_options"] = [*args.model_options, f"nexusscore.variant={args.nexus}"]
    try:
        check_device(args.device)
        with user_file():  # the library's messages name the option (--data, --videos, --weights, ...)
            report = run(EvalRequest(**request))
    except InputError as err:
        return fail(str(err).splitlines()[0] if str(err) else err.__class__.__name__)
    print(markdown_table(report), end="")
    print(f"wrote {Path(args.out) / 'per_sample.csv'}, summary.json, table.md, summary.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
