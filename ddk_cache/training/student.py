"""Load (or build) the student and check that it can learn from a cache.

The cache stores token ids. A student may use them only if its tokenizer maps every id to
the same token as the teacher's tokenizer did: the fingerprints must match. Its embedding
matrix may be larger than the tokenizer (vocabularies padded to a multiple of 64 or 128 are
common); it must not be smaller than the tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ddk_cache.errors import DDKCacheError, first_line
from ddk_cache.hub import require_loadable
from ddk_cache.store.fingerprints import require_same_tokenizer, tokenizer_description
from ddk_cache.store.header import StoreHeader, TokenizerInfo
from ddk_cache.training.lora import adapter_base, is_adapter_folder, load_adapter


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """Without transformers' "Loading weights" bar: a student loads in seconds, and the bar on stderr would sit
    above (and break) the one-line error of a check that fails after loading."""
    from transformers.utils import logging as hf_logging  # heavy: transformers loads only when a model or tokenizer does

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def load_student(student: str, tokenizer_path: str | None, dtype: torch.dtype = torch.float32, trainable_adapter: bool = False,
                 needs_weights: str | None = None):
    """A causal LM from a folder or hub id with weights, or built fresh from a folder holding only config.json, or a
    peft adapter folder: its base + the adapter (`trainable_adapter`: kept as adapters that train, else merged).

    `needs_weights`: what to do instead, said when the folder holds a config without weights (evaluations and
    rollouts: a fresh random initialisation describes no model), before anything is built; None: build it.
    Returns `(model, tokenizer)`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # heavy: transformers loads only when a model or tokenizer does

    require_loadable(student, "student")
    if tokenizer_path is not None:
        require_loadable(tokenizer_path, "tokenizer")
    adapter = student if is_adapter_folder(student) else None
    weights = adapter_base(adapter) if adapter else student
    if adapter:
        require_loadable(weights, f"the base model of adapter {adapter!r}")
    source = Path(weights)
    has_weights = not source.is_dir() or any(source.glob("*.safetensors")) or any(source.glob("*.bin"))
    if not has_weights and needs_weights is not None:
        raise DDKCacheError(f"{student} holds a config without weights: {needs_weights}")
    try:
        with _quiet_loading():
            if has_weights:
                model = AutoModelForCausalLM.from_pretrained(weights, dtype=dtype)
            else:
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(weights), dtype=dtype)
            if adapter:
                model = load_adapter(model, adapter, trainable_adapter)
    except (OSError, ValueError) as exc:
        raise DDKCacheError(f"cannot load student {student!r}: {first_line(exc)}") from None
    if adapter and not any(Path(adapter).glob("tokenizer*.json")):
        student = weights  # an adapter folder without a tokenizer reads with its base's
    tokenizer_source = tokenizer_path or student
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    except (OSError, ValueError) as exc:
        raise DDKCacheError(
            f"cannot load the student's tokenizer from {tokenizer_source!r}: {first_line(exc)}; pass --tokenizer"
        ) from None
    if tokenizer_path is not None and source.is_dir() and any(source.glob("tokenizer*.json")):
        # the student was trained with the tokenizer in its own folder: a --tokenizer that disagrees would feed it foreign ids
        own = AutoTokenizer.from_pretrained(student)
        require_same_tokenizer(tokenizer, TokenizerInfo.from_dict(tokenizer_description(own)), "--tokenizer", f"the student's own in {student}",
                               "drop --tokenizer, or use a student made for that tokenizer")
    return model, tokenizer


def student_context(model) -> int | None:
    """Positions the model can attend to, as its config names them (Llama-style or GPT-2-style); None if it does not say."""
    return getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)


def check_compatible(model, tokenizer, header: StoreHeader, cross_tokenizer: bool = False, seq_len: int | None = None) -> None:
    """Refuse a student whose tokenizer or vocabulary cannot read the cache's token ids (`cross_tokenizer`: its own ids,
    in windows of `seq_len` tokens, made from the cache's text)."""
    cached = header.tokenizer
    if not cross_tokenizer:
        require_same_tokenizer(tokenizer, cached, "student's", "the cache's",
                               "distill with the teacher's tokenizer, or pass --cross-tokenizer gold to distil across tokenizers")
    seq_len = seq_len or header.seq_len
    context = student_context(model)
    if context is not None and context < seq_len:
        windows = "its windows" if cross_tokenizer else "the cache's windows"
        raise DDKCacheError(f"the student's context ({context} positions) is shorter than {windows} ({seq_len} tokens): "
                            "use a student with max_position_embeddings >= seq_len" + (", or lower --student-seq-len" if cross_tokenizer else ""))
    if cross_tokenizer:
        if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
            raise DDKCacheError(f"the student's vocabulary ({model.get_input_embeddings().weight.shape[0]} embeddings) is smaller than "
                                f"its tokenizer ({len(tokenizer)} tokens): resize the student's embeddings")
        return
    student_vocab = model.get_input_embeddings().weight.shape[0]
    if student_vocab < cached.size:
        raise DDKCacheError(
            f"the student's vocabulary ({student_vocab} embeddings) is smaller than the cache's tokenizer ({cached.size} tokens): "
            "resize the student's embeddings"
        )
