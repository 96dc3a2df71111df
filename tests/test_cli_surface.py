"""What users and other trainers call does not move when the code does: every CLI flag, the public API, the script.

The snapshots in `tests/data/` were taken before the restructuring of issue 23 (sub-packages, one module per
command, typed configs). A difference here is a changed interface: make it deliberately, and regenerate.
Regenerated since: `DomainInfo` gained `sha256` (issue 24, its seal), an optional field; `KDTrainer` and `to_iterable_dataset` added, `eval --random-init` and `distill --lora-*`, `--report-to wandb` (issue 25).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
from cli_surface import surface

import ddk_cache

DATA = Path(__file__).parent / "data"


def test_every_command_and_flag_is_as_before():
    before = json.loads((DATA / "cli_surface.json").read_text())
    now = surface()
    assert sorted(now) == sorted(before), "commands added or removed"
    for command in before:
        assert now[command] == before[command], f"`ddk-cache {command}`'s parameters changed"


def _own_members(cls: type) -> set[str]:
    """What ddk_cache's classes define (not what a base from another library brings: transformers' Trainer's move with it)."""
    return {name for klass in cls.__mro__ if klass.__module__.startswith("ddk_cache") for name in vars(klass)}


def _api() -> dict:
    api = {}
    for name in ddk_cache.__all__:
        obj = getattr(ddk_cache, name)
        try:
            signature = str(inspect.signature(obj))
        except (TypeError, ValueError):
            signature = None
        members = sorted(m for m in _own_members(obj) if not m.startswith("_")) if inspect.isclass(obj) else None
        api[name] = {"signature": signature, "members": members}
    return api


def test_public_api_names_and_signatures_are_as_before():
    before = json.loads((DATA / "public_api.json").read_text())
    now = _api()
    assert sorted(now) == sorted(before)
    for name in before:
        assert now[name]["signature"] == before[name]["signature"], f"ddk_cache.{name}'s signature changed"
        missing = set(before[name]["members"] or ()) - set(now[name]["members"] or ())
        assert not missing, f"ddk_cache.{name} lost {sorted(missing)}"


@pytest.mark.parametrize("name", ddk_cache.__all__)
def test_public_names_resolve_without_the_flat_modules(name):
    """Each public name imports from where `ddk_cache` says it lives, and that is inside a sub-package."""
    obj = getattr(ddk_cache, name)
    assert obj.__module__.startswith("ddk_cache.")
