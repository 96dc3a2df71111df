"""Teacher engines: what turns packed windows into top-k next-token distributions."""

from ddk_cache.engines.base import EngineInfo, TeacherEngine, TopKResult
from ddk_cache.engines.options import EngineOptions
from ddk_cache.engines.registry import ENGINE_NAMES, create_engine, resolve_engine_name

__all__ = ["ENGINE_NAMES", "EngineInfo", "EngineOptions", "TeacherEngine", "TopKResult", "create_engine", "resolve_engine_name"]
