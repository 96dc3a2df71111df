"""Every closed set of choices a setting takes, declared once.

The CLI uses these Enums as option types (typer validates the value and lists the choices in
`--help`); the core checks library callers against the same values (`values(...)`). A new
divergence or capture mode is added here and nowhere else. No heavy imports: the CLI loads this
module to build its options before torch is imported.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

from ddk_cache.errors import SettingError

E = TypeVar("E", bound=Enum)


class CaptureMode(str, Enum):
    topk = "topk"
    topp = "topp"
    sampled = "sampled"
    headtail = "headtail"


class EngineName(str, Enum):
    auto = "auto"
    hf = "hf"
    vllm = "vllm"


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Divergence(str, Enum):
    forward_kl = "forward_kl"
    reverse_kl = "reverse_kl"
    jsd = "jsd"
    skew_forward_kl = "skew_forward_kl"
    skew_reverse_kl = "skew_reverse_kl"
    tv = "tv"


class SingleStepDivergence(str, Enum):
    """MiniLLM's single-step term: its own reverse KL, or DistiLLM's skew reverse KL."""

    reverse_kl = "reverse_kl"
    skew_reverse_kl = "skew_reverse_kl"


class Tail(str, Enum):
    rest = "rest"
    renorm = "renorm"


class Objective(str, Enum):
    kd = "kd"  # CE + KD on a cache of fixed text
    minillm = "minillm"  # MiniLLM's update on a scored rollout store


class LossImpl(str, Enum):
    fused = "fused"  # from the hidden states and the head, a token chunk at a time (training/fused_loss.py)
    dense = "dense"  # from the model's [tokens x vocabulary] logits: the reference


class CrossTokenizer(str, Enum):
    off = "off"  # the student reads the cache's ids: its tokenizer must be the teacher's
    gold = "gold"  # exact part (tokens with the same bytes) + rest bucket, ULD on the rest (training/cross_tokenizer_loss.py)
    uld = "uld"  # sorted probabilities only (Universal Logit Distillation)


class Responses(str, Enum):
    sampled = "sampled"  # the student's own answers (MiniLLM)
    references = "references"  # the prompt manifest's reference answers (SFT, word-level KD)


class Generator(str, Enum):
    auto = "auto"  # vLLM where installed with a GPU, else hf
    hf = "hf"
    vllm = "vllm"


class SamplerName(str, Enum):
    ddk = "ddk"
    static = "static"
    uniform = "uniform"


class DDKScore(str, Enum):
    ppl_ratio = "ppl-ratio"  # the paper's rule
    ce_ratio = "ce-ratio"


class ParallelMode(str, Enum):
    auto = "auto"
    none = "none"
    ddp = "ddp"
    fsdp = "fsdp"


class Criterion(str, Enum):
    even = "even"
    block_influence = "block-influence"


class ReportTarget(str, Enum):
    tensorboard = "tensorboard"
    wandb = "wandb"


def values(choice: type[Enum]) -> tuple[str, ...]:
    """The accepted strings, in declaration order."""
    return tuple(member.value for member in choice)


def parse_choice(choice: type[E], value: str | E, flag: str, note: str = "") -> E:
    """`value` as a member of `choice` (library callers may pass the string); anything else is one line naming
    the flag and every accepted value. Configs hold the member, so no later code checks the string again."""
    try:
        return choice(value)
    except ValueError:
        raise SettingError(f"unknown {flag} {value!r}: choose {', '.join(values(choice))}{note}") from None
