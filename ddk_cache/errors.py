"""User-facing errors.

Everything a user can cause (a bad manifest, a missing file, a store made by another
teacher) raises a `DDKCacheError` whose message is one line naming the problem and
the fix. The CLI prints it without a traceback and exits with `USER_ERROR_EXIT_CODE`.
"""


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
