"""Stage-two speed: student tokens/s with KD from the cache against CE-only training of the same
student on the same batches, and the reader's decode rate against the student's consumption.

Side by side in one process, alternating CE and KD blocks over identical pre-read batches, so
the ratio is robust to the machine's noise.

    python benchmarks/bench_distill.py --store /tmp/bench/bench.zarr --tokenizer /path/to/teacher \
        --out-dir /tmp/bench_distill
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from ddk_cache.store.reader import CacheReader
from ddk_cache.training.data_order import GlobalBatchPlanner
from ddk_cache.training.domain_samplers import UniformSampler
from ddk_cache.training.losses import KDConfig
from ddk_cache.training.objectives import KDObjective
from ddk_cache.training.optimizer import build_optimizer
from ddk_cache.training.student_outputs import student_outputs
from ddk_cache.training.window_loader import WindowLoader, domain_orders


def build_student(tokenizer_dir: str, out: Path, hidden: int, layers: int) -> torch.nn.Module:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128), max_position_embeddings=2048,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    return model


def train_rate(model, optimizer, batches, kd: KDConfig | None, teacher_vocab: int, device: torch.device, loss_impl: str = "fused") -> float:
    """Student tokens/s over `batches` with the KD loss (kd) or CE only (kd=None); bf16 autocast on GPU as distill does,
    the loss computed as distill's `--loss-impl` would."""
    tokens, start = 0, time.perf_counter()
    for batch in batches:
        batch = batch.to(device)  # host-to-device copy counted: the trainer pays it too
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            outputs = student_outputs(model, batch.input_ids, loss_impl)
        if kd is None:
            parts = KDObjective(KDConfig(gamma=0.0), teacher_vocab).loss_on(outputs, batch.targets, None, None)
        else:
            parts = KDObjective(kd, teacher_vocab).loss_on(outputs, batch.targets, batch.teacher, None)
        parts.total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += batch.input_ids.numel()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return tokens / (time.perf_counter() - start)


def decode_rate(reader: CacheReader, threads: int) -> float:
    """Tokens/s of decoding every train chunk of every domain (zarr read + decompress + float16 -> float32)."""
    tokens, start = 0, time.perf_counter()
    loader = WindowLoader(reader, domain_orders(reader, reader.domains, seed=0), threads=threads)
    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(loader._decode, d, c) for d, order in enumerate(loader.orders) for c in range(order.n_chunks)]
        for future in futures:
            tokens += future.result().ids.shape[0] * reader.header.seq_len
    loader.close()
    return tokens / (time.perf_counter() - start)


class UncheckedReader(CacheReader):
    """The same reader with the chunk checksums ignored: only to measure what checking them costs."""

    def checksums(self, domain, split, name):
        return None


class Batches:
    """The trainer's data path: global-batch plans, read-ahead of the next step, decoding, stacking."""

    def __init__(self, reader: CacheReader, batch_size: int, threads: int) -> None:
        orders = domain_orders(reader, reader.domains, seed=0)
        self.planner, self.loader = GlobalBatchPlanner(orders, batch_size, seed=0), WindowLoader(reader, orders, threads=threads)
        self.sampler, self.step = UniformSampler(reader.domains), 0

    def next(self):
        refs, ahead = self.planner.plan(self.step, self.sampler), self.planner.peek(self.step + 1, self.sampler)
        self.loader.retain(refs + ahead)
        self.loader.prefetch(refs)
        self.loader.prefetch(ahead)
        self.step += 1
        return self.loader.batch(refs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--tokenizer", required=True, help="the teacher's tokenizer folder")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps-per-block", type=int, default=6)
    parser.add_argument("--blocks", type=int, default=3, help="CE/KD block pairs, alternating")
    parser.add_argument("--reader-threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast, as distill on a GPU)")
    parser.add_argument("--loss-impl", default="fused", choices=["fused", "dense"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    reader = CacheReader(args.store)
    device = torch.device(args.device)
    model = build_student(args.tokenizer, args.out_dir, args.hidden, args.layers).to(device).train()
    optimizer = build_optimizer(model, 1e-4, 0.1)
    teacher_vocab = reader.header.teacher.vocab_size
    batcher = Batches(reader, args.batch_size, args.reader_threads)
    batches = [batcher.next() for _ in range(args.steps_per_block)]

    # reader throughput as the trainer sees it (plans, chunk read-ahead, stacking), no training
    start = time.perf_counter()
    produced = [batcher.next() for _ in range(4 * args.steps_per_block)]
    batcher_rate = sum(b.input_ids.numel() for b in produced) / (time.perf_counter() - start)
    batcher.loader.close()

    train_rate(model, optimizer, batches[:2], KDConfig(), teacher_vocab, device, args.loss_impl)  # warm-up
    ce_rates, kd_rates = [], []
    for _ in range(args.blocks):
        ce_rates.append(train_rate(model, optimizer, batches, None, teacher_vocab, device, args.loss_impl))
        kd_rates.append(train_rate(model, optimizer, batches, KDConfig(), teacher_vocab, device, args.loss_impl))
    decode = decode_rate(reader, args.reader_threads)
    # what the integrity checks cost: decoding with and without them, alternated, each reader warm (a trainer's reader
    # lives for the whole run: opening arrays and checking their metadata happen once per split, not per chunk)
    readers = {"checked": CacheReader(args.store), "unchecked": UncheckedReader(args.store)}
    for warm in readers.values():
        decode_rate(warm, args.reader_threads)
    checked, unchecked = [], []
    for _ in range(5):
        checked.append(decode_rate(readers["checked"], args.reader_threads))
        unchecked.append(decode_rate(readers["unchecked"], args.reader_threads))
    ratios = [k / c for k, c in zip(kd_rates, ce_rates)]
    consumption = float(np.median(kd_rates))
    results = {
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, "
                   + (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        "store": args.store,
        "capture": reader.capture.describe(),
        "seq_len": reader.header.seq_len,
        "student": f"Llama hidden {args.hidden}, {args.layers} layers, vocab {model.config.vocab_size}, "
                   f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters",
        "batch_size": args.batch_size,
        "ce_only_tokens_per_s": [round(r, 1) for r in ce_rates],
        "kd_tokens_per_s": [round(r, 1) for r in kd_rates],
        "kd_over_ce": [round(r, 3) for r in ratios],
        "kd_over_ce_median": round(float(np.median(ratios)), 3),
        "decode_tokens_per_s": round(decode, 1),
        "batcher_tokens_per_s": round(batcher_rate, 1),
        "decode_over_consumption": round(decode / consumption, 1),
        "checksummed": CacheReader(args.store).checksummed,
        "decode_checked_tokens_per_s": [round(r, 1) for r in checked],
        "decode_unchecked_tokens_per_s": [round(r, 1) for r in unchecked],
        "checked_over_unchecked_median": round(float(np.median([c / u for c, u in zip(checked, unchecked)])), 3),
        "batcher_over_consumption": round(batcher_rate / consumption, 1),
    }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
