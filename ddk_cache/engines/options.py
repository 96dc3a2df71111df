"""Every engine setting the CLI exposes, in one typed place.

Engines take the fields they understand; `check_applicable` refuses settings given for an
engine that would silently ignore them (a user who passes --tensor-parallel-size to the
HF engine believes they got tensor parallelism).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ddk_cache.errors import EngineError
from ddk_cache.ranges import AT_LEAST_ONE, Range, check_ranges


@dataclass(frozen=True)
class EngineOptions:
    # shared
    dtype: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False
    # Hugging Face engine
    device: str = "auto"
    batch_size: int = 8
    # vLLM engine
    tensor_parallel_size: int = 1
    quantization: str | None = None
    gpu_memory_utilization: float = 0.9
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    windows_per_call: int = 1024
    enforce_eager: bool = False

    def non_default(self) -> dict[str, Any]:
        default = EngineOptions()
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)}


HF_ONLY = ("device", "batch_size")
VLLM_ONLY = (
    "tensor_parallel_size",
    "quantization",
    "gpu_memory_utilization",
    "max_num_batched_tokens",
    "max_model_len",
    "windows_per_call",
    "enforce_eager",
)


# Every numeric engine setting's range (ranges.py)
ENGINE_RANGES = {
    "batch_size": Range(1, 65536), "tensor_parallel_size": Range(1, 1024), "gpu_memory_utilization": Range(0, 1, open_low=True),
    "max_num_batched_tokens": AT_LEAST_ONE, "max_model_len": AT_LEAST_ONE, "windows_per_call": AT_LEAST_ONE,
}


def check_applicable(engine: str, options: EngineOptions) -> None:
    """Refuse an option that `engine` does not use, naming it as its CLI flag, and any setting outside its range."""
    check_ranges({name: getattr(options, name) for name in ENGINE_RANGES}, ENGINE_RANGES)
    foreign = VLLM_ONLY if engine == "hf" else HF_ONLY
    for name in options.non_default():
        if name in foreign:
            flag = "--" + name.replace("_", "-")
            raise EngineError(f"{flag} does not apply to --engine {engine}: drop it, or choose the engine it belongs to")
