"""Teacher engines: what turns packed windows into top-k next-token distributions."""

from ddk_cache.engines.base import TeacherEngine, TopKResult
from ddk_cache.engines.registry import ENGINE_NAMES, create_engine

__all__ = ["ENGINE_NAMES", "TeacherEngine", "TopKResult", "create_engine"]
