"""LoRA students: train low-rank adapters on a frozen student from the cache, and load an adapter folder back.

Why here and not left to peft users: distilling into a large pretrained student with adapters is
what DistillKit and axolotl users do (axolotl's KD + LoRA is broken, axolotl #3206), and an
adapter folder (adapter_config.json + adapter weights, no config.json) is not something
`AutoModelForCausalLM` loads: `eval` and `distill --student` failed on it with "Unrecognized model".
An adapter folder names its base (`base_model_name_or_path`); loading it is base + adapter.

peft is the `lora` extra, imported only when LoRA is used. What is saved: the adapter (peft's
`save_pretrained`: small) in `--out`, and with `merge` also the merged model in `--out/merged`
(what inference engines such as vLLM load without peft).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ddk_cache.errors import DDKCacheError, SettingError
from ddk_cache.ranges import NON_NEGATIVE, POSITIVE, Range, check_ranges

ADAPTER_CONFIG = "adapter_config.json"
MERGED_FOLDER = "merged"


def _peft():
    try:
        import peft  # optional: the lora extra
    except ImportError:
        raise DDKCacheError("LoRA needs peft: pip install 'ddk-cache[lora]'") from None
    return peft


def is_adapter_folder(path: str) -> bool:
    """A peft adapter folder: adapter_config.json and no full model config beside it."""
    folder = Path(path)
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def adapter_base(path: str) -> str:
    """The model an adapter folder was trained on, as its adapter_config.json names it."""
    try:
        base = json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as exc:
        raise DDKCacheError(f"{path}/{ADAPTER_CONFIG} is not readable JSON ({exc}): restore it") from None
    if not base:
        raise DDKCacheError(f"{path}/{ADAPTER_CONFIG} names no base_model_name_or_path: add the base model's folder or hub id")
    return base


def load_adapter(base_model: torch.nn.Module, path: str, trainable: bool) -> torch.nn.Module:
    """`base_model` with the adapter in `path`: trainable (distill continues it) or merged into the weights (evaluation)."""
    model = _peft().PeftModel.from_pretrained(base_model, path, is_trainable=trainable)
    return model if trainable else model.merge_and_unload()


@dataclass(frozen=True)
class LoRASettings:
    """`distill --lora-rank R`: adapters of rank R on `targets` (peft's per-architecture default when empty)."""

    rank: int = 0  # 0: no LoRA, the whole student trains
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ()
    merge: bool = False

    RANGES: ClassVar[dict[str, Range]] = {"lora_rank": NON_NEGATIVE, "lora_alpha": POSITIVE, "lora_dropout": Range(0, 1, open_high=True)}

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(t.strip() for t in self.targets if t.strip()))
        check_ranges({"lora_rank": self.rank, "lora_alpha": self.alpha, "lora_dropout": self.dropout}, self.RANGES)
        if not self.rank and (self.targets or self.merge):
            raise SettingError("--lora-targets and --lora-merge need --lora-rank R (R >= 1)")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """The student with fresh adapters; only they train (peft freezes the rest)."""
        peft = _peft()
        config = peft.LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, task_type="CAUSAL_LM",
                                 target_modules=list(self.targets) or None)
        try:
            return peft.get_peft_model(model, config)
        except ValueError as exc:  # a target module the student lacks
            raise DDKCacheError(f"--lora-targets: {str(exc).splitlines()[0]}") from None

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets), "merge": self.merge}


def save_merged(model: torch.nn.Module, tokenizer: Any, out: Path) -> Path:
    """The adapter merged into the weights, saved as a plain model in `out/merged`.

    Merged in place (no second copy of the weights): call it last, once the adapter itself is saved.
    """
    merged = model.merge_and_unload()
    folder = out / MERGED_FOLDER
    merged.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
