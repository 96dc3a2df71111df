"""MiniLLM's pretraining term: a language-modelling batch from a plain cache beside every update batch.

MiniLLM adds L_PT, the next-token cross-entropy on pretraining text, to its policy-gradient loss, so the
student keeps its language modelling while it chases the teacher on its own answers. Here the text is any
ddk-cache store of fixed text (`--pt-store`); only its `tokens` are used. Each step draws one global batch of
the same size as the update's, domains weighted by the store's manifest, each visited epoch by epoch in a
seeded order (`data_order.py`), so the pretraining stream, too, resumes exactly from a checkpoint.
"""

from __future__ import annotations

from typing import Any

from ddk_cache.store.reader import CacheReader
from ddk_cache.training.data_order import GlobalBatchPlanner, WindowRef, micro_batches, rank_slice
from ddk_cache.training.distributed import ParallelContext
from ddk_cache.training.domain_samplers import DomainSampler
from ddk_cache.training.window_loader import Batch, WindowLoader, domain_orders


class PretrainingData:
    """The pretraining batches of each step; speaks `state_dict` / `load_state_dict` for the checkpointer."""

    def __init__(self, reader: CacheReader, global_size: int, seed: int, threads: int = 1) -> None:
        orders = domain_orders(reader, reader.domains, seed)
        self.sampler = DomainSampler(reader.domains, list(reader.header.manifest_weights().values()))
        self.planner = GlobalBatchPlanner(orders, global_size, seed)
        self.loader = WindowLoader(reader, orders, threads=threads)

    def micro_batches(self, step: int, ctx: ParallelContext, micro: int) -> list[list[WindowRef]]:
        """This rank's share of step `step`'s pretraining batch, cut into micro-batches; their chunks start decoding."""
        mine = rank_slice(self.planner.plan(step, self.sampler), ctx.rank, ctx.world_size)
        self.loader.retain(mine)
        self.loader.prefetch(mine)
        return micro_batches(mine, micro)

    def batch(self, refs: list[WindowRef]) -> Batch:
        return self.loader.batch(refs)

    def state_dict(self) -> dict[str, Any]:
        return self.planner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.planner.load_state_dict(state)

    def close(self) -> None:
        self.loader.close()
