"""Write a rollout store: the student's sampled responses, ready for a teacher to score.

A rollout store is a *packed* ddk-cache store (status "packed", docs/cache-format.md "Rollout stores"):
one domain (the prompt manifest's `name`), `train` = responses to this round's training prompts, `valid` =
responses to the held-out test prompts (their scored log-ratios estimate the reverse KL), each split with
`tokens`, `response_mask` and `behaviour_logprobs` (+ `sampling_logprobs` where the teacher was mixed into
sampling) and their chunk checksums, and a header whose `rollout`
entry says which student sampled them, in which round, how. `teacher-dump --out STORE` (no `--manifest`)
scores it in place like any packed store, so the MiniLLM loop needs no scoring code of its own.
"""

from __future__ import annotations

import hashlib

import numpy as np
import zarr

from ddk_cache.errors import StoreError, first_line
from ddk_cache.minillm.rollouts import Rollouts
from ddk_cache.store.embedded_tokenizer import write_tokenizer_files
from ddk_cache.store.encodings import array_encoding
from ddk_cache.store.format import (
    BEHAVIOUR_LOGPROBS,
    HEADER_ATTR,
    RESPONSE_MASK,
    SAMPLING_LOGPROBS,
    TOKENS,
    StoreLayout,
    create_rollout_arrays,
    zarr_store,
)
from ddk_cache.store.header import DomainInfo, SplitInfo, StoreHeader, now
from ddk_cache.store.header_versions import write_domain_info
from ddk_cache.store.integrity import checksum_array, decoded_like_zarr, write_checksums

ROLLOUT_RULE = "rollout-v1"  # `packing.split_rule` of a rollout store: one window per prompt, no packing


def write_rollout_store(url: str, header: StoreHeader, splits: dict[str, Rollouts], layout: StoreLayout, documents: dict[str, int],
                        storage_options: dict | None = None, tokenizer_files: dict[str, bytes] | None = None) -> None:
    """Create the store at `url` (replacing what is there) and write every split whole, shard by shard.

    The header says "packing" until the last shard is written and "packed" after, so a killed rollout is
    never taken for a finished one (a rerun writes it again: a round's rollouts are minutes, not hours).
    """
    try:
        store = zarr_store(url, read_only=False, storage_options=storage_options)
        root = zarr.open_group(store, mode="w", attributes={HEADER_ATTR: header.with_status("packing").to_dict()})
        if tokenizer_files:  # the files `header.tokenizer.files` names
            write_tokenizer_files(root, tokenizer_files)
    except OSError as exc:
        raise StoreError(f"cannot write to {url}: {first_line(exc)}: check the URL, credentials and --storage-options") from None
    domain = header.domains[0]
    group = root.create_group(domain)
    infos = {}
    mixed = header.rollout.teacher_mix > 0
    for split, rollouts in splits.items():
        target = group.create_group(split)
        n = len(rollouts.tokens)
        create_rollout_arrays(target, n, layout, teacher_mixed=mixed)
        values = {TOKENS: rollouts.tokens, RESPONSE_MASK: rollouts.response_mask, BEHAVIOUR_LOGPROBS: rollouts.behaviour_logprobs}
        if mixed:  # a split the student answered alone (the test prompts) was sampled from the student: its log-probs are the mixture's
            values[SAMPLING_LOGPROBS] = rollouts.behaviour_logprobs if rollouts.sampling_logprobs is None else rollouts.sampling_logprobs
        for shard in range(layout.n_shards(n)):
            region = layout.shard_slice(shard, n)
            for name, data in values.items():
                array = target[name]
                encoding = array_encoding(array.attrs)
                stored = np.asarray(data[region]).astype(array.dtype, copy=False) if encoding is None else encoding.encode(data[region], array.dtype)
                array[region] = stored
                write_checksums(checksum_array(target, name), region.start, decoded_like_zarr(stored, array.dtype, array.filters), layout.chunk_windows)
        digest = hashlib.sha256(np.ascontiguousarray(rollouts.tokens, dtype="<i4").tobytes()).hexdigest()
        infos[split] = SplitInfo(n, n * layout.seq_len, documents[split], digest)
    write_domain_info(group, DomainInfo(domain, **infos))
    root.attrs[HEADER_ATTR] = header.with_status("packed", packed_at=now()).to_dict()
