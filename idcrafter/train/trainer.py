"""The SFT trainer on DeepSpeed, for any model behind a `TrainingSpec`.

The trainer owns what every run shares (distributed set-up, the DeepSpeed engine, the data order,
checkpoints, resume, EMA, logs, export); a spec owns what is model-specific (loading, the trainable
set, data, conditioning, the loss, the exported files). `Trainer.run()` reads as the list of steps.

Bad input writes nothing: the run folder gets its first file only once the model, the data (a
full batch exists) and the engine are built and the checkpoint to resume from is chosen.
Checkpoints are complete or invisible and resume unpickles no code (`idcrafter.train.checkpoint`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from idcrafter.train import checkpoint as ckpt
from idcrafter.train.ds_config import prepare_ds_config, sequence_parallel_reduction, zero_stage
from idcrafter.train.ema import ShardedEMA
from idcrafter.train.metrics import DrawLog, MetricLog
from idcrafter.utils.errors import ConfigError, FileFormatError
from idcrafter.utils.io import atomic_write
from idcrafter.utils.logging import get_logger

logger = get_logger("idcrafter.train")


def release_shm_allreduce_name(rank: int) -> Path | None:
    """Unlink this rank's DeepSpeed CPU allreduce buffer name; returns the path if it existed.

    DeepSpeed's CPU communication (ops/csrc/cpu/comm/shm.cpp, `shm_initialize`) creates
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank> (69 MB) per rank and
    never unlinks it, so every CPU run, finished or killed, leaves that much RAM-backed /dev/shm
    behind; a test suite or a few restarts fill memory. Once every rank has opened every buffer
    (call after a barrier), unlinking the name keeps the mappings and lets the kernel free the
    memory when the processes end, however they end.
    """
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    path = Path("/dev/shm") / name
    try:
        path.unlink()
    except OSError:  # no shm op (CUDA, another platform) or already gone
        return None
    return path


@dataclass
class TrainArgs:
    """Everything a run needs besides the model spec; each field is a command-line flag."""

    output: str
    deepspeed_config: str = "ds_configs/zero2.json"
    max_steps: int = 1000
    lr: float = 1e-5
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.0
    batch_size: int = 1
    grad_accum: int = 1
    grad_clip: float = 1.0
    seed: int = 0
    # Sequence parallelism (idcrafter.core.sequence_parallel): groups of sp_size consecutive ranks
    # train each sample together; the data is split over the world_size / sp_size groups.
    sp_size: int = 1
    trainable: str = "new-modules"
    gradient_checkpointing: bool = False
    ema_decay: float | None = None
    save_every: int = 500
    keep_last: int = 2
    resume: str | None = None
    log_every: int = 10
    progress: bool = True
    # Peak dense TFLOP/s of one GPU in the training dtype (H100 SXM bf16: 989); with it the logs
    # carry MFU = achieved analytic TFLOP/s per GPU / peak (docs/design.md 11).
    peak_tflops: float | None = None
    # Validation samples (idcrafter.train.validation): every N steps and at the last one (0: off), the
    # first `validation_samples` of the manifest `validation_data`, `validation_steps` sampling steps
    # (None: the preset's), noise from `seed` (sample i: seed + i), the same at every validation.
    validate_every: int = 0
    validation_data: str | None = None
    validation_samples: int = 4
    validation_steps: int | None = None
    # the resolved command-line settings, saved in the run folder (idcrafter.train.cli.save_settings)
    settings: dict | None = None


class TrainingSpec(Protocol):
    """What a model brings to the trainer (see `idcrafter.video.training.VideoTrainingSpec`).

    Optionally `work(conditions, checkpointing) -> (tokens, flops)`: the model tokens and analytic
    training FLOPs of one micro-batch, from which the trainer logs throughput (`throughput_metrics`).
    """

    hidden_size: int

    def build_model(self, device: torch.device, dtype: torch.dtype) -> nn.Module: ...
    def trainable_parameters(self, model: nn.Module, policy: str) -> list[nn.Parameter]: ...
    def build_data(self, rank: int, world_size: int, seed: int, batch_size: int) -> tuple[Any, Any, Any]: ...
    def prepare(self, batch: dict, device: torch.device) -> dict: ...
    def loss(self, model: nn.Module, conditions: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]: ...
    def export(self, model: nn.Module, folder: Path) -> None: ...
    def describe(self) -> dict: ...
    # Only with --validate-every: the held-out samples, and the model's samples of them.
    def validation_items(self, path: str, limit: int) -> list: ...
    def validation_samples(self, model: nn.Module, items: list, steps: int | None, seed: int) -> list: ...


def _mix_seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2**63 - 1)


class AllSamplesFailed(RuntimeError):
    pass


class NonFiniteLoss(RuntimeError):
    """The loss of a step is NaN or infinite: the run stops before that step is saved or exported."""


def non_finite_message(step: int, metrics: dict[str, float]) -> str | None:
    """A one-line report of the loss terms of `step` when any is NaN or infinite, else None.

    The terms are the metrics whose name contains "loss" (loss, loss_flow, loss_attn, policy_loss).
    """
    terms = {k: v for k, v in sorted(metrics.items()) if "loss" in k}
    if all(math.isfinite(v) for v in terms.values()):
        return None
    bad = [k for k, v in terms.items() if not math.isfinite(v)]
    values = ", ".join(f"{k}={v:.6g}" for k, v in terms.items())
    return (f"step {step}: non-finite loss ({', '.join(bad)}); {values}. Nothing of this step was saved; "
            "lower --lr or check the data, then --resume auto from the last checkpoint")


# Keys of a rank's work in one step (popped before logging): model tokens and analytic training FLOPs.
WORK_TOKENS, WORK_FLOPS = "_work_tokens", "_work_flops"


def throughput_metrics(tokens: float, flops: float, seconds: float, world_size: int, sp_size: int = 1,
                       peak_tflops: float | None = None) -> dict[str, float]:
    """Throughput of one optimizer step from one rank's mean work (`tokens`, `flops`: the model
    tokens and analytic training FLOPs of its micro-batches, `TrainingSpec.work`).

    The ranks of a sequence-parallel group share their samples, so the job processes
    world / sp times a rank's work; each GPU does 1/sp of its samples' FLOPs.
    tokens_per_s: the whole job's; tflops_per_gpu: achieved analytic TFLOP/s of one GPU;
    mfu: that over `peak_tflops` (only with it).
    """
    out = {"step_seconds": seconds, "tokens_per_s": tokens * world_size / sp_size / seconds,
           "tflops_per_gpu": flops / sp_size / seconds / 1e12}
    if peak_tflops:
        out["mfu"] = out["tflops_per_gpu"] / peak_tflops
    return out


class Trainer:
    def __init__(self, spec: TrainingSpec, args: TrainArgs):
        self.spec = spec
        self.args = args
        self.output = Path(args.output)
        self.ckpt_dir = self.output / "checkpoints"
        self.step = 0
        self.epoch = 0
        self.position = 0  # micro-batches of this epoch already consumed
        self.skipped_batches = 0
        self.ema: ShardedEMA | None = None
        self.resume_choice = ckpt.ResumeChoice(None)
        self.resumed_from: str | None = None

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        self.setup_distributed()
        self.choose_checkpoint()
        self.build_model()
        self.build_data()
        self.build_engine()
        self.maybe_resume()
        self.open_logs()
        self.train()
        return self.finish()

    # ------------------------------------------------------------------ steps
    def setup_distributed(self) -> None:
        import deepspeed

        self.on_cuda = torch.cuda.is_available()
        deepspeed.init_distributed(dist_backend="nccl" if self.on_cuda else "gloo")
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if not self.on_cuda:
            dist.barrier()  # every rank has mapped every rank's buffer: the names are no longer needed
            release_shm_allreduce_name(self.rank)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{local_rank}") if self.on_cuda else torch.device("cpu")
        if self.on_cuda:
            torch.cuda.set_device(self.device)
        self.dtype = torch.bfloat16 if self.on_cuda else torch.float32
        torch.manual_seed(self.args.seed)  # identical initial adapter weights on every rank
        self.setup_sequence_parallel()

    def setup_sequence_parallel(self) -> None:
        """The sequence and data-parallel groups of `--sp-size`: `self.sp` (None without), and the
        data-parallel place of this rank (`dp_rank` of `dp_size`), which picks its data and noise:
        the ranks of one sequence group draw the same samples, timesteps and noise."""
        self.sp = None
        self.dp_rank, self.dp_size = self.rank, self.world_size
        size = self.args.sp_size
        if size == 1:
            return
        from idcrafter.core.sequence_parallel import SequenceParallel, sp_size_problem

        problem = sp_size_problem(size, self.world_size)
        if problem:
            raise ConfigError(f"--sp-size {size}: {problem}")
        self.sp = SequenceParallel.init(size, "cuda" if self.on_cuda else "cpu")
        self.dp_rank, self.dp_size = self.sp.dp_rank, self.sp.dp_size

    def choose_checkpoint(self) -> None:
        """Which checkpoint `--resume` means, before anything heavy loads: a bad tag fails fast.

        Rank 0 decides from the shared checkpoint folder and broadcasts, so all ranks resume the
        same checkpoint or all stop with the same FileFormatError or ConfigError.
        """
        if not self.args.resume:
            return
        decision: list = [None]
        if self.rank == 0:
            try:
                decision[0] = ckpt.choose_checkpoint(self.ckpt_dir, self.args.resume, self.world_size,
                                                     snapshots=self.snapshot_names())
            except (FileFormatError, ConfigError) as err:
                decision[0] = err  # pickled to the other ranks, which raise the same error
        self.dist.broadcast_object_list(decision, src=0)
        if isinstance(decision[0], Exception):
            raise decision[0]
        self.resume_choice = decision[0]
        if self.rank == 0:
            for tag, why in self.resume_choice.skipped:
                logger.warning("--resume auto: skipping checkpoint %s: %s", tag, why)
            if self.resume_choice.tag is None:
                logger.info("--resume auto: no complete checkpoint in %s, starting fresh", self.ckpt_dir)

    def build_model(self) -> None:
        self.model = self.spec.build_model(self.device, self.dtype)
        self.params = self.spec.trainable_parameters(self.model, self.args.trainable)
        if not self.params:
            raise ValueError(f"policy {self.args.trainable!r} leaves nothing to train")
        if self.args.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        if self.sp is not None:
            if not hasattr(self.model, "enable_sequence_parallel"):
                raise ConfigError(f"--sp-size {self.sp.size}: {type(self.model).__name__} has no sequence parallelism")
            self.model.enable_sequence_parallel(self.sp)
        if self.rank == 0:
            n = sum(p.numel() for p in self.params)
            logger.info("trainable parameters: %.2fM (%s)", n / 1e6, self.args.trainable)

    def build_data(self) -> None:
        self.dataset, self.sampler, self.collate = self.spec.build_data(
            self.dp_rank, self.dp_size, self.args.seed, self.args.batch_size
        )
        if len(self.sampler) == 0:
            keys = self.dataset.bucket_ids() if hasattr(self.dataset, "bucket_ids") else []
            unreadable = sum(k is None for k in keys)
            if keys and unreadable == len(keys):
                raise AllSamplesFailed(f"every sample failed to decode ({unreadable} of {len(keys)} unreadable)")
            raise ConfigError(
                f"the data gives no full batch for rank {self.rank}: {len(keys) - unreadable} usable samples for "
                f"batch size {self.args.batch_size} x {self.world_size} ranks"
            )
        a = self.args
        self.validation_items = (self.spec.validation_items(a.validation_data, a.validation_samples)
                                 if a.validate_every else [])

    def build_engine(self) -> None:
        import deepspeed

        a = self.args
        config = prepare_ds_config(
            a.deepspeed_config, micro_batch=a.batch_size, grad_accum=a.grad_accum, grad_clip=a.grad_clip,
            bf16=self.dtype == torch.bfloat16, hidden_size=self.spec.hidden_size, lr=a.lr,
            weight_decay=a.weight_decay, betas=a.betas, warmup_steps=a.warmup_steps, total_steps=a.max_steps,
            schedule=a.lr_schedule, min_lr_ratio=a.min_lr_ratio,
            on_cpu=not self.on_cuda,
        )
        config, self.loss_factor = sequence_parallel_reduction(config, a.sp_size)
        self.ds_config = config
        # With sequence groups, DeepSpeed's own sequence-parallel mpu: ZeRO partitions over all ranks,
        # gradients are summed over a sequence group and averaged over the data-parallel groups.
        mpu = None
        if self.sp is not None:
            from idcrafter.core.sequence_parallel import deepspeed_mpu

            mpu = deepspeed_mpu(self.sp.size)
        self.engine, _, _, _ = deepspeed.initialize(model=self.model, model_parameters=self.params, config=config,
                                                    mpu=mpu)
        self.engine.checkpoint_engine = ckpt.safe_checkpoint_engine(self.engine)
        if a.ema_decay:
            self.ema = ShardedEMA(self.params, a.ema_decay)

    def maybe_resume(self) -> None:
        """Load the chosen checkpoint: DeepSpeed's states through the weights-only engine, this
        rank's trainer state (JSON) and EMA (weights-only)."""
        choice = self.resume_choice
        if choice.tag is None:
            return
        stage = zero_stage(self.ds_config)
        if choice.marker.zero_stage != stage:
            raise ConfigError(f"checkpoint {choice.tag} was written with ZeRO stage {choice.marker.zero_stage} and "
                              f"this run uses stage {stage}; resume with the same --deepspeed_config")
        folder = self.ckpt_dir / choice.tag
        load_path, _ = self.engine.load_checkpoint(str(self.ckpt_dir), tag=choice.tag)
        if load_path is None:
            raise FileFormatError(f"checkpoint {folder}: DeepSpeed found no model states to load")
        state = ckpt.read_rank_state(folder, self.rank)
        if state["step"] != choice.marker.step:
            raise FileFormatError(f"checkpoint {folder}: {ckpt.state_file(self.rank)} is for step {state['step']}, "
                                  f"{ckpt.MARKER} for step {choice.marker.step}")
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.skipped_batches = state["skipped_batches"]
        for name, snapshot in self.snapshots().items():
            ckpt.check_compatible(choice.tag, choice.marker, self.world_size, (name,))
            snapshot.load_state_dict(ckpt.safe_load(folder / ckpt.snapshot_file(name, self.rank), map_location="cpu"))
        self.resumed_from = choice.tag
        if self.rank == 0:
            logger.info("resumed from %s at step %d (epoch %d, batch %d)", choice.tag, self.step, self.epoch,
                        self.position)

    def snapshot_names(self) -> tuple[str, ...]:
        """The parameter snapshots this run keeps in its checkpoints (known before the model loads)."""
        return ("ema",) if self.args.ema_decay else ()

    def snapshots(self) -> dict:
        """{name: ParameterSnapshot} saved with every checkpoint and restored on resume."""
        return {"ema": self.ema} if self.ema is not None else {}

    def open_logs(self) -> None:
        """The first write to the run folder: logs continue from the resumed step (later rows of an
        interrupted attempt dropped) or start over."""
        resume_step = self.step if self.resumed_from else None
        if self.rank == 0 and self.args.settings is not None:
            from idcrafter.train.cli import write_settings

            write_settings(self.output, self.args.settings)
        self.log = MetricLog(self.output, enabled=self.rank == 0, resume_step=resume_step)
        self.draws = DrawLog(self.output, self.rank, resume_step)

    progress_name = "train"
    progress_key = "loss"  # the metric shown on the progress bar

    def train(self) -> None:
        from tqdm.auto import tqdm

        a = self.args
        self.engine.train()
        self.before_training()
        bar = tqdm(total=a.max_steps, initial=self.step, desc=self.progress_name, disable=self.rank != 0 or not a.progress)
        started, first_step = time.perf_counter(), self.step
        while self.step < a.max_steps:
            metrics = self.train_step()
            problem = non_finite_message(self.step + 1, metrics)  # every rank sees the same mean
            if problem:
                raise NonFiniteLoss(problem)
            self.step += 1
            if self.ema is not None:
                self.ema.update()
            extra = self.after_step()
            metrics.update(extra)
            if self.step % a.log_every == 0 or self.step == a.max_steps or self.step == 1 or extra:
                self.log.log(self.step, **metrics, lr=self.engine.get_lr()[0])
            if self.step % a.save_every == 0 or self.step == a.max_steps:
                self.save()
            bar.set_postfix({self.progress_key: f"{metrics[self.progress_key]:.4f}"})
            bar.update(1)
        bar.close()
        self.elapsed = time.perf_counter() - started
        self.steps_run = self.step - first_step  # a resumed run times only its own steps
        self.after_training()

    def before_training(self) -> None:
        """Hook: called once before the first step (the SFT trainer opens its data order here)."""
        self._batches = self._batch_iterator()

    def after_step(self) -> dict[str, float]:
        """Hook: metrics computed after an optimizer step (e.g. a held-out evaluation); when it
        returns any, the step is logged whatever `log_every` says. SFT writes its validation
        samples here when they are due."""
        every = self.args.validate_every
        if every and (self.step % every == 0 or self.step == self.args.max_steps):
            self.validate()
        return {}

    def validate(self) -> Path | None:
        """Sample the held-out items with the training model (the engine's module, no copy of the
        weights; the EMA weights swapped in when EMA is on) in eval mode without grad, then back to
        train mode. Every rank runs the same forwards (under ZeRO-3 each forward gathers the
        parameters with a collective); rank 0 writes the strip and the TensorBoard images and
        returns the PNG path."""
        from idcrafter.train.validation import validation_rows, write_validation

        a, model = self.args, self.engine.module
        started, training = time.perf_counter(), model.training
        model.eval()
        try:
            with torch.no_grad(), self.ema.applied() if self.ema is not None else contextlib.nullcontext():
                samples = self.spec.validation_samples(model, self.validation_items, a.validation_steps, a.seed)
        finally:
            model.train(training)
        if self.rank != 0:
            return None
        rows = validation_rows(samples, [[s.image for s in item.subjects] for item in self.validation_items])
        path = write_validation(self.output, self.step, rows, self.log.writer)
        logger.info("step %d: %d validation samples in %.1fs -> %s", self.step, len(samples),
                    time.perf_counter() - started, path)
        return path

    def after_training(self) -> None:
        """Hook: called once after the last step."""

    def train_step(self) -> dict:
        """One optimizer step: grad_accum micro-batches, then DeepSpeed's step; the losses and the
        throughput (`throughput_metrics`) averaged over the ranks."""
        started = time.perf_counter()
        totals: dict[str, float] = {}
        work = {WORK_TOKENS: 0.0, WORK_FLOPS: 0.0}
        for micro in range(self.args.grad_accum):
            batch = next(self._batches)
            self.draws.log(self.step + 1, batch)
            conditions = self.spec.prepare(batch, self.device)
            generator = torch.Generator().manual_seed(_mix_seed(self.args.seed, self.step, micro, self.dp_rank))
            loss, metrics = self.spec.loss(self.engine, conditions, generator)
            self.backward(loss)
            self.engine.step()
            for key, value in {"loss": loss.detach(), **metrics}.items():
                totals[key] = totals.get(key, 0.0) + float(value) / self.args.grad_accum
            if hasattr(self.spec, "work"):  # float() above waited for this micro-batch's kernels
                tokens, flops = self.spec.work(conditions, self.args.gradient_checkpointing)
                work[WORK_TOKENS] += tokens
                work[WORK_FLOPS] += flops
        means = self._mean_over_ranks({**totals, **work} if hasattr(self.spec, "work") else totals)
        seconds = time.perf_counter() - started
        tokens, flops = means.pop(WORK_TOKENS, None), means.pop(WORK_FLOPS, None)
        if tokens is not None:
            means.update(throughput_metrics(tokens, flops, seconds, self.world_size,
                                            getattr(self.args, "sp_size", 1), self.args.peak_tflops))
        return means

    def backward(self, loss: torch.Tensor) -> None:
        """`engine.backward`, the loss scaled as DeepSpeed's reduction under sequence parallelism needs
        (`sequence_parallel_reduction`; 1 without it)."""
        self.engine.backward(loss * self.loss_factor if self.loss_factor != 1 else loss)

    def save(self) -> None:
        """A checkpoint (resume) and the exported adapter (inference), then prune old checkpoints.

        Order matters for a kill at any moment: a stale folder of this tag goes first (marker
        first), then DeepSpeed's files, then every rank's own state, a barrier, and only then rank
        0 seals the folder with its marker and moves `latest` (see idcrafter.train.checkpoint).
        """
        tag = ckpt.step_tag(self.step)
        folder = self.ckpt_dir / tag
        if self.rank == 0 and folder.exists():
            ckpt.discard(folder)
        self.dist.barrier()
        client = {"step": self.step, "args": asdict(self.args)}  # for people; resume reads trainer_rank{r}.json
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=client, save_latest=False)
        state = {"step": self.step, "epoch": self.epoch, "position": self.position,
                 "skipped_batches": self.skipped_batches}
        ckpt.write_rank_state(folder, self.rank, state, {k: v.state_dict() for k, v in self.snapshots().items()})
        self.dist.barrier()
        if self.rank == 0:
            ckpt.write_marker(folder, self.step, self.world_size, zero_stage(self.ds_config))
            ckpt.write_latest(self.ckpt_dir, tag)
        self.export(self.output / "adapter")
        self.dist.barrier()
        if self.rank == 0:
            ckpt.prune(self.ckpt_dir, self.args.keep_last, self.step)
            self.log.plot()

    def export(self, folder: Path) -> None:
        """Gather the trainable weights from their ZeRO partitions; rank 0 writes the adapter."""
        import deepspeed

        def write():
            params = self.params if zero_stage(self.ds_config) == 3 else []
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=bool(params)):
                if self.rank == 0:
                    self.spec.export(self.model, folder)

        if self.ema is not None:
            with self.ema.applied():
                write()
        else:
            write()

    def finish(self) -> dict:
        # Every rank reads every header, so a bad sample may be known to several ranks: count the union.
        failed = [None] * self.world_size
        self.dist.all_gather_object(failed, sorted(getattr(self.dataset, "failures", {})))
        self.failed_ids = sorted(set().union(*failed))
        skipped = torch.tensor([float(self.skipped_batches)], dtype=torch.float64)
        self.dist.all_reduce(skipped)
        summary = {
            "steps": self.step,
            "elapsed_s": round(getattr(self, "elapsed", 0.0), 2),
            "steps_per_s": round(getattr(self, "steps_run", 0) / max(getattr(self, "elapsed", 0.0), 1e-9), 4),
            "failed_samples": len(self.failed_ids),
            "failed_sample_ids": self.failed_ids[:100],
            "skipped_batches": int(skipped.item()),
            "world_size": self.world_size,
            "zero_stage": zero_stage(self.ds_config),
            "resumed_from": self.resumed_from,
            "final": {k: v[-1][1] for k, v in self.log.history.items()},
            **self.spec.describe(),
        }
        if self.rank == 0:
            self.log.plot()
            with atomic_write(self.output / "summary.json") as tmp:
                tmp.write_text(json.dumps(summary, indent=2))
            if summary["failed_samples"]:
                logger.warning("%d samples failed to decode and were skipped", summary["failed_samples"])
        self.log.close()
        self.draws.close()
        return summary

    # ------------------------------------------------------------------ helpers
    def _batch_iterator(self):
        """Micro-batches in a fixed order from (seed, epoch, position), skipping undecodable ones.

        A batch whose samples all failed is skipped (and counted) by the rank that drew it; the
        ranks agree once per micro-batch whether someone went a whole epoch without a good
        batch, so all stop together with a clear error instead of hanging in a collective.
        """
        from torch.utils.data import DataLoader

        while True:
            self.sampler.set_epoch(self.epoch)
            self.sampler.skip_batches = self.position
            loader = DataLoader(self.dataset, batch_sampler=self.sampler, collate_fn=self.collate, num_workers=0)
            misses = 0
            for batch in loader:
                self.position += 1
                if batch is None:
                    self.skipped_batches += 1
                    misses += 1
                    if misses < len(self.sampler):
                        continue
                ok = torch.tensor([0.0 if batch is None else 1.0])
                self.dist.all_reduce(ok, op=self.dist.ReduceOp.MIN)
                if ok.item() == 0:
                    raise AllSamplesFailed(
                        "every sample of a whole epoch failed to decode on at least one rank; check the data "
                        "with `python -m idcrafter.data.validate` and the warnings above"
                    )
                misses = 0
                yield batch
            self.epoch += 1
            self.position = 0

    def _mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        self.dist.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t)}
