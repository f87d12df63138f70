"""One video from the command line: request validation, the plan, and the run.

Everything `scripts/infer.py` does is here, so it can be called from Python too. Validation
reads nothing heavy: references are opened, counts and sizes checked, before any model loads.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from idcrafter.utils.cli import InputError, parse_size
from idcrafter.utils.media import load_rgb, read_video
from idcrafter.video.config import PRESETS, IDCrafterConfig

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
    seed: int = 0
    edit_video: str | None = None
    strength: float = 1.0
    device: str = "cpu"
    dtype: str = "float32"
    cpu_offload: bool = False
    sequential_guidance: bool = False
    vlm: str | None = None
    resolved: dict = field(default_factory=dict)


def model_config(req: InferenceRequest) -> IDCrafterConfig:
    """The ID-Crafter config the run will use: from the adapter when given, else the preset."""
    from idcrafter.video.defaults import builtin_config
    from idcrafter.video.pipeline import ADAPTER_SUBFOLDER
    from idcrafter.video.transformer import ADAPTER_CONFIG, IDCrafterTransformer

    if req.preset is not None and req.preset not in PRESETS:
        raise InputError(f"--preset {req.preset!r} is unknown; known presets: {', '.join(sorted(PRESETS))}")
    adapter = Path(req.adapter) if req.adapter else None
    if req.model is not None:
        model = Path(req.model)
        if not (model / "transformer").is_dir():
            raise InputError(f"--model {model}: not a Wan diffusers folder (no transformer/ subfolder)")
        if adapter is None and (model / ADAPTER_SUBFOLDER / ADAPTER_CONFIG).is_file():
            adapter = model / ADAPTER_SUBFOLDER
    if adapter is not None:
        if not (adapter / ADAPTER_CONFIG).is_file():
            raise InputError(f"--adapter {adapter}: no {ADAPTER_CONFIG} in that folder")
        try:
            config, _ = IDCrafterTransformer.read_adapter_config(adapter)
        except (ValueError, KeyError, json.JSONDecodeError) as err:
            raise InputError(f"--adapter {adapter}: unreadable config ({err})") from None
        return config
    if req.model is None:
        if req.preset not in (None, "tiny", "toyworld"):
            raise InputError(f"--preset {req.preset}: no built-in model; pass --model (a Wan diffusers folder)")
        return builtin_config(req.preset)
    return IDCrafterConfig.from_preset(req.preset or "wan-1.3b")


def validate(req: InferenceRequest) -> IDCrafterConfig:
    """Check the request; fill `req.resolved` with the settings the run will use."""
    if not req.prompt or not req.prompt.strip():
        raise InputError("--prompt is empty")
    if not req.refs:
        raise InputError("--refs: give at least one reference image")
    config = model_config(req)
    if len(req.refs) > config.max_subjects:
        raise InputError(f"--refs: {len(req.refs)} references, this model supports at most {config.max_subjects}")
    for ref in req.refs:
        load_rgb(ref)
    height, width = parse_size(req.size) if req.size else (config.height, config.width)
    if height <= 0 or width <= 0 or height % 16 or width % 16:
        raise InputError(f"--size {height}x{width}: height and width must be positive multiples of 16")
    frames = req.frames if req.frames is not None else config.num_frames
    if frames < 1 or (frames - 1) % 4:
        raise InputError(f"--frames {frames}: the frame count must be 4n+1 (e.g. 9, 17, 81)")
    steps = req.steps if req.steps is not None else config.num_inference_steps
    if steps < 1:
        raise InputError(f"--steps {steps}: must be at least 1")
    if not 0 < req.strength <= 1:
        raise InputError(f"--strength {req.strength}: must be in (0, 1]")
    if req.edit_video is not None:
        video = read_video(req.edit_video, frames)
        if len(video) < frames:
            raise InputError(f"--edit-video {req.edit_video}: {len(video)} frames, {frames} needed")
    if Path(req.out).suffix.lower() != ".mp4":
        raise InputError(f"--out {req.out}: the output must be an .mp4 file")
    if req.dtype not in ("float32", "bfloat16", "float16"):
        raise InputError(f"--dtype {req.dtype}: use float32, bfloat16 or float16")
    if req.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise InputError(f"--device {req.device}: CUDA is not available on this machine")
    req.resolved = dict(
        model=req.model or f"{DEFAULT_MODEL} ({config.preset})",
        adapter=str(req.adapter) if req.adapter else None,
        height=height, width=width, frames=frames, steps=steps, fps=config.fps,
        guidance_image=config.guidance_image if req.guidance_image is None else req.guidance_image,
        guidance_text=config.guidance_text if req.guidance_text is None else req.guidance_text,
        max_subjects=config.max_subjects, num_blocks=config.num_blocks,
    )
    return config


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
    if req.model is None:
        pipe = default_pipeline(req.preset, adapter=req.adapter)
    else:
        pipe = IDCrafterPipeline.from_pretrained(req.model, adapter=req.adapter, torch_dtype=dtype, vlm=req.vlm)
    pipe.transformer.to(dtype)
    pipe.enable_cpu_offload(req.cpu_offload)
    if not req.cpu_offload:
        pipe.to(req.device)
        pipe.transformer.to(req.device)
    return pipe


def run(req: InferenceRequest) -> Path:
    """Validate, load, generate, write the mp4 atomically; returns the output path."""
    import torch

    from idcrafter.utils.media import write_video

    validate(req)
    r = req.resolved
    pipe = load_pipeline(req)
    out = pipe(
        req.prompt, req.refs, negative_prompt=req.negative_prompt, height=r["height"], width=r["width"],
        num_frames=r["frames"], num_inference_steps=r["steps"], guidance_image=r["guidance_image"],
        guidance_text=r["guidance_text"], generator=torch.Generator().manual_seed(req.seed),
        video=req.edit_video, strength=req.strength, batched_guidance=not req.sequential_guidance, device=req.device,
    )
    return write_video(out.frames[0], req.out, fps=r["fps"])
