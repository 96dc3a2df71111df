"""ddk-cache: offline teacher logit caches for domain-guided distillation of LLMs.

Stage one (`teacher-dump`) writes the teacher's top-k next-token distributions into
a Zarr v3 store; stage two (`distill`) trains a student from that store alone.

The public Python API, for trainers other than `ddk-cache distill` (README, "Use a cache from
your own trainer"): `open_store`, `CacheDataset`, `CacheMixture`, `collate`, `kd_loss`, `fused_kd_loss` with `hidden_states` and `LMHead` (the same loss from the hidden states and the head,
never building `[tokens x vocabulary]` logits), `cross_tokenizer_kd` (KD for a student of another tokenizer, on the
items `CacheDataset(..., student_tokenizer=)` yields), `KDTrainer` (the HF Trainer), `to_iterable_dataset` (a `datasets` view, for TRL), and the typed store
metadata `StoreHeader` / `DomainInfo` (docs/cache-format.md). They are
imported on first use, so `import ddk_cache` stays light (no torch or zarr until needed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["open_store", "Store", "CacheDataset", "CacheMixture", "collate", "kd_loss", "fused_kd_loss", "cross_tokenizer_kd", "hidden_states", "LMHead", "TeacherTargets", "KDTrainer", "to_iterable_dataset", "StoreHeader", "DomainInfo"]

_PUBLIC = {
    "open_store": "ddk_cache.store.api", "Store": "ddk_cache.store.api",
    "CacheDataset": "ddk_cache.training.cache_datasets", "CacheMixture": "ddk_cache.training.cache_datasets", "collate": "ddk_cache.training.cache_datasets",
    "kd_loss": "ddk_cache.training.losses", "TeacherTargets": "ddk_cache.training.losses",
    "fused_kd_loss": "ddk_cache.training.fused_loss", "cross_tokenizer_kd": "ddk_cache.training.cross_tokenizer_loss", "hidden_states": "ddk_cache.lm_head", "LMHead": "ddk_cache.lm_head",
    "KDTrainer": "ddk_cache.training.hf_trainer", "to_iterable_dataset": "ddk_cache.training.hf_datasets",
    "StoreHeader": "ddk_cache.store.header", "DomainInfo": "ddk_cache.store.header",
}

if TYPE_CHECKING:
    from ddk_cache.lm_head import LMHead, hidden_states
    from ddk_cache.store.api import Store, open_store
    from ddk_cache.store.header import DomainInfo, StoreHeader
    from ddk_cache.training.cache_datasets import CacheDataset, CacheMixture, collate
    from ddk_cache.training.cross_tokenizer_loss import cross_tokenizer_kd
    from ddk_cache.training.fused_loss import fused_kd_loss
    from ddk_cache.training.hf_datasets import to_iterable_dataset
    from ddk_cache.training.hf_trainer import KDTrainer
    from ddk_cache.training.losses import TeacherTargets, kd_loss


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        import importlib  # the public API loads on first use: `import ddk_cache` stays light

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'ddk_cache' has no attribute {name!r}")
