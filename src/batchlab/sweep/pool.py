"""Local worker processes for a sweep, and how a sweep survives one of them dying.

When a worker process dies (the OOM killer's SIGKILL, a segfault), `ProcessPoolExecutor`
breaks: every run in flight fails with `BrokenProcessPool`, without saying whose worker
died. Each of those suspects is then run alone in a process of its own: the guilty run is
recorded as `failed` with how its process died, the others finish, and a fresh pool takes
the rest of the queue. A dead worker so costs one failed run and a few re-done ones, never
the sweep.

`execute` is the sweep's `execute_run` (a top-level function, so it pickles by name).
"""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from batchlab.sweep.spec import RunSpec
from batchlab.sweep.store import RunRecord

Execute = Callable[[Any, RunSpec, Any], RunRecord]  # (task, run, context) -> record


def run_in_pools(
    execute: Execute,
    task: Any,
    queue: list[RunSpec],
    context: Any,
    workers: int,
    initializer: Callable[[int], None],
) -> Iterator[RunRecord]:
    """Run every run of `queue` (consuming it) in pools of `workers` spawned processes,
    yielding records in completion order; a dead worker costs one failed run."""
    while queue:
        suspects = yield from _pool_pass(execute, task, queue, context, workers, initializer)
        for run in suspects:
            yield run_isolated(execute, task, run, context)


def _pool_pass(
    execute: Execute,
    task: Any,
    queue: list[RunSpec],
    context: Any,
    workers: int,
    initializer: Callable[[int], None],
) -> Iterator[RunRecord]:
    """Run from `queue` until it is empty or the pool breaks; return the runs in flight
    when it broke (none if it did not)."""
    # `spawn`: forking a process whose torch thread pools already run can deadlock.
    mp = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=mp, initializer=initializer, initargs=(context.threads,)
    ) as pool:
        # Keep at most `workers` runs in flight: a killed sweep then loses little work,
        # and the order of runs stays close to the spec's order.
        running: dict[Future, RunSpec] = {}
        while queue or running:
            while queue and len(running) < workers:
                try:
                    future = pool.submit(execute, task, queue[0], context)
                except BrokenProcessPool:  # a worker died since the last wait: it held a
                    return list(running.values())  # run in flight; the queue is untouched
                running[future] = queue.pop(0)
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            broken = []
            for future in done:
                run = running.pop(future)
                try:
                    record = future.result()
                except BrokenProcessPool:
                    broken.append(run)
                    continue
                yield record
            if broken:
                return broken + list(running.values())
    return []


def _isolated_main(conn, execute: Execute, task: Any, run: RunSpec, context: Any) -> None:
    conn.send(execute(task, run, context))
    conn.close()


def run_isolated(execute: Execute, task: Any, run: RunSpec, context: Any) -> RunRecord:
    """`execute` in a process of its own; a process that dies gives a failed record."""
    mp = multiprocessing.get_context("spawn")
    receiver, sender = mp.Pipe(duplex=False)
    process = mp.Process(
        target=_isolated_main, args=(sender, execute, task, run, context), daemon=True
    )
    process.start()
    sender.close()  # so that recv sees EOF when the child dies without sending
    try:
        record = receiver.recv()
    except EOFError:
        record = None
    finally:
        receiver.close()
    process.join()
    return record if record is not None else dead_worker_record(run, process.exitcode)


def dead_worker_record(run: RunSpec, exitcode: int | None, worker: str = "") -> RunRecord:
    """The failed record of a run whose worker process died under it."""
    if exitcode is not None and exitcode < 0:
        how = f"killed by signal {signal.Signals(-exitcode).name}"
    else:
        how = f"exit code {exitcode}"
    return RunRecord(
        run_id=run.run_id,
        spec=run,
        status="failed",
        error=(
            f"WorkerDied: the process running this run died ({how}); a SIGKILL usually means "
            "the OS killed it for using too much memory: try fewer `jobs` or a smaller batch"
        ),
        worker=worker,
    )
