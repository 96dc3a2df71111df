"""Can a model or tokenizer name be loaded at all? Said once, in one line, before transformers is asked.

Why: transformers treats anything that is not an existing folder as a hub id. A misspelled local
path, or a hub id on a machine that cannot reach the hub, then costs 30-75 s of retries and a
dozen warnings before the error (huggingface_hub backs off five times per file). Training and
inference nodes are often offline; the answer should take no longer than one connection attempt.

The rule: a name that can only be a path (absolute, starting with `.` or `~`, more than one `/`, or
whose first part is an existing folder) must exist. A name that may be a hub id is fine if it is
a local folder, or in the hub cache while the hub is off (`HF_HUB_OFFLINE=1`), or if the hub
answers one request. Otherwise it is refused with what to do.
"""

from __future__ import annotations

import functools
import os
import urllib.error
import urllib.request
from pathlib import Path

from ddk_cache.errors import DDKCacheError

REACH_TIMEOUT_S = 5.0  # one attempt: a reachable hub answers in well under a second
_CACHE_FILES = ("config.json", "tokenizer_config.json", "tokenizer.json")
_TRUE = {"1", "true", "yes", "on"}


def require_local_if_path(name_or_path: str, what: str) -> None:
    """A name that can only be a local path, but is not there: say so at once (hub ids are `name` or `org/name`)."""
    path = Path(name_or_path).expanduser()
    first = Path(name_or_path.split("/", 1)[0]).expanduser()
    looks_local = (name_or_path.startswith((".", "~", "/")) or name_or_path.count("/") > 1
                   or ("/" in name_or_path and first.is_dir()))
    if looks_local and not path.exists():
        raise DDKCacheError(f"{what} {name_or_path!r} does not exist: check the path (a hub id looks like org/name)")


def hub_offline() -> bool:
    """Whether huggingface_hub is told not to use the network (the variables it and transformers read)."""
    return any(os.environ.get(name, "").lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def in_hub_cache(repo_id: str, revision: str | None = None) -> bool:
    """Whether the local hub cache holds a config or tokenizer of `repo_id` (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return any(isinstance(try_to_load_from_cache(repo_id, name, revision=revision), str) for name in _CACHE_FILES)
    except ValueError:  # not a valid repo id (huggingface_hub's HFValidationError is one)
        return False


@functools.cache
def hub_unreachable_reason() -> str | None:
    """Why the hub cannot be reached (None: it answered), from one request with a short timeout, once per process."""
    from huggingface_hub import constants

    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=REACH_TIMEOUT_S)
    except urllib.error.HTTPError:
        return None  # it answered, if not with 200
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"{constants.ENDPOINT} is not reachable ({reason})"
    return None


def require_loadable(name_or_path: str, what: str, revision: str | None = None) -> None:
    """Refuse, in one line, a name that neither is a local folder nor can come from the hub (module docstring)."""
    require_local_if_path(name_or_path, what)
    if Path(name_or_path).expanduser().exists():
        return
    if hub_offline():
        if not in_hub_cache(name_or_path, revision):
            raise DDKCacheError(f"{what} {name_or_path!r} is not a local folder and not in the hub cache (HF_HUB_OFFLINE is set): "
                                "give the path of a local folder, or download it where the hub is reachable")
        return
    reason = hub_unreachable_reason()
    if reason is not None:
        cached = in_hub_cache(name_or_path, revision)
        remedy = "set HF_HUB_OFFLINE=1 to use the copy in the hub cache" if cached else "give the path of a local folder"
        raise DDKCacheError(f"{what} {name_or_path!r} is not a local folder, and {reason}: {remedy}")
