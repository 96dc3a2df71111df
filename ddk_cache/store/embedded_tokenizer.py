"""The tokenizer's own files inside the store, so its ids can always be turned back into text.

Why in the store: a cache is read months after it was written, by teams that never saw the teacher,
and the fingerprint in the header only says *whether* a tokenizer is the right one, not what an id
means. A student with another tokenizer (cross-tokenizer KD) has to re-tokenize each window's text
and find the byte offsets of the teacher's tokens: that needs the teacher's tokenizer itself, and a
hub that may have moved or a folder that may be gone is not something a shared cache can rely on.
A few MB next to gigabytes of targets is the cheap way to make the store self-contained.

Layout (docs/cache-format.md, "TOKENIZER"): a group `_tokenizer` at the root (no domain can take the
name: domain names start with a letter or digit), one 1-D uint8 array per file that the tokenizer's
`save_pretrained` writes, named as the file, in one chunk, with the Zarr v3 specification's own codecs
(zstd, crc32c), so any Zarr reader can take the bytes out. The header's `tokenizer.files` maps each
file name to the sha256 of its bytes: the arrays are checked against it on every read, and a store
whose header names no files simply has none (older stores; `ddk-cache attach-tokenizer` adds them).
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from ddk_cache.errors import StoreError

GROUP = "_tokenizer"
MAX_FILE_BYTES = 256 << 20  # the largest tokenizer files in use are ~20 MB; anything far beyond is not a tokenizer


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    """The files `tokenizer.save_pretrained` writes, by name: what `load_tokenizer_files` loads back."""
    with tempfile.TemporaryDirectory(prefix="ddk-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        return {path.name: path.read_bytes() for path in sorted(Path(folder).iterdir()) if path.is_file()}


def file_hashes(files: dict[str, bytes]) -> dict[str, str]:
    """What the header records: each file's sha256."""
    return {name: "sha256:" + hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}


def write_tokenizer_files(root: zarr.Group, files: dict[str, bytes]) -> None:
    """Write (or replace) the `_tokenizer` group. The header naming the files is written after, by the caller:
    a kill in between leaves a store that says it has none, never one whose header names missing bytes."""
    group = root.require_group(GROUP)
    for name in list(group.array_keys()):  # a half-written earlier attach: replaced whole
        del group[name]
    for name, data in sorted(files.items()):
        if len(data) > MAX_FILE_BYTES:
            raise StoreError(f"tokenizer file {name} is {len(data) >> 20} MB, more than any tokenizer's: is this a tokenizer folder?")
        values = np.frombuffer(data, dtype=np.uint8)
        array = group.create_array(name, shape=values.shape, chunks=(max(len(values), 1),), dtype="uint8", fill_value=0,
                                   compressors=(ZstdCodec(level=19), Crc32cCodec()))
        if len(values):
            array[:] = values


def read_tokenizer_files(root: zarr.Group, hashes: dict[str, str], url: str) -> dict[str, bytes]:
    """The embedded files, each checked against the header's sha256 (`hashes`); a mismatch or a missing file is refused."""
    files = {}
    for name, expected in sorted(hashes.items()):
        try:
            data = bytes(np.asarray(root[f"{GROUP}/{name}"][:], dtype=np.uint8))
        except (KeyError, FileNotFoundError):
            raise StoreError(f"{url}: the header names the embedded tokenizer file {name} but the store lacks it: "
                             "attach the tokenizer again with `ddk-cache attach-tokenizer`") from None
        if file_hashes({name: data})[name] != expected:
            raise StoreError(f"{url}: the embedded tokenizer file {name} does not match its sha256 in the header (damaged): "
                             "attach the tokenizer again with `ddk-cache attach-tokenizer`")
        files[name] = data
    return files


def load_tokenizer_files(files: dict[str, bytes], fingerprint: str, url: str):
    """A transformers tokenizer from the embedded files, refused unless it is the one the header fingerprints.

    The files are written to a temporary folder only for `from_pretrained`: a loaded tokenizer keeps its
    vocabulary in memory, so nothing outlives the call.
    """
    from transformers import AutoTokenizer  # heavy: only when a tokenizer is asked for

    from ddk_cache.store.fingerprints import tokenizer_fingerprint

    with tempfile.TemporaryDirectory(prefix="ddk-tokenizer-") as folder:
        for name, data in files.items():
            (Path(folder) / name).write_bytes(data)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as exc:
            raise StoreError(f"{url}: the embedded tokenizer does not load ({str(exc).splitlines()[0]})") from None
    if tokenizer_fingerprint(tokenizer) != fingerprint:
        raise StoreError(f"{url}: the embedded tokenizer loads with another vocabulary than the header's fingerprint "
                         "(this transformers version reads its files differently): load the tokenizer from its own folder")
    return tokenizer
