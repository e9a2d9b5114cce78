"""Running a sweep: one run in `execute_run`, many through a backend, results into the store.

`execute_run` is a plain top-level function of picklable arguments, so the same code runs
in-process, in a local worker process (`LocalBackend`, `jobs=N`) or as a Ray task
(`RayBackend`, `backend="ray"`). Workers only compute; the parent appends each returned
record to the store, so a run is recorded once or not at all.

Backends implement one small protocol, `SweepBackend.run(runs, context) -> iterator of
RunRecord` in completion order, and share one contract test.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from batchlab.callbacks import RunState, TrainCallback, evaluate
from batchlab.data import Batcher
from batchlab.errors import ConfigError, SweepError
from batchlab.history import History
from batchlab.measure.run_stats import DistanceFromInit, GradNormTracker
from batchlab.measure.sharpness import epsilon_sharpness, hessian_top_eigenvalue
from batchlab.results import JsonResult
from batchlab.sweep.extend import all_runs
from batchlab.sweep.pool import dead_worker_record, run_in_pools
from batchlab.sweep.spec import RunSpec, SweepSpec, make_optimizer
from batchlab.sweep.store import RunRecord, StoreContents, SweepStore
from batchlab.task import Task
from batchlab.tasks import load_task
from batchlab.train import train

BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class RunContext:
    """What every run of a sweep shares. Picklable: the task travels as its name or path."""

    task_ref: str
    device: str = "auto"
    target: str | None = None  # runs stop at it when set
    sharpness_examples: int = 1024
    threads: int | None = None  # torch intra-op threads in the process running the run
    sharpness: tuple[str, ...] = ("hessian",)  # which measures: "hessian", "epsilon"

    @classmethod
    def from_spec(cls, spec: SweepSpec, threads: int | None = None) -> RunContext:
        return cls(
            spec.task_ref,
            spec.device,
            spec.target,
            spec.sharpness_examples,
            threads,
            tuple(spec.sharpness),
        )


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_worker(jobs: int, cores: int | None = None) -> int:
    """Torch threads for each of `jobs` workers, so that workers x threads <= cores."""
    return max(1, (cores or cpu_count()) // max(1, jobs))


def default_jobs(device: str, num_runs: int) -> int:
    """One run per CPU core on the CPU; one at a time on a GPU (runs would share it)."""
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return 1
    return max(1, min(cpu_count(), num_runs))


class _FinalMeasurements(TrainCallback):
    """At the end of a run, while the model still exists: full train-set loss and sharpness."""

    def __init__(self, task: Task, context: RunContext, seed: int) -> None:
        self.task, self.context, self.seed = task, context, seed
        self.train_loss: float | None = None
        self.train_metrics: dict[str, float] = {}
        self.sharpness: dict[str, dict] = {}
        self.seconds: dict[str, float] = {}

    def on_end(self, state: RunState) -> None:
        if state.last_loss is None or not math.isfinite(state.last_loss):
            return  # diverged: the weights are not finite, nothing to measure
        t0 = time.perf_counter()
        batcher = Batcher(self.task.train_data, state.device, self.task.collate_fn)
        self.train_loss, self.train_metrics = evaluate(
            state.model, batcher, self.task, device=state.device
        )
        t1 = time.perf_counter()
        self.seconds["train_eval"] = t1 - t0
        n = self.context.sharpness_examples
        chosen = {"hessian": hessian_top_eigenvalue, "epsilon": epsilon_sharpness}
        for measure in (chosen[name] for name in self.context.sharpness):
            try:
                result = measure(
                    state.model,
                    self.task.train_data,
                    self.task.loss,
                    num_examples=n,
                    seed=0,  # the same examples for every run of the sweep
                    collate_fn=self.task.collate_fn,
                )
                self.sharpness[result.method] = result.to_dict()
            except Exception as exc:  # e.g. a layer without double backward
                self.sharpness[measure.__name__] = {"error": f"{type(exc).__name__}: {exc}"}
        self.seconds["sharpness"] = time.perf_counter() - t1


def _task_for(run: RunSpec, task: Task) -> Task:
    if run.optimizer == "task":
        return task
    name = run.optimizer
    return dataclasses.replace(task, optimizer=lambda params, lr: make_optimizer(name, params, lr))


def execute_run(task: str | Task, run: RunSpec, context: RunContext) -> RunRecord:
    """Train one run of a sweep and measure it. Never raises for a failing run: the error
    is returned in the record (status "failed"), so one bad run cannot stop a sweep."""
    t0 = time.perf_counter()
    if context.threads is not None:
        torch.set_num_threads(context.threads)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    try:
        base = load_task(task)
        final = _FinalMeasurements(base, context, run.seed)
        callbacks = [DistanceFromInit(), GradNormTracker(), final]
        if run.source == "adaptive":
            from batchlab.adaptive import train_adaptive

            history = train_adaptive(
                _task_for(run, base),
                lr=run.lr,
                max_steps=run.max_steps,
                device=context.device,
                seed=run.seed,
                target=context.target,
                callbacks=callbacks,
            )
        else:
            history = _train_fixed(base, run, context, callbacks)
    except Exception as exc:
        return RunRecord(
            run_id=run.run_id,
            spec=run,
            status="failed",
            error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}",
            seconds={"total": time.perf_counter() - t0},
            worker=worker,
        )
    seconds = {"train": history.train_seconds, "eval": history.eval_seconds, **final.seconds}
    seconds["total"] = time.perf_counter() - t0
    return RunRecord(
        run_id=run.run_id,
        spec=run,
        status="diverged" if history.diverged else "ok",
        history=history,
        train_loss=final.train_loss,
        train_metrics=final.train_metrics,
        sharpness=final.sharpness,
        seconds=seconds,
        worker=worker,
    )


def _train_fixed(base: Task, run: RunSpec, context: RunContext, callbacks: list) -> History:
    return train(
        _task_for(run, base),
        run.micro_batch_size,
        run.lr,  # the peak LR, already scaled by the sweep's rule
        max_steps=run.max_steps,
        lr_rule="none",
        warmup_steps=run.warmup_steps,
        accumulation_steps=run.accumulation_steps,
        device=context.device,
        seed=run.seed,
        eval_every=run.eval_every,
        target=context.target,
        callbacks=callbacks,
    )


# -- backends -----------------------------------------------------------------------------


class SweepBackend(Protocol):
    """Runs `execute_run` over runs; yields records as they finish (any order)."""

    name: str

    def run(
        self, task: str | Task, runs: Sequence[RunSpec], context: RunContext
    ) -> Iterator[RunRecord]: ...


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


class LocalBackend:
    """`jobs` worker processes on this machine (in-process when `jobs == 1`).

    Workers are started with `spawn`: forking a process whose torch thread pools are
    already running can deadlock. Each worker uses `cores // jobs` torch threads; a run
    in this process keeps the caller's `torch.get_num_threads()`, capped at that.
    (Oversubscribed cores are very slow: OpenMP threads spin while they wait.)
    """

    name = "local"

    def __init__(self, jobs: int = 1, cores: int | None = None) -> None:
        if not isinstance(jobs, int) or jobs < 1:
            raise ConfigError(f"`jobs`: expected a positive integer, got {jobs!r}; pass e.g. 2")
        self.jobs = jobs
        self.threads = threads_per_worker(jobs, cores)

    def run(
        self, task: str | Task, runs: Sequence[RunSpec], context: RunContext
    ) -> Iterator[RunRecord]:
        if self.jobs == 1 or len(runs) <= 1:
            # In-process: keep the caller's thread setting, only capping it at cores // jobs.
            previous = torch.get_num_threads()
            inline = dataclasses.replace(context, threads=min(previous, self.threads))
            try:
                for run in runs:
                    yield execute_run(task, run, inline)
            finally:
                torch.set_num_threads(previous)
            return
        context = dataclasses.replace(context, threads=self.threads)
        if not isinstance(task, str):
            _check_picklable(task)
        workers = min(self.jobs, len(runs))
        yield from run_in_pools(execute_run, task, list(runs), context, workers, _init_worker)


def _check_picklable(task: Task) -> None:
    import pickle

    try:
        pickle.dumps(task)
    except Exception as exc:
        raise ConfigError(
            f"task {task.name!r} cannot be sent to worker processes ({type(exc).__name__}: "
            f"{exc}); pass it as a built-in name or path/to/file.py:function, or use jobs=1"
        ) from None


class RayBackend:
    """Each run is a Ray task, so a sweep can use a whole Ray cluster.

    Connects to the cluster in `RAY_ADDRESS` (or `address`), else starts a local Ray
    instance and shuts it down afterwards. Each task asks for `threads` CPUs and sets
    torch to that many threads, so tasks x threads <= cores on every node. A task given as
    `path/to/file.py:function` must exist at the same absolute path on every node.
    """

    name = "ray"

    def __init__(
        self, address: str | None = None, threads: int = 1, num_cpus: int | None = None
    ) -> None:
        self.address = address or os.environ.get("RAY_ADDRESS")
        self.threads = threads
        self.num_cpus = num_cpus

    def run(
        self, task: str | Task, runs: Sequence[RunSpec], context: RunContext
    ) -> Iterator[RunRecord]:
        ray = import_ray()
        started = False
        if not ray.is_initialized():
            kwargs = (
                {"address": self.address}
                if self.address
                else {"num_cpus": self.num_cpus or cpu_count()}
            )
            import logging

            ray.init(
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.ERROR,
                configure_logging=True,
                **kwargs,
            )
            started = True
        try:
            context = dataclasses.replace(context, threads=self.threads)
            remote = ray.remote(num_cpus=self.threads, max_retries=0)(execute_run)
            by_ref = {remote.remote(task, run, context): run for run in runs}
            pending = list(by_ref)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    yield _ray_record(ray, ref, by_ref[ref])
        finally:
            if started:
                ray.shutdown()


def _ray_record(ray, ref, run: RunSpec) -> RunRecord:
    """The record of a finished Ray task; a worker that died gives a failed record."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:  # e.g. WorkerCrashedError, OutOfMemoryError
        record = dead_worker_record(run, None)
        reason = f"{type(exc).__name__}: {str(exc)[:300]}"
        return dataclasses.replace(record, error=f"{record.error} ({reason})")


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "`backend` 'ray' needs Ray, which is not installed; run `pip install 'batchlab[ray]'` "
            "or use `backend` 'local'"
        ) from None
    return ray


def make_backend(backend: str = "local", jobs: int = 1) -> SweepBackend:
    if backend == "local":
        return LocalBackend(jobs)
    if backend == "ray":
        import_ray()
        return RayBackend(threads=threads_per_worker(jobs) if jobs > 1 else 1)
    raise ConfigError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")


# -- the sweep ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepRun(JsonResult):
    """What one `run_sweep` call did."""

    out_dir: str
    resumed: bool
    runs_total: int
    runs_skipped: int  # already in the store
    runs_done: int  # run by this call
    diverged: int
    failed: int
    wall_seconds: float
    store_warnings: tuple[str, ...]
    runs_retried: int = 0  # failed runs of an earlier call, run again


ProgressFn = Callable[[RunRecord, int, int], None]


def run_sweep(
    spec: SweepSpec,
    out_dir: str | Path,
    *,
    jobs: int = 1,
    backend: str | SweepBackend = "local",
    task: Task | None = None,
    on_start: Callable[[int, int, StoreContents], None] | None = None,
    on_record: ProgressFn | None = None,
    retry_failed: bool = True,
) -> SweepRun:
    """Run every run of `spec` not yet in `out_dir`'s store, appending each as it finishes.

    Re-running with the same spec resumes: finished runs are skipped, a run that was
    killed mid-way is redone, and a `failed` run is retried (unless `retry_failed=False`).
    A different spec in the same directory is refused, and so is a second sweep while
    one runs there (`SweepStore.lock`). A full disk stops the sweep with a `SweepError`;
    the runs already stored are kept. With `lr_rule="tuned"` the runs come in waves: the
    spec's, then the LR-grid extensions their results call for (`batchlab.sweep.extend`),
    derived again from the store on a resume.

    Args:
        jobs: local worker processes (`backend="local"`), each with cores // jobs threads.
        backend: "local", "ray", or any object with the `SweepBackend` protocol.
        task: the Task object, when `spec.task_ref` cannot be loaded by name (a Task built
            in Python); it must then be picklable for `jobs > 1`.
        on_start: called with (runs to do, runs total, store contents) before training.
        on_record: called with (record, runs finished, runs to do) after each is stored.
        retry_failed: run again the runs an earlier call recorded as `failed`.
    """
    t0 = time.perf_counter()
    runner = make_backend(backend, jobs) if isinstance(backend, str) else backend
    store = SweepStore(out_dir)
    with store.lock():
        resumed = store.prepare(spec)
        contents = store.read()
        store.cut_truncated_tail()
        records = list(contents.records)
        known = all_runs(spec, records)
        todo, retried = runs_to_do(known, records, retry_failed)
        skipped = len(known) - len(todo)
        if on_start is not None:
            on_start(len(todo), len(known), contents)
        counts = {"diverged": 0, "failed": 0}
        finished, to_run = 0, len(todo)
        while todo:  # a wave: the runs known now; a tuned grid's extensions come after it
            results = runner.run(
                task if task is not None else spec.task_ref, todo, RunContext.from_spec(spec)
            )
            before = finished
            for record in _stored(store, results, skipped + finished):
                records.append(record)
                finished += 1
                if record.status in counts:
                    counts[record.status] += 1
                if on_record is not None:
                    on_record(record, finished, to_run)
            # Later waves run only what no record covers: a run that failed again now is
            # not retried in a loop.
            todo, _ = runs_to_do(all_runs(spec, records), records, retry_failed=False)
            if finished == before:  # a backend that returned nothing would loop forever
                break
            to_run += len(todo)
    return SweepRun(
        out_dir=str(out_dir),
        resumed=resumed,
        runs_total=skipped + to_run,
        runs_skipped=skipped,
        runs_done=finished,
        diverged=counts["diverged"],
        failed=counts["failed"],
        wall_seconds=time.perf_counter() - t0,
        store_warnings=contents.warnings,
        runs_retried=retried,
    )


def runs_to_do(
    runs: Sequence[RunSpec], records: Sequence[RunRecord], retry_failed: bool = True
) -> tuple[list[RunSpec], int]:
    """The `runs` no record covers yet (failed ones too, with `retry_failed`), and how
    many of them are retries of failed runs."""
    status = {r.run_id: r.status for r in records}
    retry = {i for i, s in status.items() if s == "failed"} if retry_failed else set()
    todo = [r for r in runs if r.run_id not in status or r.run_id in retry]
    return todo, sum(r.run_id in retry for r in todo)


def _stored(store: SweepStore, records: Iterator[RunRecord], kept: int) -> Iterator[RunRecord]:
    """Append each record to the store as it arrives, then pass it on.

    A failed write (a full disk) closes the backend, so its workers stop, and becomes one
    `SweepError` that says what is kept; the store holds no half line (`SweepStore.append`).
    """
    try:
        for record in records:
            try:
                store.append(record)
            except OSError as exc:
                raise SweepError(
                    f"cannot write to {store.results_path} ({exc.strerror}); the runs stored "
                    f"so far ({kept}) are kept: free space, then run the same command again "
                    "to resume",
                    param="out_dir",
                ) from None
            kept += 1
            yield record
    finally:
        close = getattr(records, "close", None)
        if close is not None:
            close()
