"""A store carries its tokenizer (issue 29, item 1): the files `save_pretrained` writes, in the store's `_tokenizer`
group and checksummed in the header, so cached ids become text from the store alone; stores written before can
have the tokenizer attached (`ddk-cache attach-tokenizer`), refused unless it is the one the windows were made with."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import write_other_tokenizer
from typer.testing import CliRunner

import ddk_cache
from ddk_cache.cli.main import app
from ddk_cache.errors import StoreError
from ddk_cache.store.embedded_tokenizer import GROUP
from ddk_cache.store.fingerprints import tokenizer_fingerprint
from ddk_cache.store.reader import CacheReader


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The CLI in this process (typer's runner keeps stdout and stderr apart), as the user's exit code and lines."""
    result = CliRunner().invoke(app, list(args))
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


def as_before_tokenizers_were_embedded(source: Path, out: Path) -> Path:
    """A copy of a store as ddk-cache wrote it before stores carried their tokenizer: no group, no `files` key."""
    shutil.copytree(source, out)
    shutil.rmtree(out / GROUP)
    root = zarr.open_group(str(out), mode="r+")
    header = dict(root.attrs["ddk_cache"])
    header["tokenizer"] = {k: v for k, v in header["tokenizer"].items() if k != "files"}
    root.attrs["ddk_cache"] = header
    return out


def test_a_dumped_store_turns_its_ids_into_text_without_the_teachers_folder(tiny_store, tiny_teacher):
    from transformers import AutoTokenizer

    store = ddk_cache.open_store(str(tiny_store))
    assert set(store.tokenizer.files) >= {"tokenizer.json", "tokenizer_config.json"}
    embedded = store.load_tokenizer()
    own = AutoTokenizer.from_pretrained(tiny_teacher)
    assert tokenizer_fingerprint(embedded) == tokenizer_fingerprint(own) == store.tokenizer.fingerprint
    tokens = store.read("prose", "train", 0, 2).tokens
    assert embedded.decode(tokens[0]) == own.decode(tokens[0]) and len(embedded.decode(tokens[0]).split()) > 3


def test_the_files_are_plain_zarr_arrays_any_reader_can_take_out(tiny_store, tiny_teacher):
    """uint8 arrays with the specification's own codecs (zstd, crc32c): their bytes are the tokenizer's files."""
    root = zarr.open_group(str(tiny_store), mode="r")
    array = root[f"{GROUP}/tokenizer.json"]
    assert array.dtype == np.uint8 and [c["name"] for c in array.metadata.to_dict()["codecs"]] == ["bytes", "zstd", "crc32c"]
    data = bytes(array[:])
    assert data.startswith(b"{") and b'"model"' in data
    tensorstore = pytest.importorskip("tensorstore")
    opened = tensorstore.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tiny_store / GROUP / "tokenizer.json")}},
                              open=True).result()
    assert bytes(opened.read().result()) == data


def test_pack_embeds_it_and_scoring_the_packed_store_keeps_it(tiny_teacher, corpus_manifest, tmp_path):
    out = tmp_path / "packed.zarr"
    packed = cli("pack", "--manifest", str(corpus_manifest), "--tokenizer", str(tiny_teacher), "--out", str(out),
                 "--valid-fraction", "0.2", "--no-progress", cwd=tmp_path)
    assert packed.returncode == 0, packed.stderr
    files = CacheReader(str(out), accept_packed=True).header.tokenizer.files
    assert files and "tokenizer.json" in files
    scored = cli("teacher-dump", "--teacher", str(tiny_teacher), "--out", str(out), "--k", "4", "--device", "cpu", "--no-progress", cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr
    reader = CacheReader(str(out))
    assert reader.header.tokenizer.files == files and reader.load_tokenizer().decode([5, 6, 7])


def test_an_older_store_gets_its_tokenizer_attached_once_and_only_the_right_one(tiny_store, tiny_teacher, tmp_path):
    old = as_before_tokenizers_were_embedded(tiny_store, tmp_path / "old.zarr")
    with pytest.raises(StoreError, match="attach-tokenizer"):
        CacheReader(str(old)).load_tokenizer()
    assert "attach-tokenizer" in cli("verify", str(old), cwd=tmp_path).stderr

    header_before = (old / "zarr.json").read_bytes()
    wrong = cli("attach-tokenizer", str(old), str(write_other_tokenizer(tmp_path / "other")), cwd=tmp_path)
    assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1 and "differs from the one" in wrong.stderr
    assert (old / "zarr.json").read_bytes() == header_before and not (old / GROUP).exists()

    attached = cli("attach-tokenizer", str(old), str(tiny_teacher), cwd=tmp_path)
    assert attached.returncode == 0 and "now carries its tokenizer" in attached.stdout, attached.stderr
    reader = CacheReader(str(old))
    assert reader.header.tokenizer.files == CacheReader(str(tiny_store)).header.tokenizer.files
    assert tokenizer_fingerprint(reader.load_tokenizer()) == reader.header.tokenizer.fingerprint
    verified = cli("verify", str(old), cwd=tmp_path)
    assert verified.returncode == 0 and "note:" not in verified.stderr, verified.stderr
    again = cli("attach-tokenizer", str(old), str(tiny_teacher), cwd=tmp_path)
    assert again.returncode == 0 and "already carried" in again.stdout


def test_a_damaged_embedded_file_is_found_by_verify_and_refused_by_readers(tiny_store, tmp_path):
    store = tmp_path / "damaged.zarr"
    shutil.copytree(tiny_store, store)
    array = zarr.open_array(str(store / GROUP / "tokenizer.json"), mode="r+")
    data = array[:]
    data[10] ^= 1  # one flipped bit, written through zarr: its crc32c is right, only the header's sha256 can tell
    array[:] = data
    with pytest.raises(StoreError, match="does not match its sha256"):
        CacheReader(str(store)).load_tokenizer()
    verified = cli("verify", str(store), cwd=tmp_path)
    assert verified.returncode == 1 and "tokenizer file tokenizer.json does not match" in verified.stderr


def test_attach_refuses_a_store_still_being_written_and_a_missing_folder(tiny_store, tiny_teacher, tmp_path):
    old = as_before_tokenizers_were_embedded(tiny_store, tmp_path / "old.zarr")
    root = zarr.open_group(str(old), mode="r+")
    root.attrs["ddk_cache"] = {**root.attrs["ddk_cache"], "status": "writing"}
    writing = cli("attach-tokenizer", str(old), str(tiny_teacher), cwd=tmp_path)
    assert writing.returncode == 2 and "still being written" in writing.stderr and len(writing.stderr.strip().splitlines()) == 1
    missing = cli("attach-tokenizer", str(tiny_store), str(tmp_path / "nowhere"), cwd=tmp_path)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1 and "Traceback" not in missing.stderr
