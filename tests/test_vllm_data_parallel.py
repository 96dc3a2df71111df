"""`teacher-dump --engine vllm --data-parallel 2`: two vLLM engine processes, one shard queue, one store.

A module of its own so that no other vLLM engine is alive while its two start (test_vllm_live.py's shared
engine is torn down with that module): three engines on 2 cores ran past 600 s once in CI. The store is
compared with the HF engine's, as test_vllm_live.py compares the single engine's (same windows, log-probs
within one quantum).
"""

from __future__ import annotations

from test_vllm_live import assert_stores_agree, cli, corpus, dump, dump_args, install, pytestmark, vllm_teacher  # noqa: F401

from ddk_cache.store.api import open_store


def test_vllm_data_parallel_writes_the_single_engine_store(vllm_teacher, corpus, tmp_path):  # noqa: F811
    reference = dump(vllm_teacher, corpus, tmp_path / "hf.zarr")  # the HF engine, in this process
    out = tmp_path / "dp.zarr"
    result = cli(*dump_args(vllm_teacher, corpus, out, "--data-parallel", "2"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "engine vllm" in result.stdout
    assert_stores_agree(out, reference)
    header = open_store(str(out)).header
    assert header.engine.name == "vllm" and header.engine.version == install.version
    assert header.engine.data_parallel == 2 and header.engine.selected_by == "--engine vllm"
