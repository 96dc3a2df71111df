"""A second Zarr v3 implementation reads a format-3 store: TensorStore (Google's C++ implementation) opens every
array of a store of every capture mode and decodes the same values zarr-python does (issue 27). Format 2 stored
`ids` and `logprobs` through numcodecs codecs, which TensorStore refuses ("Error parsing object member codecs")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from ddk_cache.store.capture import Capture
from ddk_cache.store.format import SPLITS
from ddk_cache.store.reader import CacheReader

tensorstore = pytest.importorskip("tensorstore", reason="TensorStore is the second Zarr v3 reader (the test extra installs it)")

CAPTURES = {"topk": Capture(k=8), "topp": Capture(mode="topp", k=8, top_p=0.9), "sampled": Capture(mode="sampled", draws=12),
            "headtail": Capture(mode="headtail", k=4, draws=12)}


def documented_entries(stored_values: np.ndarray, real: np.ndarray, rest: np.ndarray | None, capture: Capture) -> np.ndarray:
    """docs/cache-format.md's rule from decoded `logprobs` to the entries' log-probs: as stored, except a headtail
    store's tail, whose values are log(count / draws): its log-probs are rest + log(share), the shares summing to 1."""
    if capture.mode != "headtail":
        return np.where(real, stored_values, 0)
    k = capture.k
    share = np.where(real[..., k:], np.exp(stored_values[..., k:].astype(np.float64)), 0)
    with np.errstate(divide="ignore"):
        tail = rest[..., None] + np.log(share / share.sum(-1, keepdims=True))
    return np.concatenate([stored_values[..., :k], np.where(real[..., k:], tail, 0)], -1)


@pytest.fixture(scope="module", params=sorted(CAPTURES))
def store(request, tiny_teacher, tmp_path_factory) -> Path:
    from conftest import write_corpus_manifest

    from ddk_cache.engines import EngineOptions
    from ddk_cache.stages.teacher_dump import LayoutSettings, TeacherDumpConfig, run_teacher_dump

    tmp = tmp_path_factory.mktemp(f"store_{request.param}")
    out = tmp / "cache.zarr"
    run_teacher_dump(TeacherDumpConfig(teacher=str(tiny_teacher), manifest=write_corpus_manifest(tmp), out=str(out),
                                       capture=CAPTURES[request.param], engine_options=EngineOptions(device="cpu"),
                                       layout=LayoutSettings(chunk_windows=4, shard_windows=8), progress=False))
    return out


def opened(path: Path):
    return tensorstore.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}, open=True).result()


def test_tensorstore_reads_every_array_with_zarr_pythons_values(store):
    root = zarr.open_group(str(store), mode="r")
    arrays = 0
    for domain in root.attrs["ddk_cache"]["domains"]:
        for split in SPLITS:
            group = root[f"{domain}/{split}"]
            for name, array in [*group.arrays(), *group["crc32"].arrays()]:
                path = store / domain / split / ("crc32/" + name if array.path.split("/")[-2] == "crc32" else name)
                np.testing.assert_array_equal(opened(path).read().result(), array[:], err_msg=array.path)
                arrays += 1
    assert arrays >= 3 * 2 * 2 * 5


def test_the_documented_rules_turn_tensorstores_integers_into_the_cache_values(store):
    """docs/cache-format.md alone: ids are per-position deltas (cumulative sum), log-probs integer / scale."""
    reader = CacheReader(str(store))
    domain = reader.domains[0]
    block = reader.read(domain, "train")
    split = store / domain / "train"
    attrs = zarr.open_group(str(store), mode="r")[f"{domain}/train"]
    stored_ids = opened(split / "ids").read().result()  # the sum wraps in the stored dtype (headtail: the tail follows the head)
    np.testing.assert_array_equal(np.cumsum(stored_ids, axis=-1).astype(stored_ids.dtype), block.ids)
    scale = attrs["target_logprobs"].attrs["ddk_cache_encoding"]["scale"]
    np.testing.assert_array_equal((opened(split / "target_logprobs").read().result() / scale).astype(np.float32), block.target_logprobs)
    if reader.capture.mode != "sampled":
        scale = attrs["logprobs"].attrs["ddk_cache_encoding"]["scale"]
        n = opened(split / "n_entries").read().result()
        logprobs = (opened(split / "logprobs").read().result() / scale).astype(np.float32)
        real = np.arange(logprobs.shape[-1]) < n[..., None]
        rest = opened(split / "rest_logprobs").read().result().astype(np.float64)
        np.testing.assert_allclose(documented_entries(logprobs, real, rest, reader.capture), np.where(real, block.logprobs, 0), rtol=0, atol=1e-5)


def test_tensorstore_refuses_the_format_2_arrays_this_format_replaces(tiny_store, tmp_path):
    """Why format 3 exists: the same data as format 2 wrote it does not open outside zarr-python."""
    from test_capture_modes import write_version_2_copy

    old = tmp_path / "v2.zarr"
    write_version_2_copy(tiny_store, old)
    opened(old / "math" / "train" / "tokens")  # core codecs only: opens
    for name in ("ids", "logprobs"):
        with pytest.raises(ValueError, match="codecs"):
            opened(old / "math" / "train" / name)


NODE_READER = Path(__file__).with_name("node") / "read_position.mjs"
ZARRITA = ("zarrita@0.5.4", "@zarrita/storage@0.2.0")


@pytest.fixture(scope="session")
def node_modules(tmp_path_factory) -> Path:
    """zarrita from the npm registry, once per test session (skipped where node or npm is missing or the registry is not reachable)."""
    import shutil
    import subprocess

    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed for the JavaScript reader")
    folder = tmp_path_factory.mktemp("zarrita")
    result = subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(folder), *ZARRITA],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        pytest.skip(f"npm could not install zarrita: {result.stderr.strip()[-300:]}")
    return folder


def test_a_javascript_reader_written_from_the_format_page_gets_open_stores_entries(store, node_modules):
    """tests/node/read_position.mjs knows only docs/cache-format.md: zarrita decodes the chunks (sharding, blosc,
    crc32c), the page's rules give ids and log-probs; they equal `open_store`'s for a window of each capture mode."""
    import json
    import os
    import shutil
    import subprocess

    import ddk_cache

    reader_copy = node_modules / NODE_READER.name  # next to its node_modules, where node resolves "zarrita"
    shutil.copy(NODE_READER, reader_copy)
    cache = ddk_cache.open_store(str(store))
    domain = cache.domains[1]
    result = subprocess.run(["node", str(reader_copy), str(store), domain, "train", "2"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "NODE_PATH": str(node_modules / "node_modules")})
    assert result.returncode == 0, result.stderr[-2000:]
    decoded = json.loads(result.stdout)
    block = cache.read(domain, "train", 2, 3)
    rest = zarr.open_group(str(store), mode="r")[f"{domain}/train/rest_logprobs"][2] if cache.capture.mode == "headtail" else None
    assert decoded["mode"] == cache.capture.mode and len(decoded["positions"]) == cache.seq_len
    for t, position in enumerate(decoded["positions"]):
        n = len(position["ids"])
        assert n == (int(block.valid[0, t].sum()) if block.valid is not None else block.ids.shape[-1])
        np.testing.assert_array_equal(position["ids"], block.ids[0, t, :n])
        values = np.asarray(position["logprobs"])  # headtail's tail: the rule needs rest_logprobs, float16, which zarrita cannot read
        logprobs = values if rest is None else documented_entries(values, np.ones(n, dtype=bool), np.float64(rest[t]), cache.capture)
        np.testing.assert_allclose(logprobs, block.logprobs[0, t, :n], rtol=0, atol=1e-5)
        assert position["target"] == pytest.approx(float(block.target_logprobs[0, t]), abs=1e-6)
