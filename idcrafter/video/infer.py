"""One video from the command line: request validation, the plan, and the run.

Everything `scripts/infer.py` does is here, so it can be called from Python too. Validation
reads nothing heavy and writes nothing: references are opened, counts, numbers and sizes checked
against the bounds the model sets, model and adapter folders checked for missing parts and
truncated weights, and the output place tried, before any model loads.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from idcrafter.utils.cli import (
    MAX_GUIDANCE,
    InputError,
    check_device,
    check_dtype,
    check_input_dir,
    check_input_file,
    check_int,
    check_number,
    check_output_file,
    check_preset,
    launched_ranks,
    parse_size,
    path_problem,
    user_file,
)
from idcrafter.utils.media import VIDEO_CODECS, load_rgb, read_video, video_suffix_problem
from idcrafter.video.config import (
    ADAPTER_CONFIG,
    ADAPTER_SUBFOLDER,
    PRESETS,
    WAN_VAE_FACTORS,
    IDCrafterConfig,
    VideoLimits,
    check_adapter_fits,
    read_adapter_config,
    read_model_config,
)
from idcrafter.video.guidance import GuidanceInterval, as_interval

DEFAULT_MODEL = "built-in"


@dataclass
class InferenceRequest:
    refs: list[str]
    prompt: str
    out: str
    model: str | None = None
    adapter: str | None = None
    preset: str | None = None
    negative_prompt: str = ""
    steps: int | None = None
    size: str | None = None
    frames: int | None = None
    guidance_image: float | None = None
    guidance_text: float | None = None
    guidance_interval: str | None = None  # "LOW,HIGH": sigmas where the guidance passes run
    seed: int = 0
    edit_video: str | None = None
    strength: float = 1.0
    device: str = "cpu"
    dtype: str = "float32"
    cpu_offload: bool = False
    sequential_guidance: bool = False
    vlm: str | None = None
    sp_size: int = 1
    resolved: dict = field(default_factory=dict)


def parse_guidance_interval(value, flag: str = "--guidance-interval") -> GuidanceInterval | None:
    """The guidance interval of a request ("LOW,HIGH", a [low, high] pair or None: every step
    guided); InputError (one line naming `flag`) for a bad value."""
    try:
        return as_interval(value)
    except (ValueError, TypeError) as err:
        raise InputError(f"{flag} {value!r}: {err}") from None


def _read_config(folder: Path, what: str) -> dict:
    from idcrafter.utils.folders import read_json_object

    return read_json_object(folder / "config.json", what)


def base_folder(model: str | Path | None, preset: str | None) -> Path | None:
    """The diffusers folder a run's base components come from: --model, or the built-in toy-world
    model when that is the built-in one; None when the base is built from a preset (tiny)."""
    from idcrafter.video.defaults import TOYWORLD_MODEL, builtin_name, toyworld_available

    if model is not None:
        return Path(model)
    if (preset or builtin_name()) == "toyworld" and toyworld_available():
        return TOYWORLD_MODEL
    return None


def model_limits(config: IDCrafterConfig, model: str | Path | None) -> VideoLimits:
    """The bounds of the model a request runs: from the folder's transformer and VAE configs when
    there is a folder (the built-in toy model's included), else from the preset's components."""
    folder = base_folder(model, config.preset)
    if folder is not None:
        return VideoLimits.from_configs(_read_config(folder / "transformer", "--model transformer"),
                                        _read_config(folder / "vae", "--model vae"))
    if config.latent_channels == 16:
        temporal, spatial = WAN_VAE_FACTORS
    else:  # the toy world's pixel-unshuffle codec: 3 * f^2 channels, no temporal downsampling
        temporal, spatial = 1, round((config.latent_channels / 3) ** 0.5)
    return VideoLimits.from_configs(config.wan, {"scale_factor_temporal": temporal, "scale_factor_spatial": spatial})


def read_adapter(adapter: Path, flag: str, base: Path | None = None, preset: str | None = None) -> IDCrafterConfig:
    """The config of an adapter folder whose parts are whole; InputError naming `flag` otherwise.

    `preset`: the --preset the user gave, refused when the adapter was trained as another one (the
    adapter's config would silently win). Also checks that the adapter fits the base it will load
    onto: the transformer of the adapter's own `transformer/` (a full fine-tune), else of the
    `base` folder, else of the preset's (tiny when none is given).
    """
    from idcrafter.utils.folders import check_adapter_folder

    check_adapter_folder(adapter, flag, ADAPTER_CONFIG)
    try:
        config, meta = read_adapter_config(adapter)
    except (ValueError, TypeError) as err:  # the file is a JSON object: its fields are not
        raise InputError(f"{flag} {adapter}: bad {ADAPTER_CONFIG} ({str(err).splitlines()[0]})") from None
    check_preset(config.preset, preset, adapter)
    if (adapter / "transformer" / "config.json").is_file():
        base_wan = _read_config(adapter / "transformer", f"{flag} transformer")
    elif base is not None:
        base_wan = _read_config(base / "transformer", "--model transformer")
    else:
        base_wan = IDCrafterConfig.from_preset(preset or "tiny").wan
    try:
        with user_file():  # its message names the adapter
            check_adapter_fits(meta, base_wan, adapter)
    except (KeyError, TypeError) as err:  # a transformer config without the fields every Wan config has
        raise InputError(f"{flag} {adapter}: the base transformer config is not a Wan config ({err!r})") from None
    return config


def vlm_hidden_size(folder: str | Path, flag: str = "--vlm") -> int:
    """D_vlm of a Qwen2.5-VL folder, read from its config.json (`text_config.hidden_size`; older
    checkpoints keep it at the top level), with its safetensors files checked whole. InputError
    naming `flag` for a folder that is not a Qwen2.5-VL model. Reads JSON and file headers only."""
    from idcrafter.utils.folders import check_safetensors, read_json_object

    folder = check_input_dir(folder, flag)
    problem = path_problem(folder / "config.json")
    if problem:
        raise InputError(f"{flag} {folder}: not a Qwen2.5-VL model folder (config.json {problem})")
    data = read_json_object(folder / "config.json", f"{flag} {folder}")
    if data.get("model_type") != "qwen2_5_vl":
        raise InputError(f"{flag} {folder}: config.json is for model_type {data.get('model_type')!r}, "
                         "not a Qwen2.5-VL model (qwen2_5_vl)")
    text = data.get("text_config") if isinstance(data.get("text_config"), dict) else {}
    size = text.get("hidden_size", data.get("hidden_size"))
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise InputError(f"{flag} {folder}: config.json gives no hidden size (text_config.hidden_size)")
    for weights in sorted(folder.glob("*.safetensors")):
        check_safetensors(weights, flag)
    return size


def vlm_identity(folder: str | Path) -> str:
    """What adapters and feature caches record of a VLM folder: its absolute path."""
    return str(Path(folder).resolve())


def recorded_vlm(adapter: str | Path | None, name: str = ADAPTER_CONFIG) -> str | None:
    """The VLM folder a model was trained with (`vlm_folder` in the JSON file `name` of the folder
    `adapter`: an adapter's config, or the config.json of a saved IDCrafterTransformer), or None."""
    if adapter is None or not (Path(adapter) / name).is_file():
        return None
    try:
        meta = json.loads((Path(adapter) / name).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # read_adapter / read_model has already named a broken file
    folder = meta.get("vlm_folder") if isinstance(meta, dict) else None
    return folder if isinstance(folder, str) and folder else None


def read_model(model: Path, flag: str, preset: str | None = None) -> IDCrafterConfig | None:
    """The config of a model folder whose transformer/ is an IDCrafterTransformer with its adapter
    inside (None for a stock Wan transformer); InputError naming `flag` for a config that is not
    one, or a --preset (`preset`) other than the one the model was trained as."""
    try:
        own = read_model_config(model / "transformer")
    except (ValueError, TypeError) as err:
        raise InputError(f"{flag} {model}: bad transformer/config.json ({str(err).splitlines()[0]})") from None
    if own is None:
        return None
    check_preset(own[0].preset, preset, model)
    return own[0]


def check_vlm(vlm: str | None, config: IDCrafterConfig, adapter: str | Path | None = None,
              base: str | Path | None = None) -> str | None:
    """The VLM folder a run uses, or None for a model trained without the VLM encoder.

    --vlm exactly when the model was trained with the VLM encoder: without it such a model would run
    without its semantic tokens, and with it a model trained without one would ignore it. Without
    --vlm, a VLM model uses the folder its adapter recorded at training (`adapter`, else
    `base`/idcrafter_adapter, else the `vlm_folder` of `base`/transformer) when that folder exists.
    The folder's hidden size must be the one the adapter's connector reads. InputError (one line)
    otherwise; reads JSON and file headers only.
    """
    if vlm is not None:
        check_input_dir(vlm, "--vlm")
        if not config.use_vlm:
            raise InputError(f"--vlm {vlm}: this model was trained without the VLM encoder; leave --vlm out")
        folder, flag = Path(vlm), "--vlm"
    elif not config.use_vlm:
        return None
    else:
        if adapter is None and base is not None and (Path(base) / ADAPTER_SUBFOLDER / ADAPTER_CONFIG).is_file():
            adapter = Path(base) / ADAPTER_SUBFOLDER
        if adapter is None and base is not None:  # a saved IDCrafterTransformer records it in its config
            recorded = recorded_vlm(Path(base) / "transformer", "config.json")
        else:
            recorded = recorded_vlm(adapter)
        if recorded is None:
            raise InputError("this model was trained with the VLM encoder: pass --vlm (a Qwen2.5-VL folder)")
        problem = path_problem(recorded, "folder")
        if problem:
            raise InputError(f"this model was trained with the VLM encoder {recorded}, which {problem} here: "
                             "pass --vlm (a Qwen2.5-VL folder)")
        folder, flag = Path(recorded), "the adapter's VLM folder"
    size = vlm_hidden_size(folder, flag)
    if size != config.vlm_dim:
        raise InputError(f"{flag} {folder}: hidden size {size}, but this model's VLM connector reads "
                         f"{config.vlm_dim} (it was trained with another VLM)")
    return str(folder)


def model_config(req: InferenceRequest) -> IDCrafterConfig:
    """The ID-Crafter config the run will use: from the adapter when given, else the preset.

    Checks the model folder (every part there, every weights file whole) and the adapter folder
    on the way; a --preset that disagrees with the adapter's config is refused, not overridden.
    """
    from idcrafter.utils.folders import check_model_folder
    from idcrafter.video.defaults import builtin_config

    if req.preset is not None and req.preset not in PRESETS:
        raise InputError(f"--preset {req.preset!r} is unknown; known presets: {', '.join(sorted(PRESETS))}")
    adapter = Path(req.adapter) if req.adapter else None
    if req.model is not None:
        model = Path(req.model)
        check_model_folder(model, "--model", required=("transformer", "vae", "text_encoder", "tokenizer"))
        if adapter is None:
            own = read_model(model, "--model", req.preset)
            if own is not None:
                return own
        if adapter is None and (model / ADAPTER_SUBFOLDER / ADAPTER_CONFIG).is_file():
            adapter = model / ADAPTER_SUBFOLDER
    if adapter is not None:
        return read_adapter(adapter, "--adapter", base_folder(req.model, req.preset), req.preset)
    if req.model is None:
        if req.preset not in (None, "tiny", "toyworld"):
            raise InputError(f"--preset {req.preset}: no built-in model; pass --model (a Wan diffusers folder)")
        return builtin_config(req.preset)
    return IDCrafterConfig.from_preset(req.preset or "wan-1.3b")


def validate(req: InferenceRequest) -> IDCrafterConfig:
    """Check the request; fill `req.resolved` with the settings the run will use."""
    if not isinstance(req.prompt, str) or not req.prompt.strip():
        raise InputError("--prompt is empty")
    if not req.refs:
        raise InputError("--refs: give at least one reference image")
    check_output_file(req.out, "--out", VIDEO_CODECS)
    problem = video_suffix_problem(Path(req.out).suffix)
    if problem:
        raise InputError(f"--out {req.out}: {problem}")
    check_dtype(req.dtype)
    check_device(req.device)
    check_int(req.seed, "--seed", 0, 2**64 - 1)
    config = model_config(req)
    if len(req.refs) > config.max_subjects:
        raise InputError(f"--refs: {len(req.refs)} references, this model supports at most {config.max_subjects}")
    vlm = check_vlm(req.vlm, config, req.adapter, req.model)
    for ref in req.refs:
        with user_file("--refs"):
            load_rgb(ref)
    height, width = parse_size(req.size, multiple=16) if req.size else (config.height, config.width)
    frames = req.frames if req.frames is not None else config.num_frames
    check_int(frames, "--frames", 1)
    if (frames - 1) % 4:
        raise InputError(f"--frames {frames}: the frame count must be 4n+1 (e.g. 9, 17, 81)")
    steps = req.steps if req.steps is not None else config.num_inference_steps
    with user_file():  # the message names --size, --frames or --steps
        model_limits(config, req.model).check(height, width, frames, steps)
    guidance = {}
    for name in ("guidance_image", "guidance_text"):
        value = getattr(req, name)
        value = getattr(config, name) if value is None else value
        guidance[name] = check_number(value, f"--{name.replace('_', '-')}", 0.0, MAX_GUIDANCE)
    interval = parse_guidance_interval(req.guidance_interval)
    check_number(req.strength, "--strength", 0.0, 1.0, lo_open=True)
    if req.edit_video is not None:
        check_input_file(req.edit_video, "--edit-video")
        with user_file("--edit-video"):
            video = read_video(req.edit_video, frames)
        if len(video) < frames:
            raise InputError(f"--edit-video {req.edit_video}: {len(video)} frames, {frames} needed")
    check_sequence_parallel(req.sp_size, config, height, width, frames, req.cpu_offload)
    req.resolved = dict(
        model=req.model or f"{DEFAULT_MODEL} ({config.preset})",
        adapter=str(req.adapter) if req.adapter else None,
        height=height, width=width, frames=frames, steps=steps, fps=config.fps, **guidance,
        guidance_interval=None if interval is None else [interval.low, interval.high],
        max_subjects=config.max_subjects, num_blocks=config.num_blocks, vlm=vlm,
    )
    return config


def video_tokens(config: IDCrafterConfig, height: int, width: int, frames: int) -> int:
    """Tokens of one video in the DiT: latent frames x latent height x latent width over the patch size."""
    t, s = WAN_VAE_FACTORS
    patch = config.wan.get("patch_size", (1, 2, 2))
    return ((frames - 1) // t + 1) // patch[0] * (height // s // patch[1]) * (width // s // patch[2])


def check_sequence_parallel(sp_size: int, config: IDCrafterConfig, height: int, width: int, frames: int,
                            cpu_offload: bool = False) -> None:
    """--sp-size: one video over all the ranks launched, which must be exactly `sp_size`, splitting the
    heads and the video tokens evenly (idcrafter.core.sequence_parallel)."""
    from idcrafter.core.sequence_parallel import sp_size_problem

    check_int(sp_size, "--sp-size", 1)
    world = launched_ranks()
    if sp_size == 1 and world == 1:
        return
    if world != sp_size:
        raise InputError(f"--sp-size {sp_size}: one video is rendered by all ranks together; launch {sp_size} "
                         f"(torchrun --nproc_per_node {sp_size}), not {world}")
    heads = config.wan.get("num_attention_heads")
    problem = sp_size_problem(sp_size, world, heads, video_tokens(config, height, width, frames))
    if problem:
        raise InputError(f"--sp-size {sp_size}: {problem}")
    if cpu_offload:
        raise InputError("--cpu-offload with --sp-size: each rank holds the whole model; leave --cpu-offload out")


def start_sequence_parallel(sp_size: int, device: str):
    """torch.distributed over the launched ranks (nccl for CUDA, gloo on the CPU) and this rank's
    `SequenceParallel`; the device this rank renders on (cuda:LOCAL_RANK for "cuda")."""
    import os

    import torch
    import torch.distributed as dist

    from idcrafter.core.sequence_parallel import SequenceParallel

    on_cuda = device.startswith("cuda")
    if on_cuda and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if on_cuda:
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_cuda else "gloo")
    return SequenceParallel.init(sp_size, "cuda" if on_cuda else "cpu"), device


def plan(req: InferenceRequest) -> str:
    """Human-readable JSON of what a run would do (`--dry-run`)."""
    data = {k: v for k, v in asdict(req).items() if k != "resolved"}
    data.update(req.resolved)
    return json.dumps(data, indent=2)


def load_pipeline(req: InferenceRequest):
    import torch

    from idcrafter.video.defaults import default_pipeline
    from idcrafter.video.pipeline import IDCrafterPipeline

    dtype = getattr(torch, req.dtype)
    vlm = req.resolved.get("vlm", req.vlm)  # validate() resolves it: --vlm, or the adapter's recorded folder
    if req.model is None:
        pipe = default_pipeline(req.preset, adapter=req.adapter)
        if vlm is not None:
            from idcrafter.video.vlm import VLMSemanticEncoder

            pipe.register_modules(vlm=VLMSemanticEncoder.from_pretrained(vlm, dtype=dtype))
    else:
        pipe = IDCrafterPipeline.from_pretrained(req.model, adapter=req.adapter, torch_dtype=dtype, vlm=vlm)
    if pipe.transformer.dtype != dtype:  # loaded in `dtype` already, with diffusers' float32 modules kept
        pipe.transformer.to(dtype)
    if req.cpu_offload:  # diffusers' model offload: each component on req.device only while it runs
        pipe.enable_model_cpu_offload(device=req.device)
    else:
        pipe.to(req.device)
        pipe.transformer.to(req.device)
        if pipe.vlm is not None:  # not an nn.Module, so pipe.to leaves it where it loaded
            pipe.vlm.to(req.device)
    return pipe


def run(req: InferenceRequest, timings: dict | None = None) -> Path:
    """Validate, load, generate, write the video atomically; returns the output path.

    `timings`, when given, receives the generation's s/step and the share of its time in the
    transformer, the VAE and the text/VLM encoders (`IDCrafterPipeline.component_timer`).
    """
    validate(req)  # before importing torch: bad input stops fast
    import torch

    from idcrafter.utils.media import write_video

    r = req.resolved
    sp = None
    if req.sp_size > 1:
        sp, req.device = start_sequence_parallel(req.sp_size, req.device)
    pipe = load_pipeline(req)
    if sp is not None:
        pipe.transformer.enable_sequence_parallel(sp)
    timer = pipe.component_timer()
    with timer:
        out = pipe(
            req.prompt, req.refs, negative_prompt=req.negative_prompt, height=r["height"], width=r["width"],
            num_frames=r["frames"], num_inference_steps=r["steps"], guidance_image=r["guidance_image"],
            guidance_text=r["guidance_text"], guidance_interval=r["guidance_interval"],
            generator=torch.Generator().manual_seed(req.seed),
            video=req.edit_video, strength=req.strength, batched_guidance=not req.sequential_guidance,
            callback_on_step_end=timer.on_step_end,
        )
    if timings is not None:
        timings.update(timer.summary())
    if sp is not None:
        import torch.distributed as dist

        # Every rank ends with the same video (the transformer's output is gathered each step); rank 0
        # writes it, the others wait so that the file exists when any of them returns.
        path = write_video(out.frames[0], req.out, fps=r["fps"]) if dist.get_rank() == 0 else Path(req.out)
        dist.barrier()
        dist.destroy_process_group()
        return path
    return write_video(out.frames[0], req.out, fps=r["fps"])
