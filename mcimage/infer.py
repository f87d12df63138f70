"""One image from the command line: request validation, the plan, and the run.

Everything `scripts/infer.py --mode image` does is here, so it can be called from Python too.
Validation reads nothing heavy: references are opened, counts, categories, descriptor markup and
sizes checked, before any model loads.

    req = ImageInferenceRequest(refs=["a.png", "b.png"], categories=["face", "upper"],
                                prompt="a man <face>with short hair</face>", out="out.png",
                                preset="tiny-one-for-all")
    run(req)   # -> Path("out.png")

Without `model` the built-in model runs: the one installed at `idcrafter/assets/toyimage/model`
when present (a FLUX diffusers folder with `mcimage_adapter/`, the older layout), else a tiny preset
with random weights from a fixed seed (noise-like output that exercises the whole path). A model
folder `MCImagePipeline.save_pretrained` wrote carries its config in transformer/config.json.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from idcrafter.utils.cli import (
    MAX_GUIDANCE,
    MAX_SAMPLING_STEPS,
    InputError,
    check_device,
    check_dtype,
    check_int,
    check_number,
    check_output_file,
    check_preset,
    parse_size,
    user_file,
)
from mcimage.config import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_SUBFOLDER,
    MODEL_CLASS_NAME,
    PRESETS,
    MCImageConfig,
    check_adapter_fits,
    check_categories,
    read_adapter_config,
)

__all__ = [
    "BUILTIN_MODEL",
    "DEFAULT_PRESET",
    "IMAGE_OUTPUT_SUFFIXES",
    "ImageInferenceRequest",
    "builtin_available",
    "check_size",
    "check_subjects",
    "is_image_request",
    "load_pipeline",
    "model_config",
    "plan",
    "read_adapter",
    "read_model_config",
    "render_job",
    "run",
    "validate",
]

BUILTIN_MODEL = Path(__file__).resolve().parents[1] / "idcrafter" / "assets" / "toyimage" / "model"
DEFAULT_PRESET = "tiny-multicrafter"
DEFAULT_SEED = 0  # random weights of the tiny built-in model
IMAGE_OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg")
# FLUX has no fixed position range (its rotary ids are computed per call); FLUX.1 is trained up to
# about 2 megapixels, so 4096 px a side (16 MP, 65,536 latent tokens) is past any useful request,
# and the bound keeps a mistyped size from allocating until the machine gives out.
MAX_SIDE = 4096
_FLUX_PIPELINES = ("FluxPipeline", "FluxKontextPipeline")


@dataclass
class ImageInferenceRequest:
    refs: list[str]
    prompt: str
    out: str
    categories: list[str] | None = None
    model: str | None = None
    adapter: str | None = None
    preset: str | None = None
    steps: int | None = None
    size: str | None = None
    guidance: float | None = None
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    resolved: dict = field(default_factory=dict)


def builtin_available() -> bool:
    return (BUILTIN_MODEL / "model_index.json").is_file()


def _pipeline_class(model: Path) -> str | None:
    try:
        return json.loads((model / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def _transformer_class(model: Path) -> str | None:
    try:
        return json.loads((model / "transformer" / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def is_image_request(preset: str | None = None, model: str | None = None, adapter: str | None = None) -> bool:
    """Whether these options name the image branch: an image preset, an mcimage adapter, or a
    model folder that is a FLUX pipeline, an mcimage model or carries `mcimage_adapter/`. Only looks
    at files."""
    if preset is not None and preset in PRESETS:
        return True
    if adapter is not None and (Path(adapter) / ADAPTER_CONFIG_NAME).is_file():
        return True
    if model is not None:
        model = Path(model)
        return (model / ADAPTER_SUBFOLDER).is_dir() or _pipeline_class(model) in _FLUX_PIPELINES \
            or _transformer_class(model) == MODEL_CLASS_NAME
    return False


def read_model_config(model: Path, flag: str, preset: str | None = None) -> MCImageConfig | None:
    """The config an mcimage model folder (`MCImagePipeline.save_pretrained`) keeps in
    transformer/config.json; None for a stock FLUX folder. InputError naming `flag` for a config
    that does not read, or a --preset other than the one the model was trained as."""
    from idcrafter.utils.folders import read_json_object

    data = read_json_object(model / "transformer" / "config.json", f"{flag} transformer")
    if data.get("_class_name") != MODEL_CLASS_NAME:
        return None
    try:
        config = MCImageConfig.from_model_config(data)
    except (ValueError, TypeError) as err:
        raise InputError(f"{flag} {model}: unreadable mcimage config in transformer/config.json "
                         f"({str(err).splitlines()[0]})") from None
    check_preset(config.preset, preset, model)
    return config


def read_adapter(adapter: Path, flag: str, base: Path | None = None, preset: str | None = None) -> MCImageConfig:
    """The config of an adapter folder whose parts are whole; InputError naming `flag` otherwise.

    `preset`: the --preset the user gave, refused when the adapter was trained as another one.
    `base`: the FLUX folder it will load onto, whose transformer must have the adapter's architecture.
    """
    from idcrafter.utils.folders import check_adapter_folder, read_json_object

    check_adapter_folder(adapter, flag, ADAPTER_CONFIG_NAME)
    try:
        config = read_adapter_config(adapter)
    except (ValueError, TypeError, KeyError) as err:  # the file is a JSON object: its fields are not
        raise InputError(f"{flag} {adapter}: unreadable adapter config ({str(err).splitlines()[0]})") from None
    check_preset(config.preset, preset, adapter)
    if base is not None:
        flux = read_json_object(base / "transformer" / "config.json", "--model transformer")
        with user_file():  # its message names the adapter and the base
            check_adapter_fits(config, flux, adapter, base / "transformer")
    return config


def model_config(req: ImageInferenceRequest) -> MCImageConfig:
    """The config the run will use: the adapter's when there is one, else the preset's.

    With `model` and no preset the preset follows the folder: one-for-all for a Kontext
    pipeline, multicrafter otherwise. The model folder is checked for missing parts and truncated
    weights; a --preset that disagrees with the adapter's config is refused, not overridden. A
    model folder with its own config (an mcimage model) counts as one with an adapter; `adapter`
    replaces it.
    """
    from idcrafter.utils.folders import check_model_folder

    if req.preset is not None and req.preset not in PRESETS:
        raise InputError(f"--preset {req.preset!r} is unknown; image presets: {', '.join(sorted(PRESETS))}")
    adapter = Path(req.adapter) if req.adapter else None
    model = Path(req.model) if req.model is not None else None
    if model is None and req.preset is None and builtin_available():
        model = BUILTIN_MODEL
    if model is not None:
        check_model_folder(model, "--model", required=("transformer", "vae"))
        if adapter is None:
            own = read_model_config(model, "--model", req.preset)
            if own is not None:
                return own
        if adapter is None and (model / ADAPTER_SUBFOLDER / ADAPTER_CONFIG_NAME).is_file():
            adapter = model / ADAPTER_SUBFOLDER
    if adapter is not None:
        return read_adapter(adapter, "--adapter", model, req.preset)
    if model is None:
        preset = req.preset or DEFAULT_PRESET
        if not preset.startswith(("tiny", "toyworld")):
            raise InputError(f"--preset {preset}: no built-in model; pass --model (a FLUX diffusers folder)")
        return MCImageConfig.from_preset(preset)
    preset = req.preset or ("one-for-all" if _pipeline_class(model) == "FluxKontextPipeline" else "multicrafter")
    return MCImageConfig.from_preset(preset)


def check_size(height: int, width: int, name: str = "--size") -> None:
    if max(height, width) > MAX_SIDE:
        raise InputError(f"{name} {height}x{width}: at most {MAX_SIDE} pixels a side")


def default_size(config: MCImageConfig) -> tuple[int, int]:
    """Tiny and toy-world presets render 64x64 (CPU seconds); FLUX-size models 1024x1024."""
    return (64, 64) if config.preset.startswith(("tiny", "toyworld")) else (1024, 1024)


def check_subjects(
    prompt: str,
    refs: Sequence[str | Path],
    categories: Sequence[str] | None,
    config: MCImageConfig,
    names: Sequence[str] = ("--prompt", "--refs", "--categories"),
) -> None:
    """Check references, categories and descriptor markup against `config`; raise InputError.

    names: how the message calls the prompt, references and categories (CLI flags or job keys).
    Every reference is opened fully and its PIL mode checked.
    """
    from idcrafter.core.positions import parse_descriptor_markup
    from idcrafter.utils.media import load_rgb

    p_name, r_name, c_name = names
    if len(refs) > config.max_subjects:
        raise InputError(f"{r_name}: {len(refs)} references, this model supports at most {config.max_subjects}")
    try:
        canon = check_categories(config, len(refs), categories) or ()
    except ValueError as err:
        raise InputError(f"{c_name}: {err}") from None
    try:
        _, spans = parse_descriptor_markup(prompt)
    except ValueError as err:
        raise InputError(f"{p_name}: descriptor markup: {err}") from None
    # Without categories and without CCPA the tags are only stripped, so any name is harmless.
    if spans and (categories is not None or config.ccpa):
        for span in spans:
            if span.category not in canon:
                raise InputError(
                    f"{p_name}: descriptor markup <{span.category}> names a category with no reference "
                    f"({c_name}: {' '.join(categories or []) or 'none'})"
                )
    for ref in refs:
        with user_file():  # its message names `r_name` and the file
            load_rgb(ref, r_name)


def validate(req: ImageInferenceRequest) -> MCImageConfig:
    """Check the request; fill `req.resolved` with the settings the run will use."""
    if not isinstance(req.prompt, str) or not req.prompt.strip():
        raise InputError("--prompt is empty")
    if not req.refs:
        raise InputError("--refs: give at least one reference image")
    check_output_file(req.out, "--out", IMAGE_OUTPUT_SUFFIXES)
    check_dtype(req.dtype)
    check_device(req.device)
    check_int(req.seed, "--seed", 0, 2**64 - 1)
    config = model_config(req)
    check_subjects(req.prompt, req.refs, req.categories, config)
    height, width = parse_size(req.size, multiple=16) if req.size else default_size(config)
    check_size(height, width)
    steps = req.steps if req.steps is not None else config.num_inference_steps
    check_int(steps, "--steps", 1, MAX_SAMPLING_STEPS)
    guidance = config.guidance_scale if req.guidance is None else req.guidance
    check_number(guidance, "--guidance", 0.0, MAX_GUIDANCE)
    builtin = req.model is None and req.preset is None and builtin_available()
    req.resolved = dict(
        mode="image",
        model=req.model or (str(BUILTIN_MODEL) if builtin else f"built-in ({config.preset}, random weights)"),
        config_preset=config.preset, position_ids=config.position_ids, ccpa=config.ccpa, dam=config.dam,
        adapter_type=config.adapter, height=height, width=width, steps=steps, guidance=guidance,
        max_subjects=config.max_subjects,
    )
    return config


def plan(req: ImageInferenceRequest) -> str:
    """Human-readable JSON of what a run would do (`--dry-run`)."""
    data = {k: v for k, v in asdict(req).items() if k != "resolved"}
    data.update(req.resolved)
    return json.dumps(data, indent=2)


def load_pipeline(req: ImageInferenceRequest, config: MCImageConfig):
    """The MCImagePipeline of a validated request, on `req.device` in `req.dtype` (VAE in float32)."""
    import torch

    from mcimage.pipeline import MCImagePipeline
    from mcimage.presets import build_tiny_components

    dtype = getattr(torch, req.dtype)
    model = req.model
    if model is None and req.preset is None and builtin_available():
        model = str(BUILTIN_MODEL)
    if model is not None:
        pipe = MCImagePipeline.from_pretrained(model, adapter=req.adapter, config=config, torch_dtype=dtype)
    else:
        pipe = MCImagePipeline.from_components(build_tiny_components(config, seed=DEFAULT_SEED))
        if req.adapter is not None:
            pipe.transformer.load_adapter(req.adapter)
    for name in ("text_encoder", "text_encoder_2", "transformer"):
        module = getattr(pipe, name)
        # Loaded folders are in `dtype` already (MoE-LoRA kept float32): only the built-in tiny model casts.
        module.to(device=req.device, **({} if module.dtype == dtype else {"dtype": dtype}))
    pipe.vae.to(req.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(req: ImageInferenceRequest) -> Path:
    """Validate, load, generate, write the image atomically; returns the output path."""
    config = validate(req)  # before importing torch: bad input stops fast
    import torch

    from idcrafter.utils.media import write_image

    r = req.resolved
    pipe = load_pipeline(req, config)
    out = pipe(
        req.prompt, refs=req.refs, categories=req.categories, height=r["height"], width=r["width"],
        num_inference_steps=r["steps"], guidance_scale=r["guidance"],
        generator=torch.Generator().manual_seed(req.seed), output_type="pil",
    )
    return write_image(out.images[0], req.out)


def render_job(pipe, config: MCImageConfig, job, path: str | Path) -> Path:
    """Render one image job of `idcrafter.render` (mode "image") into `path` (not atomic: the
    batch renderer hands a temporary name and renames it when this returns).

    Uses the job's prompt, refs, categories, seed, size, steps and `guidance_text` (the FLUX
    guidance scale). Raises InputError naming the job key for inputs this model cannot take.
    """
    import torch
    from PIL import Image

    check_subjects(job.prompt, job.refs, job.categories, config, names=("'prompt'", "'refs'", "'categories'"))
    if job.negative_prompt:
        raise InputError("'negative_prompt' is not used by the image model (FLUX distilled guidance); leave it out")
    height, width = job.size or default_size(config)
    check_size(height, width, "'size'")
    if job.steps is not None:
        check_int(job.steps, "'steps'", 1, MAX_SAMPLING_STEPS)
    out = pipe(
        job.prompt, refs=[str(r) for r in job.refs], categories=job.categories, height=height, width=width,
        num_inference_steps=job.steps, guidance_scale=job.guidance_text,
        generator=torch.Generator().manual_seed(job.seed), output_type="pil",
    )
    path = Path(path)
    out.images[0].save(path, format=Image.registered_extensions()[path.suffix.lower()])
    return path
