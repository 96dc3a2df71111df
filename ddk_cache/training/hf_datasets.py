"""A cache as a `datasets.IterableDataset`, for trainers that accept nothing else (TRL's `SFTTrainer` among them).

Why a view and not a copy: the cache is the dataset already (tokenized, packed, with the teacher's
targets), and writing it out as Arrow would double its size for nothing. The view streams
`CacheMixture`'s items, in its order (seeded, chunk-shuffled, domains drawn by their weights) and
with its rank split, so a `datasets` consumer sees exactly the windows a `CacheMixture` consumer
does. Items come back as torch tensors (`with_format("torch")`), the same names and shapes as
`CacheMixture`'s, so `ddk_cache.collate`, `kd_loss` and `KDTrainer` take them unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ddk_cache.training.cache_datasets import CacheMixture


def _items(url: str, weights: Any, split: str, seed: int, rank: int, world_size: int, storage_options: dict | None) -> Iterator[dict]:
    """The mixture's items as numpy arrays (what `datasets` encodes), opened in the process that iterates."""
    for item in CacheMixture(url, weights=weights, split=split, seed=seed, rank=rank, world_size=world_size, storage_options=storage_options):
        yield {key: value.numpy() for key, value in item.items()}


def _features(item: Mapping[str, torch.Tensor]):
    """`datasets` features of one item: nested sequences of its dtype, as deep as the tensor."""
    import datasets

    names = {torch.int64: "int64", torch.float32: "float32", torch.bool: "bool"}
    features = {}
    for key, value in item.items():
        feature: Any = datasets.Value(names[value.dtype])
        for _ in range(value.dim()):
            feature = datasets.Sequence(feature)
        features[key] = feature
    return datasets.Features(features)


def to_iterable_dataset(store: str, weights: Mapping[str, float] | str | None = None, split: str = "train", seed: int = 0,
                        rank: int = 0, world_size: int = 1, storage_options: dict | None = None):
    """An endless `datasets.IterableDataset` of the store's windows, item for item `CacheMixture(store, ...)`'s.

    `store` is a path or URL (the dataset reopens it where it is iterated). Arguments as `CacheMixture`'s; under
    the HF Trainer or TRL leave `rank` / `world_size` alone (accelerate splits the batches).
    """
    import datasets

    first = next(iter(CacheMixture(store, weights=weights, split=split, seed=seed, storage_options=storage_options)))  # checks the arguments
    kwargs = {"url": store, "weights": None if weights is None else (weights if isinstance(weights, str) else dict(weights)), "split": split,
              "seed": seed, "rank": rank, "world_size": world_size, "storage_options": storage_options}
    view = datasets.IterableDataset.from_generator(_items, features=_features(first), gen_kwargs=kwargs)
    return view.with_format("torch")

