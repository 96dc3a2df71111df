"""Where the CLI's words go: tables and results on stdout, status and errors on stderr, `--json` files.

One pair of consoles for every command, so `--json -` can keep stdout for the JSON alone and a status
line never lands in a pipe.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console

from ddk_cache.devices import is_main_process
from ddk_cache.errors import DDKCacheError

console = Console()
error_console = Console(stderr=True)


def say(show: bool, message: str) -> None:
    """A status line before a long silent start (data and model loading), for a person at a terminal."""
    if show and sys.stderr.isatty() and is_main_process():
        error_console.print(message, markup=False, highlight=False, soft_wrap=True, style="dim")


def json_alone(target: Path | None) -> bool:
    """`--json -`: the JSON goes to stdout alone, so the table is not printed."""
    return target is not None and str(target) == "-"


def write_json(target: Path, data) -> None:
    """`--json FILE` writes the file; `--json -` prints to stdout (alone, for scripts)."""
    text = json.dumps(data, indent=2, default=str) + "\n"
    if json_alone(target):
        sys.stdout.write(text)
        return
    try:
        target.write_text(text)
    except OSError as exc:
        raise DDKCacheError(f"cannot write --json {target}: {exc.strerror}: choose a writable path") from None


def check_json_target(target: Path | None) -> None:
    """Refuse a `--json` path in a missing folder before a long job, not after it."""
    if target is not None and not json_alone(target) and not target.parent.is_dir():
        raise DDKCacheError(f"--json {target}: folder {target.parent} does not exist: create it or choose another path")
