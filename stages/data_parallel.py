"""Data parallelism for stage one: one engine process per GPU (or GPU group), one store.

Zarr's rule is that a shard is the unit of safe writing, and every array of a split has
fixed shapes from the start, so processes that write *different shards* never touch the
same object; each shard's `shard_done` marker is its own object too. The parent therefore:

1. starts N workers (spawned, never forked: CUDA and zarr's I/O thread do not survive a
   fork), each pinned to its GPUs through CUDA_VISIBLE_DEVICES (on a CPU node: to its own
   slice of the cores), which load the engine and report what it is (`EngineInfo`);
2. creates or resumes the store with that identity (only the parent writes metadata);
3. puts every pending shard on one job queue, so a faster worker simply takes more;
4. collects progress, and finishes the store once every worker has exited cleanly.

A worker that fails stops the run with its error; finished shards stay marked, so running
the same command again resumes as after any other interruption.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.queues import Queue
from typing import Any

from ddk_cache.engines import EngineInfo, create_engine
from ddk_cache.engines.vllm_cpu import worker_cores_environment
from ddk_cache.errors import DDKCacheError, first_line
from ddk_cache.stages.scoring import ScoringPlan, ShardJob, progress_bar, score_jobs
from ddk_cache.store.format import StoreLayout
from ddk_cache.store.writer import CacheWriter

POLL_SECONDS = 1.0
SHUTDOWN_SECONDS = 30.0  # per worker and step of `_stop`


def run_data_parallel(
    plan: ScoringPlan,
    engine_name: str,
    layout: StoreLayout,
    open_writer: Callable[[EngineInfo], CacheWriter],
    plan_jobs: Callable[[CacheWriter], list[ShardJob]],
) -> tuple[CacheWriter, float]:
    """Score the store with `plan.processes.data_parallel` engine processes; the store opened by `open_writer` once they
    are up, the shards `plan_jobs` names. Returns the writer and the seconds spent scoring."""
    n = plan.processes.data_parallel
    environments = worker_environments(n, plan.engine_options.tensor_parallel_size)
    context = mp.get_context("spawn")
    jobs_queue, events = context.Queue(), context.Queue()
    workers = []
    for rank, env in enumerate(environments):
        args = (rank, engine_name, plan, layout, jobs_queue, events)
        with _environment(env):  # a spawned child copies the parent's environment when it starts
            # not daemonic: a worker's engine may start processes of its own (vLLM does); `finally` below ends them
            process = context.Process(target=_worker_main, args=args, name=f"ddk-dump-{rank}")
            process.start()
        workers.append(process)
    finished = False
    try:
        infos = _wait_ready(workers, events)
        settings = {repr(info.value_settings) for info in infos}
        if len(settings) > 1:
            raise DDKCacheError(f"data-parallel workers run differently configured engines: {sorted(settings)}")
        writer = open_writer(infos[0])
        jobs = plan_jobs(writer)
        start = time.perf_counter()
        for job in jobs:
            jobs_queue.put(job)
        for _ in workers:
            jobs_queue.put(None)
        with progress_bar(jobs, layout, plan.progress) as bar:
            _collect(workers, events, bar.update)
        finished = True
        return writer, time.perf_counter() - start
    finally:
        _stop(workers, finished)


def _stop(workers: list, finished: bool) -> None:
    """End the workers: once they are done, each a while to close its engine first; then SIGTERM; then SIGKILL
    for it and its engine.

    Why not SIGTERM at once: a worker that has reported "done" is closing its engine. Interrupted there, a vLLM
    worker was left waiting forever for its half-stopped engine process, and this process, at exit, for the worker
    (a complete store, and a dump that never returned, seen in CI). Each worker leads its own process group
    (`_worker_main`), so the last resort takes its engine's processes with it.
    """
    if finished:  # after an error they wait on the queue or score on: end them at once
        for process in workers:
            process.join(timeout=SHUTDOWN_SECONDS)
    for process in workers:
        if process.is_alive():
            process.terminate()
            process.join(timeout=SHUTDOWN_SECONDS)
        if process.is_alive():
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                process.kill()
            process.join(timeout=SHUTDOWN_SECONDS)


def worker_environments(n: int, tensor_parallel: int) -> list[dict[str, str]]:
    """What each of `n` workers' environment pins it to: disjoint groups of `tensor_parallel` GPUs
    (CUDA_VISIBLE_DEVICES), or on a CPU node disjoint groups of the cores this process may run on."""
    import torch  # heavy: torch only when this runs

    if not torch.cuda.is_available():
        return [worker_cores_environment(groups) for groups in assign_cores(n, tensor_parallel)]
    return [{"CUDA_VISIBLE_DEVICES": devices} for devices in assign_devices(n, tensor_parallel)]


def assign_cores(n: int, tensor_parallel: int) -> list[list[list[int]]]:
    """Per worker, its `tensor_parallel` groups of cores: the allowed cores cut into n x tensor_parallel contiguous
    slices, the first ones one core larger where they do not divide evenly."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    slices = n * tensor_parallel
    if slices > len(cores):
        raise DDKCacheError(
            f"--data-parallel {n} x --tensor-parallel-size {tensor_parallel} needs {slices} CPU cores on a node without "
            f"GPUs, this one allows {len(cores)}: lower --data-parallel"
        )
    size, extra = divmod(len(cores), slices)
    bounds = [r * size + min(r, extra) for r in range(slices + 1)]
    groups = [cores[bounds[r] : bounds[r + 1]] for r in range(slices)]
    return [groups[r * tensor_parallel : (r + 1) * tensor_parallel] for r in range(n)]


def assign_devices(n: int, tensor_parallel: int) -> list[str]:
    """CUDA_VISIBLE_DEVICES for each worker: disjoint groups of `tensor_parallel` GPUs."""
    import torch  # heavy: torch only when this runs

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = [g.strip() for g in visible.split(",") if g.strip()] if visible else [str(i) for i in range(torch.cuda.device_count())]
    if n * tensor_parallel > len(gpus):
        raise DDKCacheError(
            f"--data-parallel {n} x --tensor-parallel-size {tensor_parallel} needs {n * tensor_parallel} GPUs, "
            f"this node shows {len(gpus)}: lower one of them"
        )
    return [",".join(gpus[r * tensor_parallel : (r + 1) * tensor_parallel]) for r in range(n)]


def _worker_main(rank: int, engine_name: str, plan: ScoringPlan, layout: StoreLayout, jobs_queue: Queue, events: Queue) -> None:
    """Load the engine, report it, then score and write shards from the queue until a None."""
    # the parent ends a worker with SIGTERM when another fails: exit through `finally`, so the engine is closed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    os.setpgid(0, 0)  # a process group of its own, with its engine's processes: what the parent kills as a last resort
    engine = None
    try:
        engine = create_engine(engine_name, plan.teacher, plan.engine_options, max_k=plan.capture.engine_k)
        events.put(("ready", rank, EngineInfo.of(engine)))
        first = jobs_queue.get()
        if first is None:
            events.put(("done", rank, None))
            return
        writer = CacheWriter.open_existing(plan.out, layout, plan.storage_options)

        def jobs():
            job = first
            while job is not None:
                yield job
                job = jobs_queue.get()

        score_jobs(engine, writer, jobs(), plan.capture, lambda tokens: events.put(("tokens", rank, tokens)), plan.processes.threads_per_process())
        events.put(("done", rank, None))
    except DDKCacheError as exc:
        events.put(("error", rank, str(exc)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which owns the exit code
        events.put(("error", rank, f"{type(exc).__name__}: {first_line(exc)}"))
    finally:
        if engine is not None:
            engine.close()


def _wait_ready(workers: list, events: Queue) -> list[EngineInfo]:
    infos: dict[int, EngineInfo] = {}
    while len(infos) < len(workers):
        kind, rank, payload = _next_event(workers, events)
        if kind == "ready":
            infos[rank] = payload
    return [infos[rank] for rank in range(len(workers))]


def _collect(workers: list, events: Queue, progress: Callable[[int], None]) -> None:
    done: set[int] = set()
    while len(done) < len(workers):
        kind, rank, payload = _next_event(workers, events)
        if kind == "tokens":
            progress(payload)
        elif kind == "done":
            done.add(rank)


def _next_event(workers: list, events: Queue) -> tuple[str, int, Any]:
    """The next worker event; a reported error or a silently dead worker becomes a DDKCacheError."""
    while True:
        try:
            kind, rank, payload = events.get(timeout=POLL_SECONDS)
        except queue.Empty:
            for rank, process in enumerate(workers):
                if process.exitcode not in (None, 0):
                    raise DDKCacheError(
                        f"data-parallel worker {rank} died (exit code {process.exitcode}) without reporting an error: "
                        "rerun the same command to resume"
                    ) from None
            continue
        if kind == "error":
            raise DDKCacheError(f"data-parallel worker {rank}: {payload}")
        return kind, rank, payload


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Temporarily set environment variables (for a child process about to be spawned)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
