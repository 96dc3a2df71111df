"""One writer per place in a store: a lease object that a second writer finds and does not override.

Why: two writers on one store destroyed it in the audit. Launched a second apart on one `s3://` URL,
both created the store (each wiping what the other had begun) and both crashed, leaving it "writing"
with groups missing; launched later, both "succeeded" and the second re-scored shards the first had
written. Resume after a kill must stay immediate, so a plain lock file is not enough either: the
lease says who holds it, and a dead holder's lease is taken over.

The lease of place `name` (`node-0` for a single writer, `node-r` for node r of several; `pack` and
`teacher-dump` share the names, so they exclude each other too) is the object `<store>.ddk-lease/<name>.json`,
beside the store rather than in it, because creating a store replaces everything inside it. It holds
an owner id, host, pid and an expiry that a background thread renews every `ttl / 4` seconds.

- Acquiring creates it only if absent, whole: a hard link of a written file on a local or shared POSIX disk; a
  conditional PUT (`If-None-Match: *`) on S3, which AWS and moto honour. On a server that ignores the
  condition, the lease is read back after `SETTLE_S` and whoever does not find its own id there
  gives up, so writers started more than that apart still exclude each other; closer starts are
  not guaranteed to (say so to teams using such servers).
- A lease found held is taken over when it has expired, or when its holder ran on this host and its
  process is gone (a SIGKILLed run re-run at once resumes at once). Otherwise the command stops with
  one line naming the holder: nothing in the store has been touched.
- Released (deleted) when the command ends; a killed holder leaves it to expire.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from ddk_cache.errors import StoreError, first_line

LEASE_SUFFIX = ".ddk-lease"
TTL_S = 120.0
SETTLE_S = 1.0


@dataclass(frozen=True)
class LeaseRecord:
    owner: str
    host: str
    pid: int
    started: str | None  # the process's start time (Linux /proc), so a reused pid is not taken for the holder
    command: str
    expires: float

    def alive(self) -> bool:
        if self.expires < time.time():
            return False
        if self.host != socket.gethostname():
            return True  # another host: trust the expiry
        if self.started is not None:
            return _process_start(self.pid) == self.started
        return _pid_exists(self.pid)


class WriterLease:
    """`with WriterLease(url, "node-0", "teacher-dump"):` holds the place for the duration of the block."""

    def __init__(self, url: str, name: str, command: str, storage_options: dict | None = None, ttl: float = TTL_S) -> None:
        self.url, self.name, self.command, self.ttl = url, name, command, ttl
        self.owner = uuid.uuid4().hex
        self._backend = _backend(f"{url.rstrip('/')}{LEASE_SUFFIX}/{name}.json", storage_options)
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def __enter__(self) -> "WriterLease":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def record(self) -> LeaseRecord:
        return LeaseRecord(self.owner, socket.gethostname(), os.getpid(), _process_start(os.getpid()), self.command,
                           time.time() + self.ttl)

    def acquire(self) -> None:
        for _ in range(3):  # create; or take over a dead holder's lease and create again
            try:
                created = self._backend.create(_encode(self.record()))
            except OSError as exc:  # a missing bucket, no write permission, an unreachable endpoint
                raise StoreError(f"cannot write to {self.url}: {first_line(exc)}: check the URL, credentials and --storage-options") from None
            if created:
                if self._backend.conditional or self._confirmed():
                    self._start_renewing()
                    return
            else:
                held = self._backend.read()
                if held is not None and held.alive():
                    raise StoreError(
                        f"{self.url} is being written by another process ({held.command} on {held.host}, pid {held.pid}, "
                        f"place {self.name}): wait for it to finish, or if it is gone, run again after "
                        f"{time.strftime('%H:%M:%S', time.localtime(held.expires))} when its lease expires"
                    )
                self._backend.delete()  # expired, or its process is gone: take its place
        raise StoreError(f"{self.url}: could not take the writer lease {self.name} (others kept taking it): try again")

    def _confirmed(self) -> bool:
        """Servers without conditional writes: the last writer wins, so look again once the dust settles."""
        time.sleep(SETTLE_S)
        held = self._backend.read()
        return held is not None and held.owner == self.owner

    def _start_renewing(self) -> None:
        def renew() -> None:
            while not self._stop.wait(self.ttl / 4):
                held = self._backend.read()
                if held is None or held.owner != self.owner:
                    return  # taken over (this process stalled past its expiry): do not write over the new holder
                self._backend.overwrite(_encode(self.record()))

        self._renewer = threading.Thread(target=renew, name="ddk-lease", daemon=True)
        self._renewer.start()

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)
            held = self._backend.read()
            if held is not None and held.owner == self.owner:
                self._backend.delete()
            self._renewer = None


def _encode(record: LeaseRecord) -> bytes:
    return json.dumps(asdict(record)).encode()


def _decode(data: bytes) -> LeaseRecord | None:
    try:
        return LeaseRecord(**json.loads(data))
    except (ValueError, TypeError):
        return None  # a half-written lease (its writer was killed mid-write): treat as expired


def _process_start(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[19]  # field 22, starttime in clock ticks since boot
    except (OSError, IndexError):
        return None


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _LocalBackend:
    """A local or shared POSIX path: the lease appears whole, at once, or not at all (a hard link is atomic).

    Why not `O_CREAT | O_EXCL` and then a write: between the two, a racing writer reads an empty lease, takes it
    for a half-written one of a killed holder and takes it over, and both write the store (seen in CI: two dumps
    started together, one crashed creating a group the other had just made). The record is written to a file
    of this process's own first, then linked to the lease's name, which fails if that name exists.
    """

    conditional = True

    def __init__(self, path: str) -> None:
        self.path = path

    def create(self, data: bytes) -> bool:
        mine = f"{self.path}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        for _ in range(3):  # a releasing holder may remove the folder between our makedirs and our link
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            try:
                with open(mine, "wb") as handle:
                    handle.write(data)
                os.link(mine, self.path)
                return True
            except FileExistsError:
                return False
            except FileNotFoundError:
                continue
            finally:
                try:
                    os.unlink(mine)
                except FileNotFoundError:
                    pass
        raise FileNotFoundError(f"the lease folder {os.path.dirname(self.path)} kept disappearing")

    def overwrite(self, data: bytes) -> None:
        temp = f"{self.path}.{os.getpid()}.tmp"
        with open(temp, "wb") as handle:
            handle.write(data)
        os.replace(temp, self.path)

    def read(self) -> LeaseRecord | None:
        try:
            with open(self.path, "rb") as handle:
                return _decode(handle.read())
        except FileNotFoundError:
            return None

    def delete(self) -> None:
        try:
            os.unlink(self.path)
            os.rmdir(os.path.dirname(self.path))  # only once no place is leased
        except OSError:
            pass


class _FsspecBackend:
    """An object store through fsspec: a conditional PUT where the filesystem has one (s3fs: If-None-Match)."""

    def __init__(self, url: str, storage_options: dict | None) -> None:
        import fsspec  # optional: fsspec (the s3 extra); local stores never need it

        self.fs, self.path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.conditional = type(self.fs).__name__ == "S3FileSystem"

    def create(self, data: bytes) -> bool:
        try:
            self.fs.pipe_file(self.path, data, mode="create")
        except FileExistsError:
            return False
        return True

    def overwrite(self, data: bytes) -> None:
        self.fs.pipe_file(self.path, data)

    def read(self) -> LeaseRecord | None:
        try:
            return _decode(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None

    def delete(self) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            pass


def _backend(url: str, storage_options: dict | None) -> Any:
    if "://" in url and not url.startswith("file://"):
        return _FsspecBackend(url, storage_options)
    return _LocalBackend(url.removeprefix("file://"))
