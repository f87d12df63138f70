"""Peak-memory and time measurement that works the same on CPU and CUDA, for benchmarks.

On CUDA the caching allocator's counters are exact. On CPU there is no allocator counter, so
`TensorMemoryTracker` watches every tensor storage created by an operator (forward, backward and
checkpoint recomputation alike) and frees it from the count when the storage dies: the peak is
the largest total of live storages created inside the block, i.e. activations and gradients,
not the inputs or weights that existed before.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["Measurement", "TensorMemoryTracker", "measure", "measure_side_by_side", "peak_bytes"]


class TensorMemoryTracker(TorchDispatchMode):
    """Context manager: `peak_bytes` of tensor storages created (and alive at once) inside it."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak_bytes = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self._seen or storage.nbytes() == 0:
                continue
            self._seen.add(key)
            self.live += storage.nbytes()
            self.peak_bytes = max(self.peak_bytes, self.live)
            weakref.finalize(storage, self._release, key, storage.nbytes())
        return out


@dataclass
class Measurement:
    seconds: float  # median wall time of one call
    peak_bytes: int  # peak memory above what was allocated before the call

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak memory of one call of `fn` above what was allocated before it."""
    device = torch.device(device)
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    with TensorMemoryTracker() as tracker:
        fn()
    return int(tracker.peak_bytes)


def measure(fn: Callable[[], object], device: torch.device | str = "cpu", repeats: int = 3, warmup: int = 1) -> Measurement:
    """Median time over `repeats` calls of `fn` and its peak memory (one extra, tracked call)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = peak_bytes(fn, device)
    times.sort()
    return Measurement(seconds=times[len(times) // 2], peak_bytes=peak)


def measure_side_by_side(
    fns: dict[str, Callable[[], object]], device: torch.device | str = "cpu", repeats: int = 3, warmup: int = 1
) -> dict[str, Measurement]:
    """`measure` for several variants with their timed calls interleaved (a, b, a, b, ...).

    On a shared or throttling machine the load drifts over a run; interleaving spreads that drift
    over every variant instead of charging it to whichever ran last, so the ratios stay fair.
    """
    device = torch.device(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    out = {}
    for name, fn in fns.items():
        ordered = sorted(times[name])
        out[name] = Measurement(seconds=ordered[len(ordered) // 2], peak_bytes=peak_bytes(fn, device))
    return out
