"""One forward and backward of the tiny IDCrafterTransformer (2 subjects, IDAR shares captured), on one
rank or sequence-parallel over the ranks `torchrun` starts (gloo): tests/test_sequence_parallel.py
launches it and compares with the single-rank numbers of `forward_backward`.

    torchrun --nproc_per_node 2 tests/sp_worker.py OUT.pt [--checkpointing | --pipeline] [--own]

--pipeline: the tiny pipeline's final latents instead (2 subjects, 3 guidance passes batched, 2 steps).
--own: stage 3 on its own projections (default: the preset's, on attn2's).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from idcrafter.video.config import IDCrafterConfig
from idcrafter.video.transformer import IDCrafterTransformer


def build(form: str = "attn2") -> IDCrafterTransformer:
    """The tiny preset, stage 3 in `form`, with every adapter weight nonzero (a zero-initialised
    adapter would leave stage 3, the shares' gradients and the gate's at exactly zero, and test
    nothing)."""
    config = IDCrafterConfig.from_preset("tiny", stage3_projections=form)
    model = IDCrafterTransformer.from_idcrafter_config(config, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.adapter.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def inputs() -> dict:
    """Latents [1, 16, 3, 8, 8] (48 video tokens), text [1, 7, 32], 2 subjects of 16 tokens."""
    gen = torch.Generator().manual_seed(2)
    return dict(
        hidden_states=torch.randn(1, 16, 3, 8, 8, generator=gen),
        timestep=torch.tensor([700.0]),
        encoder_hidden_states=torch.randn(1, 7, 32, generator=gen),
        subjects=torch.randn(1, 2, 16, 8, 8, generator=gen),
    )


def forward_backward(model: IDCrafterTransformer, checkpointing: bool = False) -> dict[str, torch.Tensor]:
    """Output, loss, captured shares [1, 2, 48] and every parameter's gradient of
    loss = mean(out^2) + sum over blocks of mean(share of subject 0 * a fixed weight per token)."""
    if checkpointing:
        model.enable_gradient_checkpointing()
    capture: dict = {}
    out = model(**inputs(), return_dict=False, attention_capture=capture)[0]
    weight = torch.linspace(-1.0, 1.0, 48)
    loss = out.square().mean() + sum((s[:, 0] * weight).mean() for s in capture.values())
    loss.backward()
    result = {"out": out.detach(), "loss": loss.detach()}
    result.update({f"share.{k}": v.detach() for k, v in capture.items()})
    result.update({f"grad.{n}": p.grad for n, p in model.named_parameters() if p.grad is not None})
    return result


def build_pipeline():
    from idcrafter.video.pipeline import IDCrafterPipeline
    from idcrafter.video.presets import build_components

    pipe = IDCrafterPipeline.from_components(build_components(IDCrafterConfig.from_preset("tiny"), seed=0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a live adapter, as in `build`
        for p in pipe.transformer.adapter.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return pipe


def render(pipe) -> dict[str, torch.Tensor]:
    """Final latents [1, 16, 3, 8, 8] of 2 steps with both guidance scales on (3 passes)."""
    refs = sorted(str(p) for p in (Path(__file__).resolve().parents[1] / "examples").glob("*.png"))[:2]
    out = pipe("a red cat", refs, num_inference_steps=2, guidance_image=2.0, guidance_text=3.0,
               generator=torch.Generator().manual_seed(3), output_type="latent")
    return {"latents": out.frames}


def main(path: str, checkpointing: bool, pipeline: bool = False, form: str = "attn2") -> None:
    import torch.distributed as dist

    from idcrafter.core.sequence_parallel import SequenceParallel

    dist.init_process_group("gloo")
    sp = SequenceParallel.init(dist.get_world_size())
    if pipeline:
        pipe = build_pipeline()
        pipe.transformer.enable_sequence_parallel(sp)
        seen = []  # tokens this rank's blocks see: the proof that the sequence was split
        pipe.transformer.blocks[0].attn1.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
        with torch.no_grad():
            result = render(pipe)
        result["block_tokens"] = torch.tensor(seen)
        if dist.get_rank() == 0:
            torch.save(result, path)
        dist.destroy_process_group()
        return
    model = build(form)
    model.enable_sequence_parallel(sp)
    result = forward_backward(model, checkpointing)
    for key, value in result.items():
        if key.startswith("grad."):  # each rank holds its shard's share: the sum is the gradient
            dist.all_reduce(value)
    if dist.get_rank() == 0:
        torch.save(result, path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], "--checkpointing" in sys.argv[2:], "--pipeline" in sys.argv[2:],
         "own" if "--own" in sys.argv[2:] else "attn2")
