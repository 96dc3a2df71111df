"""Many nodes, one store: which shards a node scores, who creates the store, who completes it.

A dump on N nodes is N independent runs of the same command, told apart only by their node
rank (explicit `--num-nodes/--node-rank`, else torchrun's RANK/WORLD_SIZE, else SLURM's
SLURM_PROCID/SLURM_NTASKS). No process group is needed: the store itself is the only thing
they share, and it is safe to share because

- **one creator**: node 0 alone creates the store (or resumes it); the others wait, bounded by
  `--create-timeout`, until its header says "writing" (or "complete") with their identity;
- **disjoint shards**: every shard of every domain and split is numbered in store order and
  node r takes the numbers i with i % N == r, among those not yet marked done. The partition
  is over *all* shards, not over what happens to be pending when a node looks, so nodes that
  start at different times never overlap; a shard and its `shard_done` marker are objects of
  their own (zarr's unit of safe writing), so concurrent nodes never write the same object;
- **one idempotent completion**: after its own shards, every node checks whether every marker
  of the store is set; whichever node sees that (the last to finish, or several at once)
  records the teacher's validation loss per domain and marks the store complete. All such
  writes carry the same values, so a repeated or concurrent completion loses nothing.

A killed node is re-run alone with the same command and scores only its own pending shards.
Running again with another N re-partitions all shards: what is done stays done, the rest is
spread over the new nodes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import zarr

from ddk_cache.data.packing import PackedDomain
from ddk_cache.errors import DDKCacheError, StoreError
from ddk_cache.ranges import POSITIVE, Range, check_ranges
from ddk_cache.store.format import HEADER_ATTR, SHARD_DONE, SPLITS, StoreLayout, zarr_store
from ddk_cache.store.header import StoreHeader
from ddk_cache.store.header_versions import parse_header
from ddk_cache.store.metadata import HeaderError
from ddk_cache.store.writer import CacheWriter, check_domain_data, differing_keys

POLL_SECONDS = 2.0
LAUNCHER_VARIABLES = (("RANK", "WORLD_SIZE", "torchrun"), ("SLURM_PROCID", "SLURM_NTASKS", "SLURM"))


@dataclass(frozen=True)
class NodePlace:
    """This node's rank among `count` nodes scoring one store."""

    rank: int = 0
    count: int = 1

    @property
    def creates_store(self) -> bool:
        return self.rank == 0

    def owns(self, shard_number: int) -> bool:
        return shard_number % self.count == self.rank


@dataclass(frozen=True)
class NodeSettings:
    """Several nodes scoring one store: how many, which one this is (default: from RANK/WORLD_SIZE or SLURM_*;
    else one node), and how long a node other than 0 waits for node 0 to create the store."""

    num_nodes: int | None = None
    node_rank: int | None = None
    create_timeout: float = 600.0

    RANGES: ClassVar[dict[str, Range]] = {"create_timeout": POSITIVE}

    def __post_init__(self) -> None:
        check_ranges({"create_timeout": self.create_timeout}, self.RANGES)

    def resolve(self) -> NodePlace:
        return resolve_node(self.num_nodes, self.node_rank)


def resolve_node(num_nodes: int | None, node_rank: int | None) -> NodePlace:
    """The node's place from the flags, or from the launcher's environment, or alone."""
    if (num_nodes is None) != (node_rank is None):
        raise DDKCacheError("give --num-nodes and --node-rank together (or neither: then RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS)")
    if num_nodes is not None and node_rank is not None:
        return _checked(node_rank, num_nodes, "--node-rank", "--num-nodes")
    for rank_name, size_name, launcher in LAUNCHER_VARIABLES:
        if rank_name in os.environ and size_name in os.environ:
            try:
                rank, size = int(os.environ[rank_name]), int(os.environ[size_name])
            except ValueError:
                raise DDKCacheError(f"{rank_name} / {size_name} set by {launcher} are not integers: pass --num-nodes and --node-rank") from None
            return _checked(rank, size, rank_name, size_name)
    return NodePlace()


def _checked(rank: int, count: int, rank_name: str, count_name: str) -> NodePlace:
    if count < 1:
        raise DDKCacheError(f"{count_name} must be at least 1, got {count}")
    if not 0 <= rank < count:
        raise DDKCacheError(f"{rank_name} {rank} is outside 0..{count - 1} ({count_name} {count})")
    return NodePlace(rank, count)


def wait_for_store(url: str, identity: dict[str, Any], storage_options: dict | None, timeout: float) -> None:
    """Block until node 0 has created (or resumed) the store with this identity, or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    seen: StoreHeader | None = None
    while True:
        seen = _header(url, storage_options)
        if seen is not None and seen.status in ("writing", "complete") and seen.identity == identity:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(POLL_SECONDS)
    if seen is None or seen.status == "creating":
        raise StoreError(
            f"{url} was not created within {timeout:.0f} s: node 0 creates it; start node 0 with the same command "
            "(every node must see the same --out), or raise --create-timeout"
        )
    differing = differing_keys(seen.identity or {}, identity)
    raise StoreError(f"{url} holds a store made with a different {', '.join(differing) or 'format'}: give every node the same command")


def open_as_follower(url: str, layout: StoreLayout, domains: list[PackedDomain], storage_options: dict | None) -> CacheWriter:
    """Open the store node 0 prepared, checking that this node packed the same windows."""
    writer = CacheWriter.open_existing(url, layout, storage_options)
    for domain in domains:
        check_domain_data(writer.root, domain, url)
    return writer


def all_shards_done(writer: CacheWriter, domains: list[PackedDomain]) -> bool:
    return all(bool(np.all(writer.split_group(d.name, split)[SHARD_DONE][:])) for d in domains for split in SPLITS)


def _header(url: str, storage_options: dict | None) -> StoreHeader | None:
    """The store's header, None while there is none yet (or one node 0 is still replacing)."""
    try:
        root = zarr.open_group(zarr_store(url, read_only=True, storage_options=storage_options), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, OSError, ValueError):
        return None
    try:
        return parse_header(root.attrs.get(HEADER_ATTR))
    except HeaderError:
        return None
