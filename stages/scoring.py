"""Scoring shards and writing them: the work one engine process does, whether it is the only one or one of N.

Teacher-dump (one process) and its data-parallel workers (`data_parallel.py`, N processes) run exactly this
code; it lives apart from both so neither imports the other. `ScoringPlan` is what a worker process needs of
the run's settings (it is pickled into each spawned worker), `ShardJob` the unit of work, of resume and of
data parallelism.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from tqdm.auto import tqdm

from ddk_cache.data.packing import PackedDomain
from ddk_cache.engines import EngineOptions, TeacherEngine
from ddk_cache.engines.base import ProgressCallback, TopKResult
from ddk_cache.ranges import Range, check_ranges
from ddk_cache.stages.nodes import NodePlace
from ddk_cache.store.capture import Capture, encode_targets
from ddk_cache.store.format import SPLITS, TOKENS, StoreLayout
from ddk_cache.store.writer import CacheWriter


@dataclass(frozen=True)
class ProcessSettings:
    """How one node's scoring is spread: `data_parallel` engine processes on disjoint shards, and the shards
    encoded and written at once while the teacher scores (None: half the cores, shared between the processes)."""

    data_parallel: int = 1
    writer_threads: int | None = None

    RANGES: ClassVar[dict[str, Range]] = {"data_parallel": Range(1, 1024), "writer_threads": Range(1, 64)}

    def __post_init__(self) -> None:
        check_ranges({"data_parallel": self.data_parallel, "writer_threads": self.writer_threads}, self.RANGES)

    def threads_per_process(self) -> int:
        return self.writer_threads or max(1, default_writer_threads() // self.data_parallel)


@dataclass(frozen=True)
class ScoringPlan:
    """The settings an engine process scores with: which teacher, how it runs, what it keeps, where it writes."""

    teacher: str
    engine_options: EngineOptions
    capture: Capture
    out: str
    storage_options: dict[str, Any] | None
    processes: ProcessSettings = ProcessSettings()
    progress: bool = True


@dataclass
class ShardJob:
    """One shard of one split to score and write: the unit of work, of resume and of data parallelism.

    `windows` is None when the store already holds them (a packed store): they are read when the
    shard is scored, by whichever process scores it, so no process holds more than a few shards.
    """

    domain: str
    split: str
    shard: int
    region: slice
    windows: np.ndarray | None = None

    @property
    def n_windows(self) -> int:
        return self.region.stop - self.region.start

    def load(self, writer: CacheWriter) -> np.ndarray:
        return self.windows if self.windows is not None else writer.split_group(self.domain, self.split)[TOKENS][self.region]


def default_writer_threads() -> int:
    """Half the cores, at most 8: one writer keeps up with a CPU teacher, a GPU teacher needs several."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def pending_jobs(writer: CacheWriter, domains: list[PackedDomain], layout: StoreLayout, node: NodePlace) -> tuple[list[ShardJob], int]:
    """This node's shards not yet marked done, in store order, and how many of its shards are done already.

    Shards are numbered over the whole store (domain, split, shard); node r of N owns the numbers
    i with i % N == r (`nodes.py`), whatever is pending when it looks.
    """
    jobs, number, skipped = [], 0, 0
    for domain in domains:
        for split in SPLITS:
            packed = getattr(domain, split)
            pending = set(writer.pending_shards(domain.name, split))
            for shard in range(layout.n_shards(packed.n_windows)):
                if node.owns(number + shard):
                    if shard in pending:
                        region = layout.shard_slice(shard, packed.n_windows)
                        in_memory = packed.windows[region] if isinstance(packed.windows, np.ndarray) else None
                        jobs.append(ShardJob(domain.name, split, shard, region, in_memory))
                    else:
                        skipped += 1
            number += layout.n_shards(packed.n_windows)
    return jobs, skipped


def progress_bar(jobs: list[ShardJob], layout: StoreLayout, show: bool) -> tqdm:
    total = sum(job.n_windows for job in jobs) * layout.seq_len
    return tqdm(total=total, unit="tok", unit_scale=True, desc="teacher-dump", disable=not show)


def score_jobs(
    engine: TeacherEngine, writer: CacheWriter, jobs: Iterable[ShardJob], capture: Capture, progress: ProgressCallback, writer_threads: int = 1
) -> None:
    """Score shards and write them, overlapping the encoding and writing of earlier groups with scoring the next.

    Consecutive shards are grouped until the engine's `preferred_windows` is reached, so an
    engine that batches internally (vLLM) always has a deep queue; results are split back
    into whole shards for the writer. In sampled and headtail mode each shard is scored alone, with draws
    seeded by the shard's identity, so a resumed or data-parallel dump draws the same samples.

    Why several writer threads: on a GPU the teacher outruns one CPU thread's encoding and zstd
    compression (benchmarks/RESULTS.md); shards are separate objects, so `writer_threads` groups
    are encoded and written at once. At most that many groups wait in memory, and the oldest is
    waited for first, so an error surfaces within a few groups.
    """
    with ThreadPoolExecutor(max_workers=writer_threads, thread_name_prefix="ddk-writer") as pool:
        in_flight: deque[Future] = deque()
        for group in group_jobs(jobs, 1 if capture.drawn else engine.preferred_windows):
            windows = np.concatenate([job.load(writer) for job in group]) if len(group) > 1 else group[0].load(writer)
            if capture.drawn:
                seed = capture.shard_seed(group[0].domain, group[0].split, group[0].shard)
                result = engine.score(windows, capture.engine_k, progress=progress, draws=capture.draws, seed=seed,
                                      tail=capture.mode == "headtail")
            else:
                result = engine.score(windows, capture.engine_k, progress=progress)
            if len(in_flight) >= writer_threads:
                in_flight.popleft().result()  # bounded memory; errors surface promptly
            in_flight.append(pool.submit(_write_group, writer, group, windows, result, capture))
        while in_flight:
            in_flight.popleft().result()


def group_jobs(jobs: Iterable[ShardJob], min_windows: int) -> Iterator[list[ShardJob]]:
    group: list[ShardJob] = []
    windows = 0
    for job in jobs:
        group.append(job)
        windows += job.n_windows
        if windows >= min_windows:
            yield group
            group, windows = [], 0
    if group:
        yield group


def _write_group(writer: CacheWriter, group: list[ShardJob], windows: np.ndarray, result: TopKResult, capture: Capture) -> None:
    """Encode (sort by id, rest, quantize) and write: on the writer thread, so the teacher's next group is already running."""
    targets = encode_targets(result, capture)
    offset = 0
    for job in group:
        rows = slice(offset, offset + job.n_windows)
        offset = rows.stop
        writer.write_shard(job.domain, job.split, job.shard, windows[rows], targets.windows(rows))
