"""The prompt manifest: which prompts a student answers in MiniLLM rounds, and what their references are.

A data manifest (`manifest.py`) describes text to pack; a prompt manifest describes *questions*: rows of
a dataset turned into a prompt by a template, with an optional reference answer per row (for ROUGE-L and
for the SFT / word-level KD baselines). `train` sources feed the rollouts, `test` sources are held out
for evaluation. The windows' geometry is fixed here, like `seq_len` in a data manifest: a rollout
window holds at most `max_prompt_tokens` of prompt (its end kept) and `max_new_tokens` of response.

    seed: 1234
    name: math                                    # the rollout store's domain
    prompt_template: "Question: {question}\\nAnswer:"
    chat_template: false                          # optional; true: the tokenizer's chat template wraps each prompt
    reference_field: answer                       # optional
    train: {path: json, data_files: train.jsonl}  # a source, or a list of them (as in a data manifest)
    test: {path: json, data_files: test.jsonl}
    train_prompts: 256                            # prompts per round (round r takes the next ones, cycling)
    test_prompts: 64                              # held out: the first ones, every round
    max_prompt_tokens: 128
    max_new_tokens: 96
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ddk_cache.data.manifest import DOMAIN_NAME_PATTERN, SourceSpec, parse_source, positive_int, read_yaml, reject_unknown, template_fields
from ddk_cache.data.sources import iter_source_rows
from ddk_cache.errors import ManifestError

_KEYS = {"seed", "name", "prompt_template", "chat_template", "reference_field", "train", "test", "train_prompts", "test_prompts",
         "max_prompt_tokens", "max_new_tokens", "description"}


@dataclass(frozen=True)
class Prompt:
    text: str
    reference: str | None


@dataclass(frozen=True)
class PromptManifest:
    name: str
    prompt_template: str
    reference_field: str | None
    train: tuple[SourceSpec, ...]
    test: tuple[SourceSpec, ...]
    train_prompts: int
    test_prompts: int
    max_prompt_tokens: int
    max_new_tokens: int
    seed: int
    raw: dict[str, Any]
    chat_template: bool = False

    @property
    def seq_len(self) -> int:
        """Positions per rollout window: the longest prompt plus the longest response."""
        return self.max_prompt_tokens + self.max_new_tokens

    @property
    def fields(self) -> tuple[str, ...]:
        named = tuple(f for _, f, _, _ in string.Formatter().parse(self.prompt_template) if f)
        return named + ((self.reference_field,) if self.reference_field else ())

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True).encode()).hexdigest()


def load_prompt_manifest(path: str | Path) -> PromptManifest:
    path = Path(path)
    return parse_prompt_manifest(read_yaml(path, "prompt manifest", "--prompts"), path.parent.resolve(), str(path))


def parse_prompt_manifest(document: Any, base_dir: Path, where: str = "prompt manifest") -> PromptManifest:
    if not isinstance(document, dict):
        raise ManifestError(f"{where}: expected a mapping with 'name', 'prompt_template', 'train' and 'test'")
    reject_unknown(document, _KEYS, where)
    name = document.get("name")
    if not isinstance(name, str) or not DOMAIN_NAME_PATTERN.match(name):
        raise ManifestError(f"{where}: 'name' must be a domain name (letters, digits, '_', '.', '-'), got {name!r}")
    template = document.get("prompt_template")
    template_fields(template, where, "prompt_template", "'Question: {question}\\nAnswer:'")
    chat = document.get("chat_template", False)
    if not isinstance(chat, bool):
        raise ManifestError(f"{where}: 'chat_template' must be true or false, got {chat!r}")
    reference = document.get("reference_field")
    if reference is not None and (not isinstance(reference, str) or not reference):
        raise ManifestError(f"{where}: 'reference_field' must be a column name")
    seed = document.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ManifestError(f"{where}: 'seed' must be a non-negative integer, got {seed!r}")
    splits = {}
    for split in ("train", "test"):
        if split not in document:
            raise ManifestError(f"{where}: missing required field {split!r} (a source or a list of sources)")
        given = document[split] if isinstance(document[split], list) else [document[split]]
        if not given:
            raise ManifestError(f"{where}: {split!r} must name at least one source")
        splits[split] = tuple(parse_source({"template": template, **s} if isinstance(s, dict) else {"path": s, "template": template},
                                           f"{where} {split} source {i}", base_dir) for i, s in enumerate(given))
    sizes = {key: positive_int(document, key, where, required=True) for key in ("train_prompts", "test_prompts", "max_prompt_tokens",
                                                                                 "max_new_tokens")}
    return PromptManifest(name=name, prompt_template=template, reference_field=reference, train=splits["train"], test=splits["test"],
                          seed=seed, raw=document, chat_template=chat, **sizes)


def load_prompts(manifest: PromptManifest, split: str, round_index: int = 0) -> list[Prompt]:
    """`test`: the first `test_prompts` rows, every round. `train`: `train_prompts` rows of a seeded order of all
    train rows, round r taking the r-th slice (cycling), so successive rounds see different prompts."""
    rows = []
    for index, source in enumerate(getattr(manifest, split)):
        rows.extend(iter_source_rows(source, f"prompt manifest {split} source {index} ({source.describe()})", manifest.fields))
    prompts = [Prompt(manifest.prompt_template.format(**row), str(row[manifest.reference_field]) if manifest.reference_field else None)
               for row in rows]
    if not prompts:
        raise ManifestError(f"prompt manifest: the {split} sources have no rows")
    if split == "test":
        return prompts[: manifest.test_prompts]
    order = np.random.default_rng([manifest.seed, 7]).permutation(len(prompts))
    start = round_index * manifest.train_prompts
    return [prompts[int(order[(start + i) % len(prompts)])] for i in range(manifest.train_prompts)]


def apply_chat_template(manifest: PromptManifest, prompts: list[Prompt], tokenizer: Any, who: str) -> list[Prompt]:
    """The prompts as the tokenizer's chat template renders them (a user turn, the assistant's opened), if the manifest
    asks for it; otherwise unchanged. `who` names the tokenizer in the error when it has no template."""
    if not manifest.chat_template:
        return prompts
    if not getattr(tokenizer, "chat_template", None):
        raise ManifestError(f"prompt manifest: chat_template is true, but {who}'s tokenizer has no chat template: "
                            "set chat_template: false, or use a tokenizer that has one")
    return [Prompt(tokenizer.apply_chat_template([{"role": "user", "content": p.text}], tokenize=False, add_generation_prompt=True),
                   p.reference) for p in prompts]
