"""One writer per place in a store: a second writer is refused in one line before it touches anything,
a dead writer's place is taken over at once, and racing writers leave one correct store (local disk and S3)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import dump_command
from test_resume import assert_same_store

from ddk_cache.errors import StoreError
from ddk_cache.store.lease import LEASE_SUFFIX, WriterLease

# The real CLI, with every shard write slowed down: the first writer surely still holds the store when the other looks.
SLOW_RUNNER = textwrap.dedent(
    """
    import sys, time
    from ddk_cache.store import writer as cache_writer

    write_shard = cache_writer.CacheWriter.write_shard

    def slow_write_shard(self, *args):
        time.sleep(0.3)
        write_shard(self, *args)

    cache_writer.CacheWriter.write_shard = slow_write_shard
    from ddk_cache.cli.main import main
    sys.argv = ["ddk-cache", *sys.argv[1:]]
    main()
    """
)


def race(tiny_teacher: Path, manifest: Path, out: str, runner: Path, cwd: Path, extra: tuple[str, ...] = ()) -> list[subprocess.CompletedProcess]:
    """Two identical dumps of one store, started together."""
    command = dump_command(tiny_teacher, manifest, out, runner, extra)
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    return [subprocess.CompletedProcess(p.args, p.returncode, *output) for p, output in zip(processes, outputs)]


def assert_one_refused(results: list[subprocess.CompletedProcess]) -> None:
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 2], [r.stderr[-1500:] for r in results]
    refused = next(r for r in results if r.returncode == 2)
    assert refused.stderr.count("\n") == 1 and "is being written by another process (teacher-dump on" in refused.stderr


def test_racing_writers_on_local_disk_leave_one_correct_store(tmp_path, tiny_teacher, reference_store):
    manifest, reference = reference_store
    runner = tmp_path / "slow_runner.py"
    runner.write_text(SLOW_RUNNER)
    out = tmp_path / "raced.zarr"
    assert_one_refused(race(tiny_teacher, manifest, str(out), runner, tmp_path))
    assert_same_store(out, reference)
    assert not Path(f"{out}{LEASE_SUFFIX}").exists()  # released


def test_a_held_place_refuses_pack_and_dump_before_anything_is_written(tmp_path, tiny_teacher, reference_store):
    manifest, _ = reference_store
    out = tmp_path / "held.zarr"
    with WriterLease(str(out), "node-0", "pack"):
        result = subprocess.run(dump_command(tiny_teacher, manifest, out), capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.count("\n") == 1
        assert f"is being written by another process (pack on {socket.gethostname()}, pid {os.getpid()}, place node-0)" in result.stderr
        assert not out.exists()


def test_a_dead_or_expired_holder_is_taken_over(tmp_path):
    out = str(tmp_path / "store.zarr")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lease = Path(f"{out}{LEASE_SUFFIX}") / "node-0.json"
    lease.parent.mkdir()
    lease.write_text(json.dumps({"owner": "x", "host": socket.gethostname(), "pid": gone.pid, "started": "1", "command": "teacher-dump",
                                 "expires": time.time() + 600}))
    with WriterLease(out, "node-0", "teacher-dump") as taken:  # its process is gone: taken at once
        assert json.loads(lease.read_text())["owner"] == taken.owner
    lease.parent.mkdir()
    lease.write_text(json.dumps({"owner": "y", "host": "another-host", "pid": 1, "started": None, "command": "teacher-dump",
                                 "expires": time.time() - 1}))
    with WriterLease(out, "node-0", "teacher-dump"):  # another host, but expired
        pass
    lease.parent.mkdir()
    lease.write_text(json.dumps({"owner": "z", "host": "another-host", "pid": 1, "started": None, "command": "pack",
                                 "expires": time.time() + 600}))
    with pytest.raises(StoreError, match="being written by another process \\(pack on another-host"):
        WriterLease(out, "node-0", "teacher-dump").acquire()


def test_the_lease_is_renewed_while_held(tmp_path):
    out = str(tmp_path / "store.zarr")
    lease_file = Path(f"{out}{LEASE_SUFFIX}") / "node-0.json"
    with WriterLease(out, "node-0", "teacher-dump", ttl=0.8):
        first = json.loads(lease_file.read_text())["expires"]
        time.sleep(0.6)
        assert json.loads(lease_file.read_text())["expires"] > first
    assert not lease_file.exists()


def test_a_lease_being_written_is_never_taken_for_a_half_written_one(tmp_path, monkeypatch):
    """Two writers racing for one place, every write of the lease slowed down: exactly one gets it. Before the lease
    appeared whole (created empty, then written), the second read it empty, took it for a killed holder's and took it
    over: both wrote the store (a CI run's racing-writers test crashed on a group the other had just created)."""
    import builtins
    import threading

    from ddk_cache.store import lease as lease_module

    class SlowFile:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            time.sleep(0.3)
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    real_open, real_fdopen = builtins.open, os.fdopen
    monkeypatch.setattr(lease_module, "open", lambda *a, **k: SlowFile(real_open(*a, **k)), raising=False)
    monkeypatch.setattr(lease_module.os, "fdopen", lambda *a, **k: SlowFile(real_fdopen(*a, **k)))
    store, start, outcomes, held = str(tmp_path / "raced.zarr"), threading.Barrier(2), [], []

    def writer() -> None:
        lease = WriterLease(store, "node-0", "teacher-dump")
        start.wait()
        try:
            lease.acquire()
            held.append(lease)
            outcomes.append("acquired")
        except StoreError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=writer) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for lease in held:
        lease.release()
    assert sorted(o == "acquired" for o in outcomes) == [False, True], outcomes
    assert "is being written by another process" in next(o for o in outcomes if o != "acquired")
