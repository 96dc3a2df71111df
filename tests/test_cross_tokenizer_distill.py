"""`distill --cross-tokenizer` (issue 29): a student whose tokenizer is not the cache's trains from the cache alone, its
evaluation per byte next to the teacher's; and what it cannot use is refused in one line (exit 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import DOMAIN_WORDS, make_documents
from test_embedded_tokenizer import as_before_tokenizers_were_embedded
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from typer.testing import CliRunner

import ddk_cache
from ddk_cache.cli.main import app
from ddk_cache.errors import StoreError
from ddk_cache.training.cross_tokenizer_windows import CrossTokenizerView


@pytest.fixture(scope="module")
def other_student(tmp_path_factory) -> Path:
    """A 1-layer Llama with a byte-level BPE of its own (other merges, other ids, other specials than the tiny teacher's)."""
    folder = tmp_path_factory.mktemp("other_student")
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [doc for domain in DOMAIN_WORDS for doc in make_documents(domain, 30, seed=5, max_words=30)]
    bpe.train_from_iterator(corpus, trainer=trainers.BpeTrainer(vocab_size=420, special_tokens=["[PAD]", "[UNK]", "[EOS]"],
                                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="[EOS]", unk_token="[UNK]", pad_token="[PAD]")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, max_position_embeddings=64)).save_pretrained(folder)
    return folder


def distill(store: Path, student: Path, out: Path, *extra: str):
    """The CLI in this process (typer's runner: exit code, stdout and stderr apart), as a user runs it."""
    args = ["distill", "--store", str(store), "--student", str(student), "--out", str(out), "--steps", "6", "--batch-size", "4",
            "--lr", "3e-3", "--update-every", "3", "--eval-windows", "4", "--device", "cpu", "--no-progress", *extra]
    return CliRunner().invoke(app, args)


def test_the_cache_in_another_students_tokens(tiny_store, other_student):
    from transformers import AutoTokenizer

    reader = ddk_cache.open_store(str(tiny_store)).reader
    view = CrossTokenizerView.for_store(reader, AutoTokenizer.from_pretrained(other_student))
    coverage = view.coverage(reader, reader.domains)
    assert 0.3 < coverage.aligned_share < 1.0 and 0 < coverage.exact_mass_share <= 1.0 and coverage.cut_share == 0
    windows = view.windows(reader.read("prose", "train", 0, 4))
    assert windows.tokens.shape == (4, view.seq_len + 1) and windows.tokens.max() < len(AutoTokenizer.from_pretrained(other_student))
    aligned = windows.valid.any(-1)
    assert aligned.sum() == windows.aligned and not (aligned & ~windows.mask).any()
    assert (windows.ids[windows.valid] < 420).all() and (windows.ids[windows.valid] >= 0).any()
    assert (windows.units > 0).all() and abs(int(windows.units.sum()) - int(windows.teacher_units.sum())) <= 4 * 4  # the same text


def test_distill_trains_a_student_of_another_tokenizer_from_the_cache_alone(tiny_store, other_student, tmp_path):
    out = tmp_path / "run"
    result = distill(tiny_store, other_student, out, "--cross-tokenizer", "gold")
    assert result.exit_code == 0, result.output
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [s for s in steps if "kd" in s]
    assert len(trained) == 6 and all(s["kd"] > 0 and s["ce"] > 0 for s in trained)
    final = next(s["final_eval"] for s in steps if "final_eval" in s)
    assert {e["per"] for e in final} == {"byte"} and all(0 < e["teacher_loss"] < 2 and 0 < e["student_loss"] < 2 for e in final)
    first = next(s["eval"] for s in steps if "eval" in s)  # per byte as well: nats per token would be ~5 here
    assert sum(e["student_ppl"] for e in final) < sum(v["student_ppl"] for v in first.values())  # it learnt
    assert (out / "model.safetensors").exists()

    uld = distill(tiny_store, other_student, tmp_path / "uld", "--cross-tokenizer", "uld")
    assert uld.exit_code == 0, uld.output


def test_what_cross_tokenizer_kd_cannot_use_is_refused_in_one_line(tiny_store, other_student, tiny_student, tmp_path):
    def refused(result, fragment: str) -> None:
        assert result.exit_code == 2 and result.stderr.count("\n") == 1 and fragment in result.stderr, result.output

    refused(distill(tiny_store, other_student, tmp_path / "a"), "--cross-tokenizer gold")  # the fingerprint check says where to go
    refused(distill(tiny_store, other_student, tmp_path / "b", "--cross-tokenizer", "gold", "--min-aligned", "0.99"), "align with the teacher's")
    old = as_before_tokenizers_were_embedded(tiny_store, tmp_path / "old.zarr")
    refused(distill(old, other_student, tmp_path / "c", "--cross-tokenizer", "gold"), "attach-tokenizer")
    refused(distill(tiny_store, other_student, tmp_path / "d", "--cross-tokenizer", "gold", "--min-aligned", "1.5"), "--min-aligned must be")
    refused(distill(tiny_store, other_student, tmp_path / "e", "--cross-tokenizer", "gold", "--divergence", "reverse_kl"), "drop --divergence")
    refused(distill(tiny_store, other_student, tmp_path / "f", "--cross-tokenizer", "gold", "--student-seq-len", "500"), "lower --student-seq-len")
    assert not any((tmp_path / name).exists() for name in "abcdef")
    shutil.rmtree(old)


def test_the_public_api_yields_student_token_items_with_aligned_teacher_targets(tiny_store, other_student, tiny_student):
    """`CacheDataset(..., student_tokenizer=)` and `CacheMixture`: the items `distill --cross-tokenizer` trains on,
    for another trainer; `cross_tokenizer_kd` on them gives a finite loss with gradients."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student_tokenizer = AutoTokenizer.from_pretrained(other_student)
    dataset = ddk_cache.CacheDataset(str(tiny_store), "prose", student_tokenizer=student_tokenizer, seq_len=24)
    batch = ddk_cache.collate([dataset[0], dataset[1], dataset[len(dataset) - 1]])
    assert batch["input_ids"].shape == (3, 24) and batch["teacher_ids"].shape[:2] == (3, 24) and batch["loss_mask"].dtype == torch.bool
    store = ddk_cache.open_store(str(tiny_store))
    cached = store.load_tokenizer().decode(store.read("prose", "train", 0, 1).tokens[0], skip_special_tokens=True)
    seen = student_tokenizer.decode(batch["input_ids"][0][batch["loss_mask"][0]], skip_special_tokens=True)
    assert len(seen) > 20 and seen.strip()[:20] in cached  # the cached window's own text, in the student's tokens
    assert (batch["labels"][:, :-1] == batch["input_ids"][:, 1:]).all()  # already shifted, as the teacher-token items
    assert not (batch["teacher_valid"].any(-1) & ~batch["loss_mask"]).any() and batch["teacher_valid"].any()
    assert (batch["byte_count"] > 0).all()

    model = AutoModelForCausalLM.from_pretrained(other_student)
    logits = model(input_ids=batch["input_ids"]).logits
    aligned = batch["teacher_valid"].any(-1)
    kd = ddk_cache.cross_tokenizer_kd(logits[aligned], batch["teacher_ids"][aligned], batch["teacher_logprobs"][aligned],
                                      batch["teacher_valid"][aligned]).mean()
    kd.backward()
    assert torch.isfinite(kd) and kd > 0 and model.get_input_embeddings().weight.grad.abs().sum() > 0

    mixture = iter(ddk_cache.CacheMixture(str(tiny_store), student_tokenizer=student_tokenizer, seq_len=24))
    assert next(mixture)["input_ids"].shape == (24,)
    with pytest.raises(StoreError, match="the cache's own tokenizer"):
        ddk_cache.CacheDataset(str(tiny_store), "prose", student_tokenizer=AutoTokenizer.from_pretrained(tiny_student))
