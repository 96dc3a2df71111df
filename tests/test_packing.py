"""Tokenize-and-pack: deterministic, split by document (no validation text in training), EOS between docs."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_documents
from transformers import AutoTokenizer

from ddk_cache.data.packing import document_order, pack_domain
from ddk_cache.errors import ManifestError

SEQ_LEN = 16


@pytest.fixture(scope="module")
def tokenizer(tiny_teacher):
    return AutoTokenizer.from_pretrained(tiny_teacher)


@pytest.fixture(scope="module")
def documents() -> list[str]:
    return make_documents("prose", 60, seed=5) + make_documents("code", 60, seed=6)


def pack(tokenizer, documents, seed=3, valid=5, budget=None, name="prose"):
    return pack_domain(name, documents, tokenizer, SEQ_LEN, valid, budget, seed)


def stream_text(tokenizer, windows: np.ndarray) -> str:
    """Undo the one-token overlap of consecutive windows and decode the stream."""
    stream = np.concatenate([windows[0], *[w[1:] for w in windows[1:]]]) if len(windows) else np.zeros(0, int)
    return tokenizer.decode(stream.tolist())


def test_packing_is_deterministic_given_seed(tokenizer, documents):
    first, again = pack(tokenizer, documents), pack(tokenizer, documents)
    np.testing.assert_array_equal(first.train.windows, again.train.windows)
    np.testing.assert_array_equal(first.valid.windows, again.valid.windows)
    assert first.train.sha256() == again.train.sha256()
    other_seed = pack(tokenizer, documents, seed=4)
    assert other_seed.train.sha256() != first.train.sha256()
    assert pack(tokenizer, documents, name="code").train.sha256() != first.train.sha256()  # per-domain order


def test_windows_overlap_by_one_and_have_requested_shape(tokenizer, documents):
    packed = pack(tokenizer, documents)
    assert packed.valid.windows.shape == (5, SEQ_LEN + 1)
    assert packed.train.windows.dtype == np.int32 and packed.train.windows.shape[1] == SEQ_LEN + 1
    np.testing.assert_array_equal(packed.train.windows[:-1, -1], packed.train.windows[1:, 0])
    assert packed.train.n_tokens == packed.train.n_windows * SEQ_LEN


def test_split_is_by_document_and_validation_text_never_reaches_training(tokenizer, documents):
    packed = pack(tokenizer, documents, valid=12)
    order = document_order(len(documents), seed=3, domain_name="prose")
    valid_ids, train_ids = order[: packed.valid.n_documents], order[packed.valid.n_documents :]
    eos = tokenizer.eos_token
    valid_text, train_text = stream_text(tokenizer, packed.valid.windows), stream_text(tokenizer, packed.train.windows)
    assert valid_text.startswith(documents[valid_ids[0]] + eos)
    assert train_text.startswith(documents[train_ids[0]] + eos)
    assert not any(documents[i][:40] in train_text for i in valid_ids)
    # documents are joined with EOS: every complete piece between two EOS is a whole training document
    train_docs = {documents[i] for i in train_ids}
    pieces = train_text.split(eos)[1:-1]
    assert pieces and all(piece in train_docs for piece in pieces)


def test_token_budget_caps_training_windows(tokenizer, documents):
    packed = pack(tokenizer, documents, budget=10 * SEQ_LEN + 5)
    assert packed.train.n_windows == 10
    unbudgeted = pack(tokenizer, documents)
    assert unbudgeted.train.n_windows > 10
    np.testing.assert_array_equal(packed.train.windows, unbudgeted.train.windows[:10])  # a prefix: same order


def test_too_little_text_for_validation_is_a_clear_error(tokenizer, documents):
    with pytest.raises(ManifestError, match="fewer than the .* that valid_sequences=1000 windows"):
        pack(tokenizer, documents[:3], valid=1000)


def test_no_text_left_for_training_is_a_clear_error(tokenizer, documents):
    valid_doc_tokens = len(tokenizer(documents[0], add_special_tokens=False)["input_ids"]) + 1
    with pytest.raises(ManifestError, match="no text left for training"):
        pack(tokenizer, documents[:1], valid=max(1, (valid_doc_tokens - 1) // SEQ_LEN))
