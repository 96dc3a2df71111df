"""What the header says about the arrays is what the arrays' own zarr.json says (issue 25: the header named
blosc level 9 while every array recorded clevel 6). Read from the files, as another reader would."""

from __future__ import annotations

import json
from pathlib import Path

import ddk_cache
from ddk_cache.store.format import HISTORICAL_CODEC_PROFILE, SHARD_DONE
from ddk_cache.store.integrity import CHECKSUM_GROUP
from ddk_cache.store.writer import differing_keys


def array_json(store: Path, domain: str, split: str, name: str) -> dict:
    return json.loads((store / domain / split / name / "zarr.json").read_text())


def inner_codecs(meta: dict) -> list[dict]:
    (sharding,) = meta["codecs"]
    assert sharding["name"] == "sharding_indexed"
    return sharding["configuration"]["codecs"]


def test_every_array_describing_field_of_the_header_matches_the_arrays(tiny_store):
    store = ddk_cache.open_store(str(tiny_store))
    layout, capture = store.header.layout, store.capture
    profile = dict(part.split(": ", 1) for part in layout.codec_profile.split("; "))
    assert "zstd9" not in layout.codec_profile and "zstd9" not in json.dumps(store.header.identity)
    for domain in store.domains:
        for split in ("train", "valid"):
            names = sorted(p.name for p in (tiny_store / domain / split).iterdir() if (p / "zarr.json").exists() and p.name != SHARD_DONE)
            assert sorted(profile) == [n for n in names if n != CHECKSUM_GROUP], (domain, split)
            for name in profile:
                meta = array_json(tiny_store, domain, split, name)
                codecs = {codec["name"]: codec.get("configuration", {}) for codec in inner_codecs(meta)}
                blosc = codecs["blosc"]
                assert f"blosc({blosc['cname']} clevel {blosc['clevel']}, {blosc['shuffle']})" in profile[name], (name, profile[name])
                encoding = meta.get("attributes", {}).get("ddk_cache_encoding")
                assert ("delta" in profile[name]) == (encoding is not None and encoding["name"] == "delta")
                assert not any(codec.startswith("numcodecs.") for codec in codecs), (name, codecs)  # format 3: Zarr v3 core codecs only
                assert meta["codecs"][0]["configuration"]["chunk_shape"][0] == layout.chunk_windows
                assert meta["chunk_grid"]["configuration"]["chunk_shape"][0] == layout.shard_windows
            tokens, ids = array_json(tiny_store, domain, split, "tokens"), array_json(tiny_store, domain, split, "ids")
            assert tokens["shape"][1] == layout.seq_len + 1 and ids["shape"][1:] == [layout.seq_len, capture.width]
            assert ids["data_type"] == ("uint16" if layout.vocab_size <= 1 << 16 else "int32")
            logprobs = array_json(tiny_store, domain, split, "logprobs")
            assert logprobs["attributes"]["ddk_cache_encoding"] == {"name": "fixed_scale", "scale": capture.logprob_scale}
            assert logprobs["data_type"] == "int16"
            sizes = store.split(domain, split)
            assert sizes.windows == tokens["shape"][0] == ids["shape"][0] and sizes.tokens == sizes.windows * layout.seq_len


def test_a_dump_started_before_the_codecs_were_described_still_resumes():
    """Old identities carried the historical codec name: it is not compared (the arrays keep their own codecs)."""
    new = {"seq_len": 16, "layout": {"vocab_size": 300, "chunk_windows": 4, "shard_windows": 8}}
    old = {"seq_len": 16, "layout": {**new["layout"], "codec_profile": HISTORICAL_CODEC_PROFILE}}
    assert differing_keys(old, new) == []
    assert differing_keys({**old, "layout": {**old["layout"], "shard_windows": 16}}, new) == ["layout"]
