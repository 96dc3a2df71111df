"""The CLI's one error boundary: what the user can fix becomes one line and exit 2; bugs keep their traceback.

Why here and not at every call site: the audit found 26 user errors that printed a Python traceback
(a source with non-UTF-8 bytes, truncated weights, a full disk, an unreachable S3 endpoint, a `gs://`
URL without its filesystem package ...). They come from many libraries through many paths, but they
fall into a few classes, each with one fix to suggest. Anything outside these classes is a defect of
ddk-cache: its traceback is kept, with a line asking to report it. `--debug` (or DDK_CACHE_DEBUG=1)
shows the traceback of expected failures too.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import typer

from ddk_cache.cli.output import error_console
from ddk_cache.devices import is_main_process
from ddk_cache.errors import USER_ERROR_EXIT_CODE, DDKCacheError, first_line


def debug_requested() -> bool:
    return os.environ.get("DDK_CACHE_DEBUG", "") not in ("", "0")


def expected_failure(exc: BaseException) -> str | None:
    """The one line for a failure the user can fix, or None for a defect (which keeps its traceback)."""
    if isinstance(exc, DDKCacheError):
        return str(exc)
    name = type(exc).__name__
    if isinstance(exc, UnicodeDecodeError):
        return (f"a source is not {exc.encoding} text ({exc.reason} at byte {exc.start}): convert it to UTF-8, or give its encoding "
                "in the manifest source's load_kwargs (e.g. {encoding: latin-1})")
    if isinstance(exc, ImportError):
        return f"a package this needs is not installed ({first_line(exc)}): install it (object stores: pip install \"ddk-cache[s3]\", or gcsfs, adlfs)"
    if name == "NoCredentialsError" or "Unable to locate credentials" in str(exc):
        return ("no credentials for the object store: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
                "or pass them in --storage-options")
    if name in ("EndpointConnectionError", "ClientConnectorError", "ConnectTimeoutError", "ServerDisconnectedError") or \
            isinstance(exc, (ConnectionError, TimeoutError)):
        return f"cannot reach the storage endpoint ({first_line(exc)}): check the URL, the endpoint in --storage-options and the network"
    if name == "SafetensorError" or name == "HeaderTooLarge":
        return f"cannot read model weights ({first_line(exc)}): the file is truncated or corrupt; copy or download it again"
    if name == "OutOfMemoryError":
        return f"out of GPU memory ({first_line(exc)}): lower --batch-size (or use more GPUs / --parallel fsdp)"
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)):
        wanted = str(exc).split("you tried to allocate ", 1)[-1].split(" bytes", 1)[0]
        size = f" ({int(wanted) / 2**20:,.0f} MiB more)" if wanted.isdigit() else ""
        return (f"out of host memory{size}: lower --batch-size (keep the step with --global-batch-size), and keep --loss-impl fused "
                "(the default), which never builds [tokens x vocabulary] logits")
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        if exc.errno == errno.ENOSPC:
            return f"no space left on the device{where}: free space or write elsewhere; finished work is kept, run the same command again"
        if exc.errno == errno.EROFS:
            return f"read-only file system{where}: write elsewhere"
        if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM):
            return f"permission denied{where}: check the path's permissions (or the object store's access rights)"
        if isinstance(exc, FileNotFoundError):
            return f"no such file or directory{where}: check the path"
        if isinstance(exc, (IsADirectoryError, NotADirectoryError, FileExistsError)):
            return f"{first_line(exc)}: check the path"
        if exc.errno in (errno.EIO, errno.EDQUOT, errno.ENAMETOOLONG):
            return f"{first_line(exc)}{where}: check the disk and the path"
    return None


REPORT = "error: this is a defect in ddk-cache, not in your input: please report it with the traceback above"


@contextmanager
def user_errors() -> Iterator[None]:
    """The boundary itself, around each command's work: a failure the user can fix becomes one line on stderr and exit 2.

    Under torchrun every rank raises the same error; rank 0 alone prints it, every rank exits 2.
    A defect keeps its traceback, followed by a line asking to report it.
    """
    try:
        yield
    except typer.Exit:
        raise
    except Exception as exc:
        message = expected_failure(exc)
        if message is None or debug_requested():
            if message is None and is_main_process():
                traceback.print_exc()
                error_console.print(REPORT, markup=False, highlight=False, soft_wrap=True)
                raise typer.Exit(1) from None
            raise
        if is_main_process():
            error_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
        record_for_torchrun(message)
        sys.unraisablehook = _silent_after_the_line
        # the same leftovers, when a pending read's Future is collected: asyncio logs "Future exception was never retrieved"
        logging.getLogger("asyncio").setLevel(logging.CRITICAL + 1)
        raise typer.Exit(USER_ERROR_EXIT_CODE) from None


def _silent_after_the_line(unraisable) -> None:
    """After a user error's line, nothing: a storage failure leaves zarr's other pending reads (an `asyncio.gather`
    of fsspec coroutines) to be collected at shutdown, and Python reported each as "Exception ignored in
    <coroutine FsspecStore.get>" with its traceback, about 100 lines below the one that says what to do. The
    process is ending with the error already named; `--debug` keeps Python's own report."""
    if debug_requested():
        sys.__unraisablehook__(unraisable)


def record_for_torchrun(message: str) -> None:
    """Under torchrun, the rank's one line in its elastic error file, so torchrun's failure summary names the problem.

    torchrun sets TORCHELASTIC_ERROR_FILE for each rank and prints that file's message in the summary it ends a
    failed job with; without one the summary says only "exitcode: 2 ... To enable traceback see ...", far below
    the line that said what to fix. The file is written in torchelastic's documented layout (what
    `errors.record` writes), with the line itself where a traceback would go: a user error has none to show.
    """
    target = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not target:
        return
    line = f"error: {message}"
    data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    try:
        with open(target, "w") as handle:
            json.dump(data, handle)
    except OSError:
        pass  # the summary falls back to the exit code; the line was printed already
