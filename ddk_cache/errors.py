"""User-facing errors.

Everything a user can cause (a bad manifest, a missing file, a store made by another
teacher) raises a `DDKCacheError` whose message is one line naming the problem and
the fix. The CLI prints it without a traceback and exits with `USER_ERROR_EXIT_CODE`.
"""

from pathlib import Path

USER_ERROR_EXIT_CODE = 2


class DDKCacheError(Exception):
    """A problem with the user's input that they can fix; the message says how."""


class SettingError(DDKCacheError, ValueError):
    """A setting (a flag, a config field) outside its documented range; a ValueError for library callers too."""


class ManifestError(DDKCacheError):
    """The data manifest is invalid."""


class StoreError(DDKCacheError):
    """A cache store is missing, incomplete, or incompatible with the request."""


class EngineError(DDKCacheError):
    """The teacher engine cannot be created or run with the given settings."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (libraries raise multi-line ones), or its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def require_local_if_path(name_or_path: str, what: str) -> None:
    """A name that can only be a local path, but is not there: say so at once.

    Why: transformers treats anything that is not an existing folder as a hub id, so a misspelled local
    path used to retry the hub for 30-45 s with a dozen warnings before failing. Hub ids are `name` or
    `org/name`; a name that is absolute, starts with `.` or `~`, has more than one `/`, or whose first
    part is an existing local folder, is a path.
    """
    path = Path(name_or_path).expanduser()
    first = Path(name_or_path.split("/", 1)[0]).expanduser()
    looks_local = (name_or_path.startswith((".", "~", "/")) or name_or_path.count("/") > 1
                   or ("/" in name_or_path and first.is_dir()))
    if looks_local and not path.exists():
        raise DDKCacheError(f"{what} {name_or_path!r} does not exist: check the path (a hub id looks like org/name)")
