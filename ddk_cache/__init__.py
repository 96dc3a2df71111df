"""ddk-cache: offline teacher logit caches for domain-guided distillation of LLMs.

Stage one (`teacher-dump`) writes the teacher's top-k next-token distributions into
a Zarr v3 store; stage two (`distill`) trains a student from that store alone.

The public Python API, for trainers other than `ddk-cache distill` (README, "Use a cache from
your own trainer"): `open_store`, `CacheDataset`, `CacheMixture`, `collate`, `kd_loss`, and the typed store
metadata `StoreHeader` / `DomainInfo` (docs/cache-format.md). They are
imported on first use, so `import ddk_cache` stays light (no torch or zarr until needed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["open_store", "Store", "CacheDataset", "CacheMixture", "collate", "kd_loss", "TeacherTargets", "StoreHeader", "DomainInfo"]

_PUBLIC = {
    "open_store": "ddk_cache.store", "Store": "ddk_cache.store",
    "CacheDataset": "ddk_cache.torch_dataset", "CacheMixture": "ddk_cache.torch_dataset", "collate": "ddk_cache.torch_dataset",
    "kd_loss": "ddk_cache.losses", "TeacherTargets": "ddk_cache.losses",
    "StoreHeader": "ddk_cache.store_header", "DomainInfo": "ddk_cache.store_header",
}

if TYPE_CHECKING:
    from ddk_cache.losses import TeacherTargets, kd_loss
    from ddk_cache.store import Store, open_store
    from ddk_cache.store_header import DomainInfo, StoreHeader
    from ddk_cache.torch_dataset import CacheDataset, CacheMixture, collate


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'ddk_cache' has no attribute {name!r}")
