"""Render many videos and images from a JSONL job file, resumably, across processes, GPUs and nodes.

    python scripts/render_batch.py --jobs jobs.jsonl --out DIR [--model WAN_DIR --adapter ADAPTER]
    torchrun --nproc_per_node 8 scripts/render_batch.py --jobs jobs.jsonl --out DIR ...
    deepspeed --num_gpus 8 scripts/render_batch.py --jobs jobs.jsonl --out DIR ...

One job per line: {"prompt", "refs": [paths relative to the job file], "output": "name.mp4",
"seed"?, "size"?: "HxW", "frames"?, "negative_prompt"?, "steps"?, "guidance_image"?,
"guidance_text"?, "guidance_interval"?: [low, high]}. An output ending in .png / .jpg (or "mode": "image") makes an image job,
rendered by the image branch (MultiCrafter / One-for-All) with "categories"?: one per ref and
"guidance_text" as the FLUX guidance. The image model is --image-model / --image-adapter /
--image-preset (default: the built-in tiny image model), or --model / --adapter / --preset when
those name the image branch (an image preset, a FLUX folder, an mcimage adapter); such a run has
no video model. Each rank (RANK / WORLD_SIZE from the launcher) renders its own share;
with --sp-size N, each group of N consecutive ranks renders its share of the video jobs together
(sequence parallelism, as `scripts/infer.py --sp-size`), its first rank claiming and writing them
and rendering the group's image jobs alone;
finished outputs are skipped on a rerun; every output is written under a temporary name and
renamed when complete. Bad lines are reported with their line numbers in DIR/summary.json and
the other jobs still run. Every output is decoded (frame count and size) before it counts as
finished. Several processes may share DIR: each output is rendered by one of them, and
DIR/summary.json holds the results of all that ran at the same time.

A published OpenS2V-Eval file (Open-Domain_Eval.json, Human-Domain_Eval.json, SingleObject_Eval.json)
replaces the job file with --opens2v FILE --images-root DIR: every case (or --cases ID ... / the
first --limit N) is rendered as DIR_OUT/<id>.mp4 from its prompt, with its img_paths (under
--images-root) as references and its class_label as categories; --seed and --steps apply to all.

    python scripts/render_batch.py --opens2v Open-Domain_Eval.json --images-root OpenS2V-Eval --out OUT

Bad input (a missing, empty or wholly invalid job file, an --out that is a file or cannot be
written, an unknown --device or --dtype, a bad model folder, an unknown case id or a missing
benchmark image) is one line `error: ...` and exit
code 2, before any folder is created or model loaded.
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
    check_dtype,
    check_output_dir,
    fail,
    integer,
    seed,
    user_file,
)
from idcrafter.utils.settings_file import add_config_argument, parse_command_line


def checked_jobs(jobs_file: str, out: str):
    """The job file read and validated against the output root: (jobs, bad lines). InputError when
    nothing in it can run: no jobs at all, or only bad lines (the first one named)."""
    from idcrafter.render import parse_jobs

    jobs, errors = parse_jobs(jobs_file, out_root=out)
    if not jobs and not errors:
        raise InputError(f"--jobs {jobs_file}: no jobs in the file")
    if not jobs:
        raise InputError(f"--jobs {jobs_file}: no valid job ({len(errors)} bad line{'s' if len(errors) > 1 else ''}; {errors[0]})")
    return jobs, errors


def opens2v_jobs(args):
    """The jobs of a published OpenS2V-Eval file (--opens2v): the chosen cases, every image checked."""
    from idcrafter.eval.benchmark_files import case_jobs, check_images, read_benchmark, select_cases

    if args.jobs is not None or args.images_root is None:
        raise InputError("give either --jobs FILE, or --opens2v FILE with --images-root DIR")
    cases = select_cases(read_benchmark(args.opens2v), args.opens2v, args.cases, args.limit)
    check_images(cases, args.images_root, args.opens2v)
    return case_jobs(cases, args.images_root, seed=args.seed, steps=args.steps), []


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", default=None, help="JSONL job file (or --opens2v)")
    p.add_argument("--out", required=True, help="output root; outputs may not escape it")
    p.add_argument("--model", default=None, help="Wan 2.1 diffusers folder (default: the built-in tiny model)")
    p.add_argument("--adapter", default=None, help="ID-Crafter adapter folder")
    p.add_argument("--preset", default=None, help="built-in model (toyworld, tiny) or the config preset with --model")
    p.add_argument("--image-model", default=None, help="FLUX diffusers folder for image jobs (default: built-in tiny)")
    p.add_argument("--image-adapter", default=None, help="mcimage adapter folder for image jobs")
    p.add_argument("--image-preset", default=None, help="image preset (multicrafter, one-for-all, tiny-multicrafter, ...)")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--sequential-guidance", action="store_true", help="guidance passes one by one (less memory)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--sp-size", type=integer(1), default=1,
                   help="sequence parallelism: groups of N consecutive ranks render each video together "
                        "(the jobs are split over WORLD_SIZE / N groups); N divides the ranks and the heads")
    p.add_argument("--local_rank", type=integer(0), default=None, help=argparse.SUPPRESS)  # deepspeed passes it
    bench = p.add_argument_group("published OpenS2V-Eval file (instead of --jobs)")
    bench.add_argument("--opens2v", default=None, help="Open-Domain_Eval.json, Human-Domain_Eval.json or SingleObject_Eval.json")
    bench.add_argument("--images-root", default=None, help="the benchmark's data folder, holding the img_paths")
    bench.add_argument("--cases", nargs="+", default=None, metavar="ID", help="render only these case ids")
    bench.add_argument("--limit", type=integer(1), default=None, help="render only the first N (chosen) cases")
    bench.add_argument("--seed", type=seed, default=0, help="seed of every case")
    bench.add_argument("--steps", type=integer(1, MAX_SAMPLING_STEPS), default=None, help="sampling steps (default: the model's)")
    add_config_argument(p)
    args = parse_command_line(p, argv)

    from idcrafter.core.sequence_parallel import sp_size_problem
    from idcrafter.render import local_rank as get_local_rank
    from idcrafter.render import merge_summaries, rank_and_world, render_batch, shard

    try:
        check_dtype(args.dtype)
        with user_file():  # the library's file and settings errors on --model, --adapter, ... name them
            rank, world = rank_and_world()
            sp_rank, group, groups = sequence_groups(args.sp_size, rank, world)
            if args.opens2v is None and args.jobs is None:
                raise InputError("--jobs FILE (or --opens2v FILE --images-root DIR) is required")
            if args.opens2v is None and (args.images_root, args.cases, args.limit, args.steps, args.seed) != (
                    None, None, None, None, 0):
                raise InputError("--images-root, --cases, --limit, --seed and --steps go with --opens2v FILE "
                                 "(a job file sets seed and steps per job)")
            jobs, errors = opens2v_jobs(args) if args.opens2v is not None else checked_jobs(args.jobs, args.out)
            out_dir = check_output_dir(args.out, "--out")
            modes = {job.mode for job in shard(jobs, group, groups)}
            import torch

            from mcimage.infer import ImageInferenceRequest, is_image_request
            from mcimage.infer import load_pipeline as load_image_pipeline
            from mcimage.infer import model_config as image_model_config

            if args.device is not None:
                device = check_device(args.device)
            else:
                device = f"cuda:{get_local_rank()}" if torch.cuda.is_available() else "cpu"
            image_args = (args.image_model, args.image_adapter, args.image_preset)
            main_is_image = is_image_request(args.preset, args.model, args.adapter)
            if main_is_image and any(v is not None for v in image_args):
                return fail("--model/--adapter/--preset already name an image model; drop --image-model/--image-adapter/--image-preset")
            if main_is_image:
                image_args = (args.model, args.adapter, args.preset)
            image_req = ImageInferenceRequest(refs=[], prompt="-", out="-.png", model=image_args[0], adapter=image_args[1],
                                              preset=image_args[2], device=device, dtype=args.dtype)
            image_config = image_model_config(image_req)
            config = base = limits = None
            if not main_is_image:
                from idcrafter.video.infer import (
                    InferenceRequest,
                    load_pipeline,
                    model_config,
                    model_limits,
                    video_tokens,
                )

                base = InferenceRequest(refs=[], prompt="-", out="-.mp4", model=args.model, adapter=args.adapter,
                                        preset=args.preset, device=device, dtype=args.dtype)
                config = model_config(base)
                limits = model_limits(config, args.model)
                heads = config.wan.get("num_attention_heads")
                problem = sp_size_problem(args.sp_size, world, heads)
                if problem:
                    raise InputError(f"--sp-size {args.sp_size}: {problem}")
            # every check is done: only now are models loaded
            image_pipe = None
            if "image" in modes and sp_rank == 0:  # image jobs: the group's first rank alone
                image_pipe = load_image_pipeline(image_req, image_config)
            pipe = load_pipeline(base) if base is not None and "video" in modes else None
    except InputError as err:
        return fail(str(err))

    sp = None
    if args.sp_size > 1:
        sp = start_groups(args.sp_size, device)
        if pipe is not None:
            pipe.transformer.enable_sequence_parallel(sp)

    from idcrafter.utils.media import write_video
    from mcimage.infer import render_job

    def render(job, tmp_path: Path) -> None:
        if job.mode == "image":
            render_job(image_pipe, image_config, job, tmp_path)
            return
        if pipe is None:
            raise InputError("no video model in this run: --model/--adapter/--preset name an image model")
        if len(job.refs) > config.max_subjects:
            raise InputError(f"{len(job.refs)} references, this model supports at most {config.max_subjects}")
        height, width = job.size or (config.height, config.width)
        frames = job.frames or config.num_frames
        limits.check(height, width, frames, job.steps or config.num_inference_steps, names=("'size'", "'frames'", "'steps'"))
        call = dict(prompt=job.prompt, refs=[str(r) for r in job.refs], negative_prompt=job.negative_prompt or "",
                    height=height, width=width, num_frames=frames, num_inference_steps=job.steps,
                    guidance_image=job.guidance_image, guidance_text=job.guidance_text,
                    guidance_interval=job.guidance_interval, seed=job.seed)
        if sp is not None:
            tokens = video_tokens(config, height, width, frames)
            if tokens % sp.size:
                raise InputError(f"'size' / 'frames': {tokens} video tokens, not divisible by --sp-size {sp.size}")
            _send(sp, call)  # the other ranks of the group render it with this one
        write_video(render_video(call).frames[0], tmp_path, fps=config.fps)

    def render_video(call: dict):
        call = dict(call)
        generator = torch.Generator().manual_seed(call.pop("seed"))
        return pipe(call.pop("prompt"), call.pop("refs"), **call, generator=generator,
                    batched_guidance=not args.sequential_guidance)

    for loaded in (pipe, image_pipe):
        if loaded is not None:
            loaded.set_progress_bar_config(disable=True)
    if sp is not None and sp.rank != 0:
        _follow(sp, render_video)
        _barrier()
        return 0
    # With --sp-size the groups are the workers: a group's first rank claims and writes its jobs.
    summary = render_batch(jobs, out_dir, render, rank=group, world_size=groups, progress=not args.no_progress,
                           errors=errors)
    if sp is not None:
        _send(sp, None)  # the group is done
    if world > 1 and _barrier():
        # Every group has written its summary: rank 0 merges them into DIR/summary.json.
        if rank == 0:
            summary = merge_summaries(out_dir, groups)
    if rank == 0:
        print(f"done: {summary.counts()}")
    return 0 if summary.ok else 1


def sequence_groups(sp_size: int, rank: int, world: int) -> tuple[int, int, int]:
    """(place in the sequence group, group index, number of groups) for --sp-size; InputError when
    the size does not divide the ranks launched."""
    from idcrafter.core.sequence_parallel import sp_layout, sp_size_problem

    problem = sp_size_problem(sp_size, world)
    if problem:
        raise InputError(f"--sp-size {sp_size}: {problem}")
    return sp_layout(rank, world, sp_size)


def start_groups(sp_size: int, device: str):
    """torch.distributed (nccl on CUDA, gloo on the CPU) and this rank's sequence group."""
    import torch.distributed as dist

    from idcrafter.core.sequence_parallel import SequenceParallel

    on_cuda = device.startswith("cuda")
    if on_cuda:  # nccl's collectives run on the current device
        import torch

        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_cuda else "gloo")
    return SequenceParallel.init(sp_size, "cuda" if on_cuda else "cpu")


def _send(sp, call: dict | None) -> None:
    """The group's first rank tells the others the next video call (None: no more)."""
    import torch.distributed as dist

    dist.broadcast_object_list([call], src=dist.get_global_rank(sp.ulysses_mesh.get_group(), 0),
                               group=sp.ulysses_mesh.get_group())


def _follow(sp, render_video) -> None:
    """The other ranks of a group: run each video call the first rank sends, until it sends None.

    The first rank runs the same call on the same inputs, so an exception there is the same one
    here; it records the failure in the summary, these ranks go on to the next call."""
    import torch.distributed as dist

    group = sp.ulysses_mesh.get_group()
    while True:
        message = [None]
        dist.broadcast_object_list(message, src=dist.get_global_rank(group, 0), group=group)
        if message[0] is None:
            return
        try:
            render_video(message[0])
        except Exception:  # noqa: BLE001 (reported by the first rank, which failed the same way)
            pass


def _barrier() -> bool:
    """Wait for all ranks when a launcher gave a rendezvous address (torchrun, deepspeed)."""
    import os

    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    dist.barrier()
    return True


if __name__ == "__main__":
    sys.exit(main())
