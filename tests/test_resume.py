"""A dump killed with SIGKILL at any point resumes without redoing finished shards, and the
final store equals an uninterrupted run's, array for array and value for value."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import run_dump
from typer.testing import CliRunner

from ddk_cache.cli.main import app
from ddk_cache.errors import StoreError
from ddk_cache.store.format import SPLITS
from ddk_cache.store.reader import CacheReader

# Runs the real CLI in a child process that SIGKILLs itself at a chosen point of the write path.
KILLING_RUNNER = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from ddk_cache.store import writer as cache_writer
    from ddk_cache.store.format import IDS, TOKENS

    kill_at, mode = int(os.environ["KILL_AT_SHARD"]), os.environ["KILL_MODE"]
    write_shard, finish, written = cache_writer.CacheWriter.write_shard, cache_writer.CacheWriter.finish, [0]

    def killing_write_shard(self, domain, split, shard, windows, result):
        if written[0] == kill_at:
            if mode == "mid-shard":  # garbage in some arrays of this shard, then die before its marker
                group = self.split_group(domain, split)
                region = self.layout.shard_slice(shard, group[TOKENS].shape[0])
                group[TOKENS][region] = np.zeros_like(windows)
                group[IDS][region] = np.full_like(result.ids, 7)
            if mode != "before-finish":
                os.kill(os.getpid(), signal.SIGKILL)
        write_shard(self, domain, split, shard, windows, result)
        written[0] += 1

    def killing_finish(self):
        if mode == "before-finish":
            os.kill(os.getpid(), signal.SIGKILL)
        finish(self)

    create_domain, created = cache_writer._create_domain, [0]

    def killing_create_domain(root, domain, layout):
        if mode == "mid-create" and created[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        create_domain(root, domain, layout)
        created[0] += 1

    cache_writer._create_domain = killing_create_domain
    cache_writer.CacheWriter.write_shard = killing_write_shard
    cache_writer.CacheWriter.finish = killing_finish
    if __name__ == "__main__":  # engines that spawn processes (vLLM) import this file again in the child
        from ddk_cache.cli.main import main
        sys.argv = ["ddk-cache", *sys.argv[1:]]
        main()
    """
)


def assert_same_store(actual: Path, expected: Path, volatile: tuple[str, ...] = ("created_at", "completed_at")) -> None:
    a, b = zarr.open_group(str(actual), mode="r"), zarr.open_group(str(expected), mode="r")
    header_a, header_b = dict(a.attrs["ddk_cache"]), dict(b.attrs["ddk_cache"])
    for key in volatile:
        header_a.pop(key, None), header_b.pop(key, None)
    for header in (header_a, header_b):  # how many processes wrote it is provenance, not content
        if "engine" in header:
            header["engine"] = {key: value for key, value in header["engine"].items() if key != "data_parallel"}
    assert header_a == header_b
    for domain in header_b["domains"]:
        assert a[domain].attrs.asdict() == b[domain].attrs.asdict()
        for split in SPLITS:
            for name in a[f"{domain}/{split}"].array_keys():
                np.testing.assert_array_equal(a[f"{domain}/{split}/{name}"][:], b[f"{domain}/{split}/{name}"][:])


@pytest.mark.parametrize(
    ("mode", "kill_at"),
    [("before-write", 0), ("before-write", 9), ("mid-shard", 13), ("before-finish", 0), ("mid-create", 1)],
)
def test_killed_dump_resumes_to_the_uninterrupted_store(tmp_path, tiny_teacher, reference_store, mode, kill_at):
    manifest, reference = reference_store
    runner = tmp_path / "killing_runner.py"
    runner.write_text(KILLING_RUNNER)
    out = tmp_path / "killed.zarr"

    killed = run_dump(tiny_teacher, manifest, out, runner, KILL_AT_SHARD=str(kill_at), KILL_MODE=mode)
    assert killed.returncode == -9, killed.stderr
    with pytest.raises(StoreError, match="incomplete"):
        CacheReader(str(out))  # never mistaken for a finished store

    inspected = CliRunner().invoke(app, ["inspect", str(out)], env={"COLUMNS": "200"})
    assert inspected.exit_code == 0 and f"({'creating' if mode == 'mid-create' else 'writing'})" in inspected.output

    resumed = run_dump(tiny_teacher, manifest, out)
    assert resumed.returncode == 0, resumed.stderr
    if mode == "before-finish":
        assert "shards written 0" in resumed.stdout
    else:
        assert f"already done {kill_at if mode != 'mid-create' else 0}" in resumed.stdout
    assert not list(out.rglob("*.partial"))
    assert_same_store(out, reference)


def test_data_parallel_workers_write_the_uninterrupted_store(tmp_path, tiny_teacher, reference_store):
    manifest, reference = reference_store
    out = tmp_path / "dp.zarr"
    result = run_dump(tiny_teacher, manifest, out, extra=("--data-parallel", "2"))
    assert result.returncode == 0, result.stderr
    assert_same_store(out, reference)
    assert CacheReader(str(out)).header.engine.data_parallel == 2


def test_data_parallel_resumes_a_killed_single_process_dump(tmp_path, tiny_teacher, reference_store):
    manifest, reference = reference_store
    runner = tmp_path / "killing_runner.py"
    runner.write_text(KILLING_RUNNER)
    out = tmp_path / "killed.zarr"
    killed = run_dump(tiny_teacher, manifest, out, runner, KILL_AT_SHARD="9", KILL_MODE="before-write")
    assert killed.returncode == -9, killed.stderr
    resumed = run_dump(tiny_teacher, manifest, out, extra=("--data-parallel", "2"))
    assert resumed.returncode == 0, resumed.stderr
    assert "already done 9" in resumed.stdout
    assert_same_store(out, reference)


def test_data_parallel_workers_on_a_cpu_node_own_disjoint_cores(monkeypatch):
    """Each worker gets its own cores, and vLLM's CPU build is told to bind its threads to them (left to itself, every
    engine binds to every core of the node, twice as many threads as cores)."""
    import os

    from ddk_cache.engines.vllm_cpu import BIND_VARIABLE
    from ddk_cache.stages.data_parallel import assign_cores, worker_environments

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6})
    assert assign_cores(3, 1) == [[[0, 1, 2]], [[3, 4]], [[5, 6]]]
    assert assign_cores(2, 2) == [[[0, 1], [2, 3]], [[4, 5], [6]]]
    monkeypatch.delenv(BIND_VARIABLE, raising=False)
    assert worker_environments(2, 2)[1] == {"OMP_NUM_THREADS": "1", BIND_VARIABLE: "4,5|6"}
    monkeypatch.setenv(BIND_VARIABLE, "nobind")  # the user's own binding is theirs
    assert worker_environments(2, 1)[0] == {"OMP_NUM_THREADS": "4"}


def test_more_data_parallel_workers_than_cores_are_refused_before_anything_is_written(tmp_path, tiny_teacher, reference_store):
    import os

    manifest, _ = reference_store
    out = tmp_path / "dp.zarr"
    cores = len(os.sched_getaffinity(0))
    result = run_dump(tiny_teacher, manifest, out, extra=("--data-parallel", str(cores + 1)))
    assert result.returncode == 2, result.stderr
    assert f"--data-parallel {cores + 1} x --tensor-parallel-size 1 needs {cores + 1} CPU cores" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()
