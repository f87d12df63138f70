"""Benchmark cases behind `scripts/benchmark.py`.

A case is a function `run(device, full, **options) -> report dict` (ratios measured side by side in
one run) and a `format_table(report) -> str` for people.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    run: Callable[..., dict]
    format_table: Callable[[dict], str]
    help: str


CASES: dict[str, Case] = {}


def register(name: str, format_table: Callable[[dict], str], help: str = ""):
    def wrap(fn):
        CASES[name] = Case(fn, format_table, help or (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return wrap


def load_cases() -> dict[str, Case]:
    """Import every case module so it registers itself."""
    from idcrafter.benchmarks import attention, gpu_suite, image, lora, toyworld, video  # noqa: F401

    return CASES
