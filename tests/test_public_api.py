"""The public Python API other trainers use: open_store, the datasets, collate and kd_loss."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from test_capture_modes import write_version_1_copy

import ddk_cache
from ddk_cache.errors import StoreError
from ddk_cache.store.reader import CacheReader
from ddk_cache.training.losses import KDConfig, TeacherTargets, distillation_loss


def test_open_store_describes_the_store(tiny_store):
    store = ddk_cache.open_store(str(tiny_store))
    reader = CacheReader(str(tiny_store))
    assert store.format_version == 3 and store.capture.mode == "topk" and store.capture.k == 8
    assert store.domains == reader.domains and set(store.splits) == {"train", "valid"}
    assert store.seq_len == reader.header.capture.seq_len and store.vocab_size == reader.header.teacher.vocab_size
    assert store.tokenizer.fingerprint.startswith("sha256:")
    for domain in store.domains:
        info = reader.domain_info(domain)
        train = store.split(domain, "train")
        assert (train.windows, train.tokens) == (info.train.windows, info.train.tokens) and train.tokens == train.windows * store.seq_len
        assert store.teacher_valid_loss(domain) == pytest.approx(info.teacher_valid_loss)
        assert store.bytes_stored(domain, "train") > 0
    summary = store.summary()
    assert set(summary["domains"]) == set(store.domains) and summary["capture"]["mode"] == "topk"
    assert isinstance(store.header, ddk_cache.StoreHeader) and store.header.to_dict()["format"] == "ddk-cache"
    assert isinstance(reader.domain_info(store.domains[0]), ddk_cache.DomainInfo)
    with pytest.raises(StoreError, match="has no domain 'poetry': it has"):
        store.split("poetry", "train")
    with pytest.raises(StoreError, match="unknown split 'test'"):
        store.read(store.domains[0], "test")


def test_open_store_reads_version_1_stores(tiny_store, tmp_path):
    old = tmp_path / "v1.zarr"
    write_version_1_copy(tiny_store, old)
    store = ddk_cache.open_store(str(old))
    assert store.format_version == 1 and store.capture.k == 8
    item = ddk_cache.CacheDataset(store, "math")[0]
    assert "teacher_rest" not in item and "teacher_valid" not in item and item["teacher_ids"].shape == (store.seq_len, 8)


def test_dataset_items_equal_what_the_reader_decodes(tiny_store):
    reader = CacheReader(str(tiny_store))
    for domain in reader.domains:
        for split in ("train", "valid"):
            dataset = ddk_cache.CacheDataset(str(tiny_store), domain, split)
            block = reader.read(domain, split)
            assert len(dataset) == block.tokens.shape[0]
            for i in reversed(range(len(dataset))):  # backwards: every chunk is decoded again, out of order
                item = dataset[i]
                np.testing.assert_array_equal(item["input_ids"].numpy(), block.tokens[i, :-1])
                np.testing.assert_array_equal(item["labels"].numpy(), block.tokens[i, 1:])
                np.testing.assert_array_equal(item["teacher_ids"].numpy(), block.ids[i])
                np.testing.assert_array_equal(item["teacher_logprobs"].numpy(), block.logprobs[i])
                np.testing.assert_array_equal(item["teacher_rest"].numpy(), block.rest_logprobs[i])
                assert item["domain"].item() == reader.domains.index(domain) and item["teacher_sampled"].item() is False
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_collate_stacks_items_and_the_dataloader_uses_it(tiny_store):
    dataset = ddk_cache.CacheDataset(str(tiny_store), "code")
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=ddk_cache.collate)
    batch = next(iter(loader))
    seq_len = dataset.store.seq_len
    assert batch["input_ids"].shape == (3, seq_len) and batch["input_ids"].dtype == torch.long
    assert batch["teacher_ids"].shape == (3, seq_len, 8) and batch["teacher_logprobs"].dtype == torch.float32
    assert batch["teacher_rest"].shape == (3, seq_len)
    assert batch["teacher_sampled"].dtype == torch.bool and batch["teacher_sampled"].tolist() == [False] * 3
    assert all(isinstance(value, torch.Tensor) for value in batch.values())  # what accelerate can concatenate


def test_mixture_follows_its_weights_and_ranks_split_one_stream(tiny_store):
    mixture = ddk_cache.CacheMixture(str(tiny_store), weights={"math": 3.0, "code": 1.0}, seed=5)
    domains = ddk_cache.open_store(str(tiny_store)).domains
    stream = [item for _, item in zip(range(400), iter(mixture))]
    counts = Counter(domains[item["domain"].item()] for item in stream)
    assert set(counts) == {"math", "code"} and 0.68 < counts["math"] / 400 < 0.82
    # two ranks take alternate draws of the same stream: together they are the one-rank stream
    ranks = [ddk_cache.CacheMixture(str(tiny_store), weights={"math": 3.0, "code": 1.0}, seed=5, rank=r, world_size=2) for r in (0, 1)]
    halves = [[item for _, item in zip(range(100), iter(rank))] for rank in ranks]
    for i in range(100):
        for r in (0, 1):
            assert torch.equal(halves[r][i]["input_ids"], stream[2 * i + r]["input_ids"])
    # every window of a domain comes once before any comes twice (an epoch), then again reshuffled
    math_windows = ddk_cache.open_store(str(tiny_store)).split("math", "train").windows
    math_items = [tuple(item["input_ids"].tolist()) for item in stream if domains[item["domain"].item()] == "math"]
    assert len(set(math_items[:math_windows])) == math_windows
    with pytest.raises(StoreError, match="weights name domains the store lacks: poetry"):
        ddk_cache.CacheMixture(str(tiny_store), weights={"poetry": 1.0})
    assert ddk_cache.CacheMixture(str(tiny_store), weights="manifest").weights.sum() == pytest.approx(1.0)


def test_kd_loss_is_the_kd_term_distill_trains_with(tiny_store):
    batch = ddk_cache.collate([ddk_cache.CacheDataset(str(tiny_store), "math")[i] for i in range(2)])
    vocab = ddk_cache.open_store(str(tiny_store)).vocab_size
    torch.manual_seed(0)
    logits = torch.randn(*batch["input_ids"].shape, vocab, requires_grad=True)
    teacher = TeacherTargets.from_batch(batch)
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        for tail in ("rest", "renorm"):
            for temperature in (1.0, 2.0):
                expected = distillation_loss(logits, batch["labels"], teacher, KDConfig(divergence=divergence, tail=tail, temperature=temperature)).kd
                got = ddk_cache.kd_loss(logits, batch, divergence=divergence, tail=tail, temperature=temperature)
                assert got.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    # a mask averages over the positions it keeps
    mask = torch.zeros(batch["input_ids"].shape)
    mask[:, :5] = 1
    masked = ddk_cache.kd_loss(logits, batch, mask=mask)
    part = {key: value[:, :5] if isinstance(value, torch.Tensor) and value.dim() >= 2 else value for key, value in batch.items()}
    assert masked.item() == pytest.approx(ddk_cache.kd_loss(logits[:, :5], part).item(), rel=1e-5)
    masked.backward()
    assert logits.grad[:, 5:].abs().max() == 0 and logits.grad[:, :5].abs().max() > 0
    with pytest.raises(ValueError, match="cover different positions"):
        ddk_cache.kd_loss(logits[:, 1:], batch)
    with pytest.raises(ValueError, match="unknown divergence"):
        ddk_cache.kd_loss(logits, batch, divergence="kl")
    with pytest.raises(KeyError, match="the batch lacks teacher_ids"):
        ddk_cache.kd_loss(logits, {"input_ids": batch["input_ids"]})


def test_kd_loss_refuses_biased_settings_on_sampled_targets(tiny_store):
    batch = ddk_cache.collate([ddk_cache.CacheDataset(str(tiny_store), "math")[0]])
    batch["teacher_sampled"] = torch.tensor([True])  # as collate gives it; a plain bool is taken too
    logits = torch.randn(*batch["input_ids"].shape, ddk_cache.open_store(str(tiny_store)).vocab_size)
    assert torch.isfinite(ddk_cache.kd_loss(logits, batch))
    with pytest.raises(ValueError, match="unbiased only with --divergence forward_kl"):
        ddk_cache.kd_loss(logits, batch, divergence="reverse_kl")
    batch["teacher_sampled"] = True
    with pytest.raises(ValueError, match="unbiased only with --divergence forward_kl"):
        ddk_cache.kd_loss(logits, batch, divergence="reverse_kl")


def test_importing_ddk_cache_does_not_import_torch_or_zarr():
    import subprocess
    import sys

    code = "import sys, ddk_cache; print('torch' in sys.modules, 'zarr' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() == ["False", "False"]


@pytest.mark.parametrize("rank", [0, 1])
def test_the_datasets_view_gives_the_mixtures_items_in_its_order_and_rank_split(tiny_store, rank):
    """Issue 25: TRL takes `datasets` datasets only; the view must be item for item what CacheMixture gives."""
    import itertools

    import datasets

    view = ddk_cache.to_iterable_dataset(str(tiny_store), weights={"math": 3.0, "code": 1.0}, seed=5, rank=rank, world_size=2)
    assert isinstance(view, datasets.IterableDataset)
    mixture = ddk_cache.CacheMixture(str(tiny_store), weights={"math": 3.0, "code": 1.0}, seed=5, rank=rank, world_size=2)
    got, expected = list(itertools.islice(iter(view), 12)), list(itertools.islice(iter(mixture), 12))
    for a, b in zip(got, expected, strict=True):
        assert a.keys() == b.keys()
        for key in b:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    batch = ddk_cache.collate(got[:4])
    logits = torch.randn(*batch["input_ids"].shape, ddk_cache.open_store(str(tiny_store)).vocab_size)
    assert torch.isfinite(ddk_cache.kd_loss(logits, batch))
