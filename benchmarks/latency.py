"""Wall-clock latency of competing runners, measured in turns: p50 and p90 per runner.

Every runner is warmed up first (sessions allocate, PyTorch picks kernels; a second warm-up run only
where the first took under a second), then all of them run in turns (a, b, c, a, b, c, ...) so that
load from other processes falls on each alike. There are `runs` turns, more while they have taken
less than `min_seconds` in all (sub-millisecond graphs), and fewer, down to `min_runs`, where turns
are so slow that `runs` of them would take more than `max_seconds` (a base-size ViT at batch 8).
A runner that raises during warm-up is reported with the reason, not timed. A runner faster than
`SETTLE_SECONDS` runs once untimed at each turn before its timed run: the first run after another
library's turn pays for waking thread pools that the other one left spinning or asleep, which is
noise at a second per run and not at a millisecond.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

MAX_RUNS = 200
SLOW_SECONDS = 1.0  # a warm-up run this long has warmed up enough
SETTLE_SECONDS = 0.05


@dataclass(frozen=True)
class TimingConfig:
    runs: int = 10
    warmup: int = 2
    min_seconds: float = 1.0
    min_runs: int = 5
    max_seconds: float = float("inf")


@dataclass(frozen=True)
class Timing:
    p50_ms: float
    p90_ms: float
    runs: int

    def to_json(self) -> dict[str, float | int]:
        return {"p50_ms": round(self.p50_ms, 4), "p90_ms": round(self.p90_ms, 4), "runs": self.runs}


def summarize(seconds: list[float]) -> Timing:
    ms = np.asarray(seconds) * 1000
    return Timing(float(np.percentile(ms, 50)), float(np.percentile(ms, 90)), len(ms))


def time_in_turns(runners: dict[str, Callable[[], object]], config: TimingConfig) -> dict[str, Timing | str]:
    """A `Timing` per runner, or why it could not run (the exception, in one line)."""
    results: dict[str, Timing | str] = {}
    alive: dict[str, Callable[[], object]] = {}
    settle: set[str] = set()
    for name, run in runners.items():
        took = float("inf")
        try:
            for _ in range(config.warmup):
                start = time.perf_counter()
                run()
                took = time.perf_counter() - start
                if took > SLOW_SECONDS:
                    break
            alive[name] = run
            if took < SETTLE_SECONDS:
                settle.add(name)
        except Exception as exc:  # e.g. an op without a kernel on this backend
            message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            results[name] = f"{type(exc).__name__}: {message}"
    spent: dict[str, list[float]] = {name: [] for name in alive}
    started = time.perf_counter()
    for turn in range(MAX_RUNS):
        elapsed = time.perf_counter() - started
        if turn >= config.runs and elapsed >= config.min_seconds:
            break
        if turn >= max(1, min(config.min_runs, config.runs)) and elapsed / turn * config.runs > config.max_seconds:
            break
        for name, run in alive.items():
            if name in settle:
                run()
            start = time.perf_counter()
            run()
            spent[name].append(time.perf_counter() - start)
    for name in runners:
        if name in spent:
            results[name] = summarize(spent[name])
    return results
