"""Online RL post-training on DeepSpeed (Flow-GRPO / GSPO with the sliding SDE window, docs/design.md 7).

One iteration on every rank:
1. take `groups` (prompt, subjects) items; encode each one's conditioning once; sample a group of G
   from one initial noise (ODE outside the window, SDE inside) and decode it;
2. score each group on a worker thread as soon as it is decoded, so the reward models run while
   the next group samples (off the training step);
3. group-normalised advantages; re-score the window steps under the current policy with grad and
   take one optimizer step per inner epoch on the clipped GRPO (per step) or GSPO (per sequence)
   objective, plus beta * KL to the reference policy: the policy as it was when RL started;
4. log reward components, KL, clip fraction and window position, and the iteration's throughput
   (model tokens/s, analytic TFLOP/s and MFU, `IterationWork`); checkpoint and export as SFT does.

The generic parts (distributed set-up, engine, checkpoints, resume, export, metric logs) come
from `idcrafter.train.trainer.Trainer`; the model-specific parts from an `RLSpec`.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from idcrafter.core.flops import training_step_flops
from idcrafter.flow.sde import ode_step, sigma_schedule
from idcrafter.rl.losses import group_advantages, grpo_loss, gspo_loss, weighted_rewards
from idcrafter.rl.sampling import Rollout, Velocity, sample_group, window_log_probs
from idcrafter.rl.window import SlidingWindow
from idcrafter.train.trainer import WORK_FLOPS, WORK_TOKENS, TrainArgs, Trainer, _mix_seed, throughput_metrics
from idcrafter.utils.io import atomic_write
from idcrafter.utils.logging import get_logger

logger = get_logger("idcrafter.rl")


@dataclass
class RLArgs:
    """The RL hyper-parameters (docs/design.md 7); each is a flag of scripts/train_rl.py."""

    objective: str = "grpo"  # grpo (per-step ratios) or gspo (sequence ratio, MultiCrafter's IPPO)
    group_size: int = 4  # G
    groups: int = 1  # (prompt, subjects) groups per rank and iteration
    num_steps: int = 16  # T sampling steps of a rollout
    window: int = 2  # w
    window_every: int = 50  # tau
    window_stride: int = 1  # s
    window_start: int = 0
    noise_level: float = 1.0  # a
    clip_eps: float = 1e-4  # Flow-GRPO's clip range: per-element-averaged log-ratios move little
    kl_weight: float = 0.0  # beta
    inner_epochs: int = 1
    adv_clip: float = 5.0
    # Normalise each weighted reward component within its group before weighting (docs/design.md 7), so
    # components on different scales enter comparably; needs a reward with `weights` (a composite).
    normalise_rewards: bool = False
    eval_every: int = 0
    eval_limit: int = 8

    def __post_init__(self) -> None:
        if self.objective not in ("grpo", "gspo"):
            raise ValueError(f"objective must be grpo or gspo, got {self.objective!r}")
        if self.group_size < 2:
            raise ValueError(f"group size must be at least 2, got {self.group_size}")
        for name in ("groups", "num_steps", "window", "window_every", "window_stride", "inner_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.noise_level <= 0:
            raise ValueError(f"noise level must be positive, got {self.noise_level}")
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"clip eps must be in (0, 1), got {self.clip_eps}")
        if self.kl_weight < 0:
            raise ValueError(f"kl weight must be >= 0, got {self.kl_weight}")

    def sliding_window(self) -> SlidingWindow:
        return SlidingWindow(self.num_steps, self.window, self.window_every, self.window_stride, self.window_start)


class RLSpec(Protocol):
    """What a branch brings to RL (see `idcrafter.video.rl.VideoRLSpec`)."""

    hidden_size: int
    flow_shift: float

    def build_model(self, device: torch.device, dtype: torch.dtype) -> nn.Module: ...
    def trainable_parameters(self, model: nn.Module, policy: str) -> list[nn.Parameter]: ...
    def build_items(self, which: str) -> list[Any]: ...
    def condition(self, model: nn.Module, item: Any, device: torch.device) -> Any: ...
    def velocity(self, model: nn.Module, cond: Any) -> Velocity: ...
    def reference(self, model: nn.Module) -> contextlib.AbstractContextManager: ...
    def initial_noise(self, item: Any, generator: torch.Generator) -> torch.Tensor: ...
    def decode(self, latents: torch.Tensor) -> list[np.ndarray]: ...
    def reward_inputs(self, item: Any) -> tuple[str, list[np.ndarray], dict]: ...
    def export(self, model: nn.Module, folder: Path) -> None: ...
    def describe(self) -> dict: ...
    # Optional: (model tokens of one transformer forward row, its analytic FLOPs, the FLOPs the
    # condition's subject streams took, as training when they carry grad); without it no throughput.
    def forward_work(self, cond: Any, checkpointing: bool) -> tuple[int, int, int]: ...


class IterationWork:
    """Model tokens and analytic FLOPs of one RL iteration (docs/design.md 11).

    A forward pre-hook on the policy counts the rows of every transformer call, split by grad mode,
    so every guidance pass, window re-score and KL reference forward is counted as it ran; `charge`
    adds the rows since the last charge at an item's per-row cost (`RLSpec.forward_work`), rows
    under grad as training (backward, and the recompute of checkpointing), and the encoding of that
    item's subject streams. Decoding and the reward models are not the policy's work.
    """

    def __init__(self, module: nn.Module, spec: RLSpec, checkpointing: bool):
        self.spec, self.checkpointing = spec, checkpointing
        self.tokens, self.flops = 0, 0
        self._rows = {False: 0, True: 0}
        self._handle = module.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        self._rows[torch.is_grad_enabled()] += x.shape[0]

    def charge(self, cond: Any) -> None:
        """The rows counted since the last charge at `cond`'s per-row cost, and `cond`'s streams."""
        tokens, row, streams = self.spec.forward_work(cond, self.checkpointing)
        plain, trained = self._rows[False], self._rows[True]
        self._rows = {False: 0, True: 0}
        self.tokens += (plain + trained) * tokens
        self.flops += plain * row + training_step_flops(trained * row, self.checkpointing) + streams

    def close(self) -> None:
        self._handle.remove()


def load_prompt_samples(path: str | Path, max_subjects: int, flag: str = "--data") -> list:
    """The manifest samples an RL run draws its (prompt, subjects) items from (docs/design.md 8; only the
    prompt and the subjects' images and categories are used). The manifest validation's one-line error on bad lines, no
    samples, or samples with more subjects than the model takes."""
    from idcrafter.data.manifest import read_samples

    return read_samples(path, flag, max_subjects)


def reference_arrays(paths) -> list[np.ndarray]:
    """Reference image files -> uint8 [H, W, 3] arrays, as the reward models take them."""
    from idcrafter.utils.media import load_rgb

    return [np.asarray(load_rgb(p)) for p in paths]


class RLTrainer(Trainer):
    """`Trainer` with rollouts instead of a dataset: `run()` is the same list of steps."""

    def __init__(self, spec: RLSpec, args: TrainArgs, rl: RLArgs, reward):
        super().__init__(spec, args)
        self.rl = rl
        self.reward = reward
        self.schedule = rl.sliding_window()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")

    # ------------------------------------------------------------------ data: prompt items
    def build_data(self) -> None:
        self.items = self.spec.build_items("train")
        if not self.items:
            raise ValueError("no training prompts")
        self.eval_items = self.spec.build_items("eval") if self.rl.eval_every else []
        self.dataset = None
        self.sigmas = sigma_schedule(self.rl.num_steps, self.spec.flow_shift)

    def build_model(self) -> None:
        """The policy, and how the KL reference (the policy at the start of RL) is computed: with
        only a LoRA training that starts at zero contribution, switching the LoRA off is that
        policy exactly and free; otherwise (identity modules, or a LoRA trained before) a frozen
        copy of the trainable weights is swapped in (`ParameterSnapshot`, saved with checkpoints)."""
        super().build_model()
        from idcrafter.core.moe_lora import moe_lora_contributes

        self.reference_by_lora_off = self.args.trainable == "lora" and not moe_lora_contributes(self.model)
        if self.rank == 0 and self.rl.kl_weight > 0:
            logger.info("KL reference: the starting policy, as %s", "the model with its fresh LoRA off"
                        if self.reference_by_lora_off else "a frozen copy of the trainable weights")

    def build_engine(self) -> None:
        # One optimizer step per inner epoch: DeepSpeed accumulates over the groups of an iteration.
        self.args.grad_accum = self.rl.groups
        super().build_engine()
        self.start_policy = None
        if self.rl.kl_weight > 0 and not self.reference_by_lora_off:
            from idcrafter.train.ema import ParameterSnapshot

            self.start_policy = ParameterSnapshot(self.params)

    def snapshots(self) -> dict:
        found = super().snapshots()
        if self.start_policy is not None:
            found["start_policy"] = self.start_policy
        return found

    def reference_policy(self) -> contextlib.AbstractContextManager:
        """The block in which the model computes the KL reference policy."""
        if self.start_policy is not None:
            return self.start_policy.applied()
        return self.spec.reference(self.engine.module)

    def _item_iterator(self):
        """Items in a per-(seed, epoch) order, this rank's share, resumable from `position`."""
        while True:
            order = np.random.default_rng(_mix_seed(self.args.seed, self.epoch)).permutation(len(self.items))
            mine = order[self.dp_rank :: self.dp_size]  # a sequence group shares its items
            if len(mine) == 0:
                mine = order[: 1]
            while self.position < len(mine):
                self.position += 1
                yield self.items[mine[self.position - 1]]
            self.epoch += 1
            self.position = 0

    # ------------------------------------------------------------------ the loop (Trainer.train's hooks)
    progress_name = "rl"
    progress_key = "reward"

    def before_training(self) -> None:
        self._items = self._item_iterator()
        if self.rl.eval_every and self.step == 0:
            self.log.log(0, **self.evaluate())

    def after_step(self) -> dict[str, float]:
        if self.rl.eval_every and (self.step % self.rl.eval_every == 0 or self.step == self.args.max_steps):
            return self.evaluate()
        return {}

    def after_training(self) -> None:
        self.executor.shutdown()
        if self.rank == 0:
            self.reward_plot()

    def rollout(self, item: Any, window: range, generator: torch.Generator,
                work: IterationWork | None = None) -> tuple[Rollout, Any]:
        model = self.engine.module
        model.eval()
        with torch.no_grad():
            cond = self.spec.condition(model, item, self.device)
            noise = self.spec.initial_noise(item, generator).to(self.device)
            rollout = sample_group(self.spec.velocity(model, cond), noise, self.rl.group_size, self.sigmas.to(self.device),
                                   window, self.rl.noise_level, generator)
            if work is not None:
                work.charge(cond)
            frames = self.spec.decode(rollout.final)
        prompt, refs, meta = self.spec.reward_inputs(item)
        g = self.rl.group_size
        future = self.executor.submit(self.reward, frames, [prompt] * g, [refs] * g, [meta] * g)
        return rollout, future

    def train_step(self) -> dict:
        started = time.perf_counter()
        work = IterationWork(self.engine.module, self.spec, self.args.gradient_checkpointing) \
            if hasattr(self.spec, "forward_work") else None
        try:
            metrics = self._iteration(work)
        finally:
            if work is not None:
                work.close()
        if work is None:
            return self._mean_over_ranks(metrics)
        means = self._mean_over_ranks({**metrics, WORK_TOKENS: float(work.tokens), WORK_FLOPS: float(work.flops)})
        tokens, flops = means.pop(WORK_TOKENS), means.pop(WORK_FLOPS)
        means.update(throughput_metrics(tokens, flops, time.perf_counter() - started, self.world_size,
                                        getattr(self.args, "sp_size", 1), self.args.peak_tflops))
        return means

    def _iteration(self, work: IterationWork | None) -> dict:
        """Rollouts, rewards and the policy update of one iteration: this rank's metrics."""
        rl = self.rl
        window = self.schedule.window(self.step)
        generator = torch.Generator().manual_seed(_mix_seed(self.args.seed, self.step, self.dp_rank))
        items = [next(self._items) for _ in range(rl.groups)]
        pending = [self.rollout(item, window, generator, work) for item in items]
        rollouts, outputs = [p[0] for p in pending], [p[1].result() for p in pending]
        rewards = torch.stack([o.scores for o in outputs])  # [groups, G]
        if rl.normalise_rewards:
            rewards = torch.stack([weighted_rewards(o.components, self.reward.weights, normalise_per_group=rl.group_size)
                                   for o in outputs])
        advantages = group_advantages(rewards, clip=rl.adv_clip).to(self.device)
        objective = gspo_loss if rl.objective == "gspo" else grpo_loss
        self.engine.train()
        stats: dict[str, float] = {}
        for _ in range(rl.inner_epochs):
            for item, rollout, adv in zip(items, rollouts, advantages):
                cond = self.spec.condition(self.engine.module, item, self.device)
                reference = None
                if rl.kl_weight > 0:
                    with self.reference_policy(), torch.no_grad():  # the reference's own conditioning
                        ref_cond = self.spec.condition(self.engine.module, item, self.device)
                    reference = _ReferenceVelocity(self.reference_policy, self.spec.velocity(self.engine.module, ref_cond))
                    if work is not None:  # its streams (no rows have run since the last charge)
                        work.charge(ref_cond)
                logp, kl = window_log_probs(self.spec.velocity(self.engine.module, cond), rollout, rl.noise_level,
                                            reference=reference)
                if work is not None:  # the policy's re-scored window steps and the reference's
                    work.charge(cond)
                loss, s = objective(logp, rollout.log_probs, adv, rl.clip_eps)
                if kl is not None:
                    loss = loss + rl.kl_weight * kl.mean()
                    s["kl"] = kl.detach().mean()
                self.backward(loss)
                self.engine.step()
                for key, value in {"policy_loss": loss.detach(), **s}.items():
                    stats[key] = stats.get(key, 0.0) + float(value) / (rl.inner_epochs * rl.groups)
        raw = torch.stack([o.scores for o in outputs])
        metrics = {"reward": float(raw.mean()), "reward_std": float(raw.std(-1, unbiased=False).mean()),
                   "window_start": float(window[0]), **stats}
        for name in outputs[0].components:
            metrics[f"reward_{name}"] = float(torch.stack([o.components[name] for o in outputs]).mean())
        warnings = sum(sum(o.warnings.values()) for o in outputs)
        metrics["reward_warnings"] = float(warnings)
        return metrics

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean reward of deterministic (ODE) samples of the held-out items, split over the ranks."""
        model = self.engine.module
        model.eval()
        # A sequence group scores its items on each of its ranks: sums and counts both grow by the
        # group size, the mean does not.
        mine = self.eval_items[: self.rl.eval_limit][self.dp_rank :: self.dp_size]
        total = torch.zeros(2, dtype=torch.float64)
        components: dict[str, float] = {}
        for i, item in enumerate(mine):
            cond = self.spec.condition(model, item, self.device)
            noise = self.spec.initial_noise(item, torch.Generator().manual_seed(1000 + i)).to(self.device)
            velocity = self.spec.velocity(model, cond)
            x, sigmas = noise, self.sigmas.to(self.device)
            for k in range(sigmas.numel() - 1):
                x = ode_step(velocity(x, sigmas[k].expand(1)), sigmas[k], sigmas[k + 1], x)
            prompt, refs, meta = self.spec.reward_inputs(item)
            out = self.reward(self.spec.decode(x), [prompt], [refs], [meta])
            total += torch.tensor([float(out.scores.sum()), 1.0], dtype=torch.float64)
            for name, value in out.components.items():
                components[name] = components.get(name, 0.0) + float(value.sum())
        self.dist.all_reduce(total)
        result = {"eval_reward": float(total[0] / max(total[1], 1.0))}
        for name in sorted(components):  # every rank scores the same component names
            t = torch.tensor([components[name]], dtype=torch.float64)
            self.dist.all_reduce(t)
            result[f"eval_reward_{name}"] = float(t[0] / max(total[1], 1.0))
        if self.rank == 0:
            logger.info("step %d: held-out reward %.4f", self.step, result["eval_reward"])
        return result

    def reward_plot(self) -> Path | None:
        keys = [k for k in ("reward", "eval_reward") if k in self.log.history]
        return self.log.plot("reward_curve.png", keys=keys) if keys else None

    def finish(self) -> dict:
        summary = {
            "steps": self.step,
            "elapsed_s": round(getattr(self, "elapsed", 0.0), 2),
            "world_size": self.world_size,
            "resumed_from": self.resumed_from,
            "objective": self.rl.objective,
            "group_size": self.rl.group_size,
            "final": {k: v[-1][1] for k, v in self.log.history.items()},
            "first": {k: v[0][1] for k, v in self.log.history.items()},
            **self.spec.describe(),
        }
        if self.rank == 0:
            self.log.plot()
            with atomic_write(self.output / "summary.json") as tmp:
                import json

                tmp.write_text(json.dumps(summary, indent=2))
        self.log.close()
        return summary


class _ReferenceVelocity:
    """The KL reference's velocity: `velocity` evaluated inside `policy()` (the starting policy)."""

    def __init__(self, policy, velocity):
        self.policy, self.velocity = policy, velocity

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        with self.policy():
            return self.velocity(x, sigma)
