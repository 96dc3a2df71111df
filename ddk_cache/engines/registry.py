"""Engine selection by name, so the CLI and stages never import a heavy engine they do not use.

`--engine auto` chooses from what the machine has and from measurement (benchmarks/RESULTS.md, "Stage one's engines"):
vLLM wherever it imports, on a GPU as on a CPU, once the job is long enough for vLLM's start-up to pay for
itself (on 2 CPU cores vLLM's CPU build scores at 1.09x the HF engine but starts 89 s later: from about
700,000 tokens on); the HF engine otherwise. The choice and its reason are logged and recorded in the store
(`engine.selected_by`), so a cache says which engine made it and why.
"""

from __future__ import annotations

from dataclasses import dataclass

from ddk_cache.choices import EngineName, values
from ddk_cache.engines.base import TeacherEngine
from ddk_cache.engines.options import HF_ONLY, VLLM_ONLY, EngineOptions, check_applicable
from ddk_cache.engines.vllm_cpu import runs_on_cpu
from ddk_cache.engines.vllm_install import find_vllm
from ddk_cache.errors import EngineError

ENGINE_NAMES = values(EngineName)

# Tokens from which vLLM's CPU build, start-up included, finishes a dump sooner than the HF engine: its extra
# start-up divided by the time per token it saves (SmolLM2-135M on 2 cores, benchmarks/bench_engines.py: 695,000).
CPU_BREAK_EVEN_TOKENS = 700_000


@dataclass(frozen=True)
class EngineChoice:
    """Which engine runs, and why (for the log line and the store's provenance)."""

    name: str  # "hf" or "vllm"
    reason: str


def choose_engine(requested: str, options: EngineOptions | None = None, *, drawn: bool = False, tokens: int | None = None) -> EngineChoice:
    """The engine for `--engine requested`: `auto` decides by, in order, the capture mode, the engine options given,
    the job's size (`tokens` to score; None: not known yet) on a CPU, and whether vLLM imports here."""
    if requested not in ENGINE_NAMES:
        raise EngineError(f"unknown engine {requested!r}: choose one of {', '.join(ENGINE_NAMES)}")
    if requested != EngineName.auto.value:
        return EngineChoice(requested, f"--engine {requested}")
    if drawn:
        return EngineChoice("hf", "auto: --mode sampled and headtail need the full distribution, which only the hf engine returns")
    given = set((options or EngineOptions()).non_default())
    for name, own in (("hf", HF_ONLY), ("vllm", VLLM_ONLY)):
        flags = sorted("--" + option.replace("_", "-") for option in given & set(own))
        if flags:
            return EngineChoice(name, f"auto: {', '.join(flags)} {'is an option' if len(flags) == 1 else 'are options'} of the {name} engine")
    import torch  # heavy: torch only when this runs

    gpu = torch.cuda.is_available()
    if not gpu and tokens is not None and tokens < CPU_BREAK_EVEN_TOKENS:
        return EngineChoice("hf", f"auto: {tokens:,} tokens to score, fewer than the {CPU_BREAK_EVEN_TOKENS:,} from which "
                                  "vLLM's start-up pays for itself on a CPU")

    install = find_vllm()
    if install.version is None:
        return EngineChoice("hf", "auto: vLLM is not installed")
    if not install.usable:
        return EngineChoice("hf", f"auto: {install.describe()} does not import ({install.problem})")
    if gpu:
        return EngineChoice("vllm", f"auto: {install.describe()} and a GPU")
    if not runs_on_cpu():
        return EngineChoice("hf", f"auto: {install.describe()} is a GPU build and this machine has no GPU")
    size = "" if tokens is None else f", {tokens:,} tokens to score (>= {CPU_BREAK_EVEN_TOKENS:,})"
    return EngineChoice("vllm", f"auto: {install.describe()}, measured faster than the hf engine on CPUs once its start-up is paid{size}")


def resolve_engine_name(name: str, options: EngineOptions | None = None) -> str:
    """The engine `choose_engine` takes when the job's size is not known."""
    return choose_engine(name, options).name


def create_engine(name: str, teacher: str, options: EngineOptions | None = None, *, max_k: int = 64) -> TeacherEngine:
    """Instantiate engine `name` for the `teacher` model, able to return top-k distributions up to `max_k`."""
    options = options or EngineOptions()
    name = resolve_engine_name(name, options)
    check_applicable(name, options)
    if name == "hf":
        from ddk_cache.engines.hf import HFTeacherEngine  # the engine a run does not use is never imported (torch / vLLM)

        return HFTeacherEngine(
            teacher,
            device=options.device,
            dtype=options.dtype,
            batch_size=options.batch_size,
            revision=options.revision,
            trust_remote_code=options.trust_remote_code,
        )
    from ddk_cache.engines.vllm_engine import VLLMTeacherEngine  # the engine a run does not use is never imported (torch / vLLM)

    return VLLMTeacherEngine(teacher, max_k, options)
