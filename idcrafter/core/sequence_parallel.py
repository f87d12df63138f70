"""Sequence parallelism (DeepSpeed-Ulysses) on diffusers' context-parallel machinery.

A group of `size` consecutive ranks renders or trains one sample together: the video tokens are
split over the group (each rank holds L / size of them, with every head), and around each
self-attention diffusers' Ulysses attention turns "sequence shard x all heads" into "full
sequence x heads / size" by an all-to-all and back (`TemplatedUlyssesAttention`, which also
carries the backward). Attention whose keys every rank holds in full (Wan's text
cross-attention, ID-Crafter's stage 3 over the subject stream) needs no exchange: the local
queries attend to the full keys, and every head of a query token is local, so the IDAR share
(mean over heads) of a local token is complete and only the shares of the tokens are gathered.
The subject tower (stages 1-2) runs replicated on every rank: it is small and its keys are the
subject tokens, which every rank needs whole.

Groups: `size` consecutive ranks form a sequence-parallel group; the ranks with the same place in
their groups form a data-parallel group of world / size. For DeepSpeed the module
`deepspeed.runtime.sequence_parallel.parallel_state_sp` is the `mpu` (`deepspeed_mpu`): ZeRO then
partitions over all ranks (sequence x data, what DeepSpeed calls the sequence-data-parallel
group, as the ranks of a sequence group hold the same parameters) and divides the summed
gradients by the data-parallel size only: gradients are summed over the sequence group and
averaged over the data-parallel group.

Gradients: every rank of a group computes the same full loss on the gathered output; the gather's
backward keeps a rank's own slice, so a rank's gradient is its shard's share and the sum over the
group is the full gradient, which is what DeepSpeed's reduction above completes.

diffusers' own `enable_parallelism` is not used as is: it builds its device mesh over the whole
world and picks a device index with `rank % accelerator.device_count()`, which fails on a CPU
(no accelerator) and cannot give several groups (render jobs on groups of N ranks, SP x DP
training). `enable_ulysses` does the rest of what it does with a mesh of our groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SequenceParallel", "deepspeed_mpu", "enable_ulysses", "gather_sequence", "sp_layout",
           "sp_size_problem"]


def sp_size_problem(sp_size: int, world_size: int, heads: int | None = None, tokens: int | None = None) -> str | None:
    """Why `sp_size` cannot split this run (a phrase for a one-line error), or None when it can.

    world_size: ranks launched; heads: attention heads of the DiT (each rank keeps heads / sp_size
    in the Ulysses attention); tokens: video tokens per sample (each rank keeps tokens / sp_size).
    """
    if sp_size < 1:
        return f"must be at least 1, got {sp_size}"
    if world_size % sp_size:
        return f"{sp_size} does not divide the {world_size} ranks launched"
    if heads is not None and heads % sp_size:
        return f"{sp_size} does not divide the model's {heads} attention heads"
    if tokens is not None and tokens % sp_size:
        return f"{sp_size} does not divide the {tokens} video tokens of a sample (choose frames / size)"
    return None


def sp_layout(rank: int, world_size: int, sp_size: int) -> tuple[int, int, int]:
    """(rank in its sequence group, data-parallel rank, data-parallel size) of global `rank`.

    Sequence groups are `sp_size` consecutive ranks, as DeepSpeed's `initialize_sequence_parallel`
    builds them: rank r is in group r // sp_size, place r % sp_size.
    """
    return rank % sp_size, rank // sp_size, world_size // sp_size


@dataclass
class SequenceParallel:
    """This rank's place: `size` ranks per sequence group, `rank` in it, data-parallel `dp_rank` of
    `dp_size`; `mesh` is the device mesh ("dp", "ring", "ulysses") of shape [dp_size, 1, size]."""

    size: int
    rank: int
    dp_size: int
    dp_rank: int
    mesh: object

    @property
    def ulysses_mesh(self):
        """The one-dimensional mesh of this rank's sequence group."""
        return self.mesh["ulysses"]

    @classmethod
    def init(cls, sp_size: int, device_type: str = "cpu") -> SequenceParallel:
        """The groups of a started torch.distributed world (every rank calls this, in the same order)."""
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        world, rank = dist.get_world_size(), dist.get_rank()
        problem = sp_size_problem(sp_size, world)
        if problem:
            raise ValueError(f"sequence parallel size: {problem}")
        mesh = init_device_mesh(device_type, (world // sp_size, 1, sp_size), mesh_dim_names=("dp", "ring", "ulysses"))
        sp_rank, dp_rank, dp_size = sp_layout(rank, world, sp_size)
        return cls(size=sp_size, rank=sp_rank, dp_size=dp_size, dp_rank=dp_rank, mesh=mesh)

    def parallel_config(self):
        """diffusers' `ParallelConfig` with Ulysses over this rank's sequence group, set up."""
        import torch.distributed as dist
        from diffusers import ContextParallelConfig
        from diffusers.models._modeling_parallel import ParallelConfig

        mesh = self.mesh["ring", "ulysses"]
        config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=self.size, mesh=mesh))
        on_cuda = self.mesh.device_type == "cuda"
        device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device(self.mesh.device_type)
        config.setup(dist.get_rank(), dist.get_world_size(), device, mesh=mesh)
        return config


def gather_sequence(x: torch.Tensor, dim: int, mesh) -> torch.Tensor:
    """The shards of `x` over the ranks of `mesh` (a sequence group's one-dimensional mesh)
    concatenated along `dim`: every rank gets all of it, as diffusers gathers the model output.

    Backward keeps this rank's own slice of the gradient: summed over the group (DeepSpeed's
    reduction) the gradients are those of the unsharded computation. Identity for `mesh` None.
    """
    if mesh is None or mesh.size() == 1:
        return x
    from diffusers.hooks.context_parallel import EquipartitionSharder

    return EquipartitionSharder.unshard(x, dim, mesh)


def enable_ulysses(model, sp: SequenceParallel, plan: dict) -> None:
    """Run `model` (a diffusers model) sequence-parallel over `sp`'s group.

    `plan` is the model's context-parallel plan (which inputs to split, which output to gather; see
    diffusers' `_cp_plan`). Every attention processor with a `_parallel_config` gets the config: the
    stock ones do Ulysses in their self-attention and pass none for cross-attention; ours
    (`DispatchAttnProcessor`) ignore it, as their keys are whole on every rank.
    """
    from diffusers.hooks.context_parallel import apply_context_parallel

    if getattr(model, "_parallel_config", None) is not None:
        raise RuntimeError(f"{type(model).__name__} is already parallel")
    config = sp.parallel_config()
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = config
    model._parallel_config = config
    apply_context_parallel(model, config.context_parallel_config, plan)


def deepspeed_mpu(sp_size: int):
    """DeepSpeed's own sequence-parallel `mpu` (for `deepspeed.initialize(mpu=...)`), its groups built:
    sequence groups of `sp_size` consecutive ranks, ZeRO over all ranks (see the module docstring)."""
    from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

    mpu._release_sequence_parallel_groups()  # a second run in this process builds them anew
    mpu.initialize_sequence_parallel(sp_size)
    return mpu
