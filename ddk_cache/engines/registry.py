"""Engine selection by name, so the CLI and stages never import a heavy engine they do not use."""

from __future__ import annotations

from typing import Any

from ddk_cache.engines.base import TeacherEngine
from ddk_cache.errors import EngineError

ENGINE_NAMES = ("auto", "hf")


def create_engine(name: str, teacher: str, **options: Any) -> TeacherEngine:
    """Instantiate engine `name` ('auto' picks the best available) for the `teacher` model."""
    if name == "auto":
        name = "hf"
    if name == "hf":
        from ddk_cache.engines.hf import HFTeacherEngine

        return HFTeacherEngine(teacher, **options)
    raise EngineError(f"unknown engine {name!r}: choose one of {', '.join(ENGINE_NAMES)}")
