"""Engine selection by name, so the CLI and stages never import a heavy engine they do not use."""

from __future__ import annotations

from ddk_cache.engines.base import TeacherEngine
from ddk_cache.engines.options import EngineOptions, check_applicable
from ddk_cache.errors import EngineError
from ddk_cache.choices import EngineName, values

ENGINE_NAMES = values(EngineName)


def resolve_engine_name(name: str) -> str:
    """'auto' means vLLM when it is installed and a GPU is present, the HF engine otherwise."""
    if name not in ENGINE_NAMES:
        raise EngineError(f"unknown engine {name!r}: choose one of {', '.join(ENGINE_NAMES)}")
    if name != "auto":
        return name
    from ddk_cache.engines.vllm_engine import vllm_version

    import torch

    return "vllm" if vllm_version() is not None and torch.cuda.is_available() else "hf"


def create_engine(name: str, teacher: str, options: EngineOptions | None = None, *, max_k: int = 64) -> TeacherEngine:
    """Instantiate engine `name` for the `teacher` model, able to return top-k distributions up to `max_k`."""
    options = options or EngineOptions()
    name = resolve_engine_name(name)
    check_applicable(name, options)
    if name == "hf":
        from ddk_cache.engines.hf import HFTeacherEngine

        return HFTeacherEngine(
            teacher,
            device=options.device,
            dtype=options.dtype,
            batch_size=options.batch_size,
            revision=options.revision,
            trust_remote_code=options.trust_remote_code,
        )
    from ddk_cache.engines.vllm_engine import VLLMTeacherEngine

    return VLLMTeacherEngine(teacher, max_k, options)
