"""Cross-tokenizer KD's pieces (issue 29, items 2-3): token ids as bytes, the exact teacher -> student vocabulary map,
byte-span alignment of a cached window with a student's tokens, and the GOLD / ULD losses. Real tokenizers trained
here with `tokenizers` (byte-level BPE and SentencePiece-style), windows from a real packed store."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ddk_cache.errors import DDKCacheError
from ddk_cache.store.reader import CacheReader
from ddk_cache.training.cross_tokenizer_loss import cross_tokenizer_kd, gold_exact_kl, sorted_l1
from ddk_cache.training.token_alignment import WindowAligner
from ddk_cache.training.token_bytes import spelling, token_bytes
from ddk_cache.training.vocab_map import build_vocab_map, vocab_map

TEXTS = ["the river town people walked slowly under bright morning light", "def return self if else for in range print",
         "one two three plus minus times equals half double sum total apples", "café naïve — 日本語 🎉 ünïcödé text"] * 20
OTHER_TEXTS = [TEXTS[0]] * 50 + [TEXTS[1]] + [TEXTS[2]] * 3 + [TEXTS[3]] * 10  # other frequencies: other merges


def byte_level(vocab_size: int, texts=TEXTS) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainer=trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def sentencepiece_style(vocab_size: int = 400, texts=TEXTS) -> PreTrainedTokenizerFast:
    """Llama-2-like: Metaspace ("▁" for spaces), byte fallback (<0x..> tokens) for what the vocabulary lacks."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    bpe.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    bpe.train_from_iterator(texts, trainer=trainers.BpeTrainer(vocab_size=vocab_size + 259, special_tokens=specials, show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return tokenizer


def bytes_of(tokenizer, ids) -> bytes:
    table = token_bytes(tokenizer)
    return b"".join(table[i] or b"" for i in ids)


# -- token ids as bytes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [byte_level, sentencepiece_style], ids=["byte_level", "sentencepiece"])
def test_a_texts_tokens_concatenate_to_its_bytes(make):
    tokenizer = make(300)
    for text in set(TEXTS):
        spelled = bytes_of(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"])
        assert spelled in (text.encode(), b" " + text.encode())  # SentencePiece puts a space before the first word
    assert token_bytes(tokenizer)[tokenizer.eos_token_id] is None  # special tokens stand for no text


def test_tokenizers_whose_ids_cannot_become_bytes_are_refused_in_one_line():
    from transformers import BertTokenizerFast, CanineTokenizer

    with pytest.raises(DDKCacheError, match="slow") as refused:
        spelling(CanineTokenizer())  # a Python tokenizer (transformers' PythonBackend): no byte offsets
    assert "\n" not in str(refused.value)
    piece = Tokenizer(models.WordPiece({"[UNK]": 0, "the": 1, "##s": 2}, unk_token="[UNK]"))
    piece.normalizer, piece.decoder = normalizers.BertNormalizer(), decoders.WordPiece()
    with pytest.raises(DDKCacheError, match="neither byte-level"):
        spelling(BertTokenizerFast(tokenizer_object=piece))


# -- the vocabulary map --------------------------------------------------------------------------------------------


def test_the_map_pairs_tokens_with_the_same_bytes_and_specials_by_role(tmp_path):
    teacher, student = byte_level(500), sentencepiece_style(300)
    mapping = build_vocab_map(teacher, student)
    teacher_bytes, student_bytes = token_bytes(teacher), token_bytes(student)
    mapped = np.flatnonzero(mapping.teacher_to_student >= 0)
    assert 0 < len(mapped) < len(teacher)
    for t in mapped:
        if teacher_bytes[t] is not None:
            assert student_bytes[mapping.teacher_to_student[t]] == teacher_bytes[t]
    unmapped = [t for t in range(len(teacher)) if mapping.teacher_to_student[t] < 0 and teacher_bytes[t] is not None]
    assert unmapped and all(teacher_bytes[t] not in set(student_bytes) for t in unmapped)
    assert mapping.teacher_to_student[teacher.eos_token_id] == student.eos_token_id
    assert build_vocab_map(teacher, teacher).exact_share == 1.0

    cached = vocab_map(teacher, student, cache_dir=tmp_path)
    files = list((tmp_path / "vocab-maps").glob("*.npy"))
    assert len(files) == 1 and np.array_equal(np.load(files[0]), cached.teacher_to_student)
    assert np.array_equal(vocab_map(teacher, student, cache_dir=tmp_path).teacher_to_student, mapping.teacher_to_student)


# -- alignment -----------------------------------------------------------------------------------------------------


def check_alignment(teacher, student, window: np.ndarray, aligned) -> None:
    """Aligned pairs end at the same byte of the window's text and see the same next text.

    The student's prefix may lack the first bytes of a character the window cut (it has no tokens for them), and a
    SentencePiece student spells a space before each segment's first word: compared without spaces, the teacher's
    prefix ends with the student's and is at most 3 bytes longer.
    """
    s_bytes = token_bytes(student)
    ids = aligned.input_ids[: aligned.length]
    for j in range(aligned.length - 1):
        i = aligned.teacher_position[j]
        if i < 0:
            continue
        teacher_prefix = bytes_of(teacher, window[: i + 1]).replace(b" ", b"")
        student_prefix = bytes_of(student, ids[: j + 1]).replace(b" ", b"")
        assert teacher_prefix.endswith(student_prefix) and len(teacher_prefix) - len(student_prefix) <= 3
        assert (ids[: j + 1] == student.eos_token_id).sum() == (window[: i + 1] == teacher.eos_token_id).sum()
        following = s_bytes[ids[j + 1]]
        if following is None:  # EOS after EOS's twin
            assert window[i + 1] == teacher.eos_token_id
        else:
            assert bytes_of(teacher, window[i + 1:]).replace(b" ", b"").startswith(following.replace(b" ", b""))
    assert (aligned.teacher_position[aligned.length - 1:] == -1).all()
    assert aligned.aligned == (aligned.teacher_position >= 0).sum()


def test_the_same_tokenizer_aligns_every_position_to_itself(tiny_store, tiny_teacher):
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    reader = CacheReader(str(tiny_store))
    aligner = WindowAligner(tokenizer, tokenizer, reader.header.seq_len, build_vocab_map(tokenizer, tokenizer))
    for window in reader.read("prose", "train", 0, 4).tokens:
        aligned = aligner.align(window)
        assert np.array_equal(aligned.input_ids, window) and np.array_equal(aligned.teacher_position, np.arange(len(window) - 1))
        assert aligned.cut_tokens == aligned.unmatched_bytes == 0


@pytest.mark.parametrize("make", [byte_level, sentencepiece_style], ids=["byte_level", "sentencepiece"])
def test_another_tokenizers_positions_align_where_both_prefixes_end_at_the_same_byte(make):
    teacher, student = byte_level(290), make(350, OTHER_TEXTS)  # a teacher of few merges: windows start inside characters
    stream = []
    for text in TEXTS[:8]:
        stream += teacher(text, add_special_tokens=False)["input_ids"] + [teacher.eos_token_id]
    aligner = WindowAligner(teacher, student, 96, build_vocab_map(teacher, student))
    coverage = []
    for start in range(0, len(stream) - 65, 13):
        window = np.asarray(stream[start:start + 65])
        aligned = aligner.align(window)
        check_alignment(teacher, student, window, aligned)
        assert aligned.unmatched_bytes == 0
        coverage.append(aligned.aligned / aligned.positions)
    assert 0.3 < np.mean(coverage) < 1.0  # a different tokenizer: many positions, not all


def test_student_tokens_beyond_the_window_are_cut_and_counted():
    teacher, student = byte_level(600), byte_level(260)  # the student needs more tokens for the same text
    window = np.asarray(teacher(" ".join(TEXTS[:3]), add_special_tokens=False)["input_ids"][:33])
    aligned = WindowAligner(teacher, student, 32, build_vocab_map(teacher, student)).align(window)
    assert aligned.cut_tokens > 0 and aligned.length == 33 and len(aligned.input_ids) == 33
    padding = WindowAligner(teacher, teacher, 64, build_vocab_map(teacher, teacher))
    short = padding.align(window)
    assert short.length == 33 and len(short.input_ids) == 65 and (short.input_ids[33:] == padding.pad_id).all()
    assert (short.teacher_position[32:] == -1).all() and short.positions == 32


# -- the losses ----------------------------------------------------------------------------------------------------


def test_gold_with_every_token_mapped_is_the_full_forward_kl_and_zero_at_the_teacher():
    torch.manual_seed(0)
    vocab = 12
    teacher_logits, student_logits = torch.randn(5, vocab), torch.randn(5, vocab)
    ids = torch.arange(vocab).expand(5, vocab)
    teacher_logprobs = torch.log_softmax(teacher_logits, -1)
    valid = torch.ones(5, vocab, dtype=torch.bool)
    full = torch.nn.functional.kl_div(torch.log_softmax(student_logits, -1), teacher_logprobs, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(cross_tokenizer_kd(student_logits, ids, teacher_logprobs, valid, "gold", uld_weight=0.0), full, atol=1e-5, rtol=1e-4)
    assert cross_tokenizer_kd(teacher_logits, ids, teacher_logprobs, valid, "gold").abs().max() < 1e-5


def test_gold_compares_the_mapped_entries_and_one_rest_bucket_per_side():
    """By hand: teacher entries a (mapped to student 2), b (unmapped), c (mapped to 0); the buckets {2, 0, rest}."""
    student_logprobs = torch.log(torch.tensor([[0.1, 0.3, 0.4, 0.2]]))
    teacher = torch.tensor([[0.5, 0.2, 0.1]])
    ids, mapped = torch.tensor([[2, -1, 0]]), torch.tensor([[True, False, True]])
    p = np.array([0.5, 0.1, 0.4])
    q = np.array([0.4, 0.1, 0.5])
    expected = float((p * np.log(p / q)).sum())
    assert gold_exact_kl(student_logprobs, ids, teacher, mapped).item() == pytest.approx(expected, rel=1e-5)


def test_uld_sees_only_the_shape_of_the_distribution():
    torch.manual_seed(1)
    logits = torch.randn(4, 10)
    logprobs = torch.log_softmax(logits, -1)
    permuted = logits[:, torch.randperm(10)]
    valid = torch.ones(4, 10, dtype=torch.bool)
    ids = torch.full((4, 10), -1)
    assert cross_tokenizer_kd(permuted, ids, logprobs, valid, "uld").abs().max() < 1e-6
    flat = torch.zeros(4, 10)
    assert (sorted_l1(torch.log_softmax(flat, -1), logprobs.exp()) > 0.05).all()


def test_the_losses_train_a_student_towards_the_teacher():
    torch.manual_seed(2)
    teacher_logprobs = torch.log_softmax(3 * torch.randn(6, 8), -1)
    ids = torch.tensor([0, 1, 2, 3, -1, -1, -1, -1]).expand(6, 8)
    valid = torch.ones(6, 8, dtype=torch.bool)
    for method in ("gold", "uld"):
        logits = torch.zeros(6, 8, requires_grad=True)
        optimizer = torch.optim.SGD([logits], lr=1.0)
        first = cross_tokenizer_kd(logits, ids, teacher_logprobs, valid, method).mean().item()
        for _ in range(100):
            optimizer.zero_grad()
            loss = cross_tokenizer_kd(logits, ids, teacher_logprobs, valid, method).mean()
            loss.backward()
            optimizer.step()
        assert loss.item() < 0.5 * first and torch.isfinite(logits.grad).all()
