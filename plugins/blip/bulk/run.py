"""`convert bulk`: check the job, list the inputs, take up RESULT, run the pending shards, summarise.

Everything that can be refused is refused before the first image is read (exit 2): options no
search can honour, a model without the graphs the task needs, more CPUs than there are, an INPUT
that cannot be listed, a RESULT of another job.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from converter_core.errors import EnvironmentFailure, InputError
from converter_core.output import locked
from plugins.blip.bulk.inputs import Item, list_inputs
from plugins.blip.bulk.result import ResultDir, model_identity
from plugins.blip.bulk.worker import TASKS, Task, WorkOptions


@dataclass(frozen=True)
class BulkJob:
    """What `convert bulk` was asked. `threads`: onnxruntime threads per worker (None: the usable
    cores shared out over the workers). `ray`: None for this machine's process pool, else the
    address `ray.init` takes (`local` starts a cluster for the job)."""

    out_dir: Path
    inputs: list[Path]
    result: Path
    task: Task = "both"
    beams: int = 1
    max_tokens: int = 20
    batch: int = 8
    workers: int = 1
    threads: int | None = None
    shard_size: int = 1000
    column: str | None = None
    id_column: str | None = None
    tokenizer: Path | None = None
    ray: str | None = None
    overwrite: bool = False


@dataclass
class BulkOutcome:
    summary: dict[str, Any]
    exit_code: int


def usable_cpus() -> int:
    """Cores this process may run on (a container's or taskset's limit, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _check(job: BulkJob) -> int:
    """The threads per worker; InputError for an option no run can honour."""
    if job.task not in TASKS:
        raise InputError(f"--task must be one of {', '.join(TASKS)}, got {job.task!r}")
    for name, value in (("--batch", job.batch), ("--workers", job.workers), ("--shard-size", job.shard_size),
                        ("--threads", job.threads if job.threads is not None else 1)):
        if value < 1:
            raise InputError(f"{name} must be >= 1, got {value}")
    cores = usable_cpus()
    threads = job.threads or max(1, cores // job.workers)
    # A Ray cluster elsewhere has its own CPUs: `ray_mode` checks against them once connected.
    if job.ray is None or job.ray == "local":
        if job.workers * threads > cores:
            raise InputError(f"--workers {job.workers} x --threads {threads} = {job.workers * threads} CPUs, but this "
                             f"machine gives this process {cores}; ask for fewer")
    return threads


def _check_model(job: BulkJob):
    from plugins.blip.graphs import TEXT_DECODER, TEXT_DECODER_WITH_PAST, TEXT_ENCODER
    from plugins.blip.runtime import BlipRuntime, DecodingOptions

    runtime = BlipRuntime(job.out_dir, tokenizer_dir=job.tokenizer)
    needed = {"caption": (TEXT_DECODER, TEXT_DECODER_WITH_PAST), "embed": (TEXT_ENCODER,),
              "both": (TEXT_DECODER, TEXT_DECODER_WITH_PAST, TEXT_ENCODER)}[job.task]
    missing = [module for module in needed if not runtime.has(module)]
    if missing:
        raise InputError(f"{job.out_dir}: has no {', '.join(missing)}, which --task {job.task} needs "
                         "(captions need a captioning checkpoint, embeddings a retrieval or pretrain one)")
    if job.task != "embed":
        DecodingOptions(beams=job.beams, max_tokens=job.max_tokens).check()
        prompt = len(runtime.prompt_ids())
        if prompt + job.max_tokens > runtime.max_text_len:
            raise InputError(f"prompt ({prompt} tokens) + --max-tokens {job.max_tokens} exceeds the {runtime.max_text_len} "
                             "positions this output was validated for")
    return runtime


def require_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError as exc:
        raise InputError("convert bulk writes Parquet with pyarrow: pip install 'vlm-converter[bulk]'") from exc


def run_bulk(job: BulkJob, progress=None) -> BulkOutcome:
    """Run `job` to the end (or until a worker dies); `progress`: a `BulkProgress` or None."""
    require_pyarrow()
    threads = _check(job)
    runtime = _check_model(job)
    listing = list_inputs(job.inputs, job.column, job.id_column)
    identity = model_identity(runtime.manifest)
    options = {"task": job.task, "beams": job.beams, "max_tokens": job.max_tokens, "shard_size": job.shard_size,
               "tokenizer": str(job.tokenizer) if job.tokenizer else None}
    if job.task == "embed":  # decoding settings do not change an embedding row
        options.update(beams=None, max_tokens=None)
    fingerprint = {"model": identity, "options": options,
                   "inputs": {"kind": listing.kind, "column": listing.column, "id_column": job.id_column,
                              "count": len(listing.items), "sha256": listing.digest}}
    # Two runs on one RESULT would each caption every pending shard: the second is told at once instead.
    try:
        job.result.absolute().parent.mkdir(parents=True, exist_ok=True)  # the lock lies beside RESULT
    except OSError as exc:
        raise EnvironmentFailure(f"cannot write {job.result}: {exc.strerror or exc}") from exc
    with locked(job.result.absolute()):
        result = ResultDir.open(job.result, fingerprint, job.overwrite)
        items = listing.items
        shards = [(k, items[start:start + job.shard_size]) for k, start in enumerate(range(0, len(items), job.shard_size))]
        pending = [(k, part) for k, part in shards if not result.finished(k, len(part))]
        work = WorkOptions(out_dir=str(job.out_dir.absolute()), task=job.task, beams=job.beams, max_tokens=job.max_tokens,
                           batch=job.batch, threads=threads, tokenizer=str(job.tokenizer.absolute()) if job.tokenizer else None,
                           column=listing.column if listing.kind == "parquet-bytes" else None)
        todo = sum(len(part) for _, part in pending)
        if progress is not None:
            progress.start(total=len(items), done=len(items) - todo)
        written: list[int] = []
        started = time.perf_counter()
        on_images = progress.advance if progress is not None else (lambda count: None)
        died = None
        try:
            died = _execute(job, _absolute(pending), work, result, on_images, written.append)
        finally:
            if progress is not None:
                progress.stop()
        seconds = time.perf_counter() - started
        done, failed = result.counts()
        missing = [k for k, part in shards if not result.finished(k, len(part))]
        summary = {
            "result": str(job.result), "complete": not missing, "inputs": len(items), "done": done, "failed": failed,
            "shards": {"total": len(shards), "written_now": len(written), "earlier": len(shards) - len(pending),
                       "missing": len(missing)},
            "seconds": round(seconds, 3), "images_per_second": round(todo / seconds, 3) if todo and not missing else None,
            "model": {"out": str(job.out_dir), "identity": identity},
            "options": {**options, "batch": job.batch, "workers": job.workers, "threads": threads,
                        "mode": "ray" if job.ray else "local", "ray": job.ray},
            "inputs_listing": fingerprint["inputs"],
        }
        if died:
            summary["died"] = died
        result.write_summary(summary)
        return BulkOutcome(summary, 1 if missing else 0)


def _absolute(shards: list[tuple[int, list[Item]]]) -> list[tuple[int, list[Item]]]:
    """Items with absolute paths: workers (and Ray nodes) need not share the driver's directory."""
    return [(k, [replace(item, file=os.path.abspath(item.file)) for item in part]) for k, part in shards]


def _execute(job: BulkJob, pending, work: WorkOptions, result: ResultDir, on_images, on_shard) -> str | None:
    if job.ray is not None:
        from plugins.blip.bulk.ray_mode import run_ray

        return run_ray(job.ray, pending, work, job.workers, result, on_images, on_shard)
    from plugins.blip.bulk.local import run_local

    return run_local(pending, work, job.workers, result, on_images, on_shard)

