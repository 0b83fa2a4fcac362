"""`convert bulk` on this machine: a pool of worker processes, one runtime and one shard at a time each.

Each worker writes the shards it finishes itself (atomically, see `result`), so no rows travel
back through a pipe and a worker's death loses only the shard it was on. Workers are spawned, not
forked: the parent runs a progress thread, and a fork of a threaded process is unsafe.
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from plugins.blip.bulk.inputs import Item
from plugins.blip.bulk.result import ResultDir
from plugins.blip.bulk.worker import Worker, WorkOptions

_worker: Worker | None = None
_progress: multiprocessing.Queue | None = None


def _start(options: WorkOptions, progress: multiprocessing.Queue) -> None:
    global _worker, _progress
    _worker, _progress = Worker(options), progress


def _shard(index: int, items: Sequence[Item], result: str) -> int:
    rows = _worker.process(items, on_progress=_progress.put)
    ResultDir(Path(result)).write_shard(index, rows)
    return index


def run_local(
    shards: Sequence[tuple[int, Sequence[Item]]],
    options: WorkOptions,
    workers: int,
    result: ResultDir,
    on_images: Callable[[int], None],
    on_shard: Callable[[int], None],
) -> str | None:
    """Process `shards` (index, items) on `workers` processes; None, or why some were not written."""
    if not shards:
        return None
    context = multiprocessing.get_context("spawn")
    progress = context.Queue()
    stop = threading.Event()

    def report() -> None:
        while not stop.is_set() or not progress.empty():
            try:
                on_images(progress.get(timeout=0.1))
            except queue.Empty:
                continue
            except (EOFError, OSError):
                return

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    died = None
    pool = ProcessPoolExecutor(max_workers=min(workers, len(shards)), mp_context=context, initializer=_start,
                               initargs=(options, progress))
    try:
        futures = [pool.submit(_shard, index, list(items), str(result.path)) for index, items in shards]
        for future in as_completed(futures):
            try:
                on_shard(future.result())
            except BrokenProcessPool as exc:
                died = f"a worker process died ({exc}); the shards it and the others were on are not written"
        pool.shutdown()
    except BaseException:
        # Ctrl-C, SIGTERM, a full disk: stop now. A plain shutdown would run every queued shard first.
        _stop_workers(pool)
        raise
    finally:
        stop.set()
        reporter.join()
    return died


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    terminate = getattr(pool, "terminate_workers", None)  # Python 3.14
    if terminate is not None:
        terminate()
        return
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
