"""Many nodes, one store: processes launched as nodes (`--num-nodes/--node-rank`, or RANK/WORLD_SIZE, or
SLURM_PROCID/SLURM_NTASKS) score disjoint shards of one store; the last to finish completes it. Every
result must equal the single-process dump, array for array and value for value."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import dump_command, run_dump
from test_resume import KILLING_RUNNER, assert_same_store

from ddk_cache.errors import StoreError
from ddk_cache.store.reader import CacheReader

SURVIVE = {"KILL_AT_SHARD": "-1", "KILL_MODE": "none"}  # the killing runner's settings for a node that lives


def start_nodes(tiny_teacher: Path, manifest: Path, out: Path | str, count: int, ranks: list[int] | None = None,
                runner: Path | None = None, extra: tuple[str, ...] = (), env_by_rank: dict[int, dict[str, str]] | None = None,
                cwd: Path | None = None):
    """Start nodes `ranks` (default: all) of `count` as concurrent processes; returns the finished processes by rank.

    They run away from the checkout (`cwd`, default the store's folder), so the installed package is what runs.
    """
    processes = {}
    for rank in ranks if ranks is not None else range(count):
        command = dump_command(tiny_teacher, manifest, out, runner, ("--num-nodes", str(count), "--node-rank", str(rank), *extra))
        env = {**os.environ, "OMP_NUM_THREADS": "1", **((env_by_rank or {}).get(rank, {}))}
        processes[rank] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                           cwd=cwd or Path(out).parent)
    results = {}
    for rank, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        results[rank] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return results


def test_three_nodes_write_the_single_process_store(tmp_path, tiny_teacher, reference_store):
    manifest, reference = reference_store
    out = tmp_path / "three.zarr"
    results = start_nodes(tiny_teacher, manifest, out, 3)
    assert all(r.returncode == 0 for r in results.values()), [r.stderr[-2000:] for r in results.values()]
    written = [int(r.stdout.split("shards written ")[1].split(",")[0]) for r in results.values()]
    assert sum(written) == sum(len(CacheReader(str(reference)).array(d, s, "shard_done")[:]) for d in CacheReader(str(reference)).domains
                               for s in ("train", "valid"))  # every shard scored exactly once
    assert min(written) > 0  # every node took a share
    assert sum("completes the store" not in r.stdout for r in results.values()) >= 1  # someone completed it
    assert_same_store(out, reference)


def test_a_killed_node_rerun_alone_fills_only_its_shards(tmp_path, tiny_teacher, reference_store):
    manifest, reference = reference_store
    runner = tmp_path / "killing_runner.py"
    runner.write_text(KILLING_RUNNER)
    out = tmp_path / "killed.zarr"
    results = start_nodes(tiny_teacher, manifest, out, 3, runner=runner,
                          env_by_rank={0: SURVIVE, 1: {"KILL_AT_SHARD": "1", "KILL_MODE": "before-write"}, 2: SURVIVE})
    assert results[1].returncode == -9 and results[0].returncode == 0 and results[2].returncode == 0
    with pytest.raises(StoreError, match="incomplete"):
        CacheReader(str(out))  # node 1's shards are missing: never taken for a finished store

    again = start_nodes(tiny_teacher, manifest, out, 3, ranks=[1])[1]
    assert again.returncode == 0, again.stderr
    assert "already done 1" in again.stdout  # its one finished shard is kept; nodes 0 and 2's are not its business
    assert_same_store(out, reference)


def test_two_nodes_resumed_as_three_and_launcher_variables(tmp_path, tiny_teacher, reference_store):
    manifest, reference = reference_store
    runner = tmp_path / "killing_runner.py"
    runner.write_text(KILLING_RUNNER)
    out = tmp_path / "two-then-three.zarr"
    results = start_nodes(tiny_teacher, manifest, out, 2, runner=runner,
                          env_by_rank={0: {"KILL_AT_SHARD": "2", "KILL_MODE": "before-write"}, 1: SURVIVE})
    assert results[0].returncode == -9 and results[1].returncode == 0

    # the same command as three nodes, told their rank by torchrun's variables (node 0) and SLURM's (nodes 1, 2)
    processes = []
    for rank, env in ((0, {"RANK": "0", "WORLD_SIZE": "3"}), (1, {"SLURM_PROCID": "1", "SLURM_NTASKS": "3"}), (2, {"SLURM_PROCID": "2", "SLURM_NTASKS": "3"})):
        processes.append(subprocess.Popen(dump_command(tiny_teacher, manifest, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          env={**os.environ, "OMP_NUM_THREADS": "1", **env}, cwd=tmp_path))
    outputs = [p.communicate(timeout=300) for p in processes]
    assert all(p.returncode == 0 for p in processes), [e[-2000:] for _, e in outputs]
    assert all(f"node {rank} of 3" in stdout for rank, (stdout, _) in enumerate(outputs))
    assert_same_store(out, reference)


def test_nodes_refuse_what_would_race_in_one_line(tmp_path, tiny_teacher, reference_store):
    manifest, _ = reference_store
    lonely = run_dump(tiny_teacher, manifest, tmp_path / "never.zarr", extra=("--num-nodes", "2", "--node-rank", "1", "--create-timeout", "2"))
    assert lonely.returncode == 2 and "was not created within 2 s: node 0 creates it" in lonely.stderr
    assert len(lonely.stderr.strip().splitlines()) == 1 and not (tmp_path / "never.zarr").exists()
    for extra, message in [(("--num-nodes", "2", "--node-rank", "0", "--overwrite"), "--overwrite with several nodes"),
                           (("--num-nodes", "2", "--node-rank", "2"), "--node-rank 2 is outside 0..1"),
                           (("--num-nodes", "2",), "give --num-nodes and --node-rank together")]:
        result = run_dump(tiny_teacher, manifest, tmp_path / "bad.zarr", extra=extra)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_several_writer_threads_write_the_single_writer_store(tmp_path, tiny_teacher, reference_store):
    """Shards encoded and written concurrently (a GPU teacher outruns one writer) land exactly as one writer's."""
    manifest, reference = reference_store
    out = tmp_path / "threads.zarr"
    result = run_dump(tiny_teacher, manifest, out, extra=("--writer-threads", "3"))
    assert result.returncode == 0, result.stderr
    assert_same_store(out, reference)
    refused = run_dump(tiny_teacher, manifest, tmp_path / "refused.zarr", extra=("--writer-threads", "0"))
    assert refused.returncode == 2 and refused.stderr.strip() == "error: --writer-threads must be in [1, 64], got 0"
    assert not (tmp_path / "refused.zarr").exists()
