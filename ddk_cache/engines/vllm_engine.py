"""The inference-node engine: vLLM, for big teachers (tensor parallel, quantized, fast).

Each window becomes one request whose prompt is the window's first `seq_len` tokens
(`TokensPrompt`, no tokenizer round trip) and which generates exactly one token, forced
to the window's last token; `prompt_logprobs=k` and `logprobs=k` then give the top-k at
every position, with the actual token's log-prob alongside (see `vllm_outputs` for how
vLLM's outputs map onto our positions). Windows are submitted `windows_per_call` at a
time so the scheduler always has a deep queue.

vLLM is imported here only, so the core runs without it (`pip install "ddk-cache[vllm]"`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ddk_cache.engines.base import ProgressCallback, TeacherEngine, TopKResult
from ddk_cache.engines.options import EngineOptions
from ddk_cache.engines.vllm_cpu import cpu_environment, cpu_preflight, cpu_settings, start_failure
from ddk_cache.engines.vllm_install import find_vllm
from ddk_cache.engines.vllm_outputs import request_outputs_to_result
from ddk_cache.errors import EngineError
from ddk_cache.hub import require_loadable

MIN_VLLM = (0, 10, 2)  # V1 engine: raw log-probs taken before allowed_token_ids masks the logits


def supports_flat_logprobs() -> bool:
    from vllm import SamplingParams  # optional: vLLM (the vllm / vllm-cpu extra)

    return "flat_logprobs" in getattr(SamplingParams, "__struct_fields__", ()) or hasattr(SamplingParams(), "flat_logprobs")


def build_sampling_params(k: int, next_token: int, flat: bool) -> Any:
    """One request's parameters: top-k at every prompt position and at the forced last step."""
    from vllm import SamplingParams  # optional: vLLM (the vllm / vllm-cpu extra)

    extra = {"flat_logprobs": True} if flat else {}
    return SamplingParams(
        prompt_logprobs=k,
        logprobs=k,
        max_tokens=1,
        temperature=0.0,
        allowed_token_ids=[int(next_token)],
        detokenize=False,
        **extra,
    )


SAMPLING_UNSUPPORTED = (
    "the vllm engine cannot capture --mode sampled or headtail: its prompt log-probs are top-k only (the head), and unbiased "
    "draws need the full distribution (or its tail); use --engine hf for these caches"
)


class VLLMTeacherEngine(TeacherEngine):
    name = "vllm"

    def __init__(self, teacher: str, k: int, options: EngineOptions) -> None:
        install = find_vllm()
        if not install.usable:
            raise EngineError(install.refusal("--engine vllm", "--engine hf"))
        version = install.version
        if _version_tuple(version) < MIN_VLLM:
            raise EngineError(f"vLLM {version} is too old: ddk-cache needs >= {'.'.join(map(str, MIN_VLLM))}")
        if options.windows_per_call <= 0:
            raise EngineError(f"--windows-per-call must be positive, got {options.windows_per_call}")
        from vllm import LLM  # optional: vLLM (the vllm / vllm-cpu extra)

        self.k = k
        self.options = options
        self.preferred_windows = options.windows_per_call
        self.version = version
        self.flat = supports_flat_logprobs()
        require_loadable(teacher, "teacher", options.revision)
        self.settings = _llm_settings(teacher, k, options)
        problem = cpu_preflight(teacher, self.settings, options.revision, options.trust_remote_code)
        if problem:
            raise EngineError(problem)
        try:
            with cpu_environment():
                self.llm = LLM(**self.settings)
        except Exception as exc:  # noqa: BLE001 - vLLM raises whatever its engine process reported
            raise EngineError(f"vLLM could not start the teacher {teacher!r} ({start_failure(exc)}): check the vLLM options "
                              "(its log above says more), or use --engine hf") from None
        self._config = self.llm.llm_engine.model_config.hf_config

    @property
    def config(self) -> Any:
        return self._config

    def describe(self) -> dict[str, Any]:
        import torch  # heavy: torch only when this runs

        settings = {key: value for key, value in self.settings.items() if key != "model"}
        return {
            "name": self.name,
            "version": self.version,
            "torch_version": torch.__version__,
            "settings": {**settings, "windows_per_call": self.options.windows_per_call, "flat_logprobs": self.flat},
        }

    def value_settings(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": str(self.llm.llm_engine.model_config.dtype).removeprefix("torch."), "quantization": self.options.quantization}

    def close(self) -> None:
        """Stop vLLM's engine process (and its workers) now, not at interpreter exit."""
        core = getattr(getattr(getattr(self, "llm", None), "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()

    def score(
        self, windows: np.ndarray, k: int, progress: ProgressCallback | None = None, draws: int | None = None, seed: int = 0,
        tail: bool = False,
    ) -> TopKResult:
        from vllm.inputs import TokensPrompt  # optional: vLLM (the vllm / vllm-cpu extra)

        if draws is not None:
            raise EngineError(SAMPLING_UNSUPPORTED)

        if k > self.k:
            raise EngineError(f"k={k} exceeds the max_logprobs={self.k} this engine was started with")
        seq_len, max_model_len = windows.shape[1] - 1, int(self.llm.llm_engine.model_config.max_model_len)
        if seq_len >= max_model_len:  # vLLM needs room for the one generated (forced) token
            raise EngineError(
                f"seq_len {seq_len} leaves no room for the forced token within vLLM's max_model_len {max_model_len}: "
                f"pass --max-model-len {seq_len + 1} (with VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 if that exceeds the model's context; "
                "only positions below seq_len are ever computed)"
            )
        parts = []
        for start in range(0, len(windows), self.options.windows_per_call):
            block = windows[start : start + self.options.windows_per_call]
            prompts = [TokensPrompt(prompt_token_ids=window[:-1].tolist()) for window in block]
            params = [build_sampling_params(k, window[-1], self.flat) for window in block]
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
            parts.append(request_outputs_to_result(outputs, block, k))
            if progress is not None:
                progress(block.shape[0] * (block.shape[1] - 1))
        return TopKResult.concatenate(parts)


def _llm_settings(teacher: str, k: int, options: EngineOptions) -> dict[str, Any]:
    """Arguments for `vllm.LLM`: everything that can change the numbers is recorded in the store."""
    settings: dict[str, Any] = {
        "model": teacher,
        "tokenizer": teacher,
        "skip_tokenizer_init": True,  # prompts are token ids; outputs are not detokenized
        "max_logprobs": k,
        "dtype": options.dtype,  # auto: bf16 on GPUs (vLLM's own choice there), float32 on CPUs (vllm_cpu.py)
        "tensor_parallel_size": options.tensor_parallel_size,
        "gpu_memory_utilization": options.gpu_memory_utilization,
        "enable_prefix_caching": False,  # requests with prompt log-probs bypass it anyway
        "enforce_eager": options.enforce_eager,
        "trust_remote_code": options.trust_remote_code,
        "seed": 0,
    }
    optional = {
        "revision": options.revision,
        "quantization": options.quantization,
        "max_num_batched_tokens": options.max_num_batched_tokens,
        "max_model_len": options.max_model_len,
    }
    settings.update({key: value for key, value in optional.items() if value is not None})
    settings.update(cpu_settings(options.dtype, options.gpu_memory_utilization != EngineOptions().gpu_memory_utilization))
    return settings


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)
