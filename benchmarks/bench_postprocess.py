"""Where a GPU dump's time goes: the teacher's bare forward against forward + top-k extraction
(`topk_from_logits`: top-k, target log-prob, normaliser) on the same batches, no store involved.

The ratio bounds what any overlap of encoding and writing can reach: the extraction runs on the
same device as the teacher, after its forward. Alternating blocks in one process.

    python benchmarks/bench_postprocess.py --teacher DIR --device cuda --dtype bfloat16 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ddk_cache.engines.hf import HFTeacherEngine, topk_from_logits


@torch.inference_mode()
def rate(engine: HFTeacherEngine, batches: list[torch.Tensor], k: int | None, upcast: bool = False) -> float:
    """Tokens/s of the forward alone (k None) or forward + top-k extraction, one synchronisation at the end.

    `upcast`: the logits are converted to float32 first, so the top-k runs in float32 (the extraction
    before 2026-11-26 did that; kept to show what selecting in the logits' own dtype saves)."""
    total = torch.zeros((), device=engine.device)
    start = time.perf_counter()
    for batch in batches:
        logits = engine.model(input_ids=batch[:, :-1], use_cache=False).logits
        if k is None:
            total += logits[:, -1, 0].float().sum()
        else:
            total += topk_from_logits(logits.float() if upcast else logits, batch[:, 1:], k)[1][:, -1, 0].sum()
    total.item()
    return sum(b[:, :-1].numel() for b in batches) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    engine = HFTeacherEngine(args.teacher, device=args.device, dtype=args.dtype, batch_size=args.batch_size)
    vocab = int(engine.model.config.vocab_size)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), generator=generator).to(engine.device) for _ in range(args.batches)]
    rate(engine, batches[:2], args.k)  # warm-up
    bare, extract, upcast = [], [], []
    for _ in range(args.repeats):
        bare.append(rate(engine, batches, None))
        extract.append(rate(engine, batches, args.k))
        upcast.append(rate(engine, batches, args.k, upcast=True))
    results = {
        "device": torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "cpu",
        "teacher_parameters": sum(p.numel() for p in engine.model.parameters()),
        "dtype": str(engine.dtype).removeprefix("torch."), "batch_size": args.batch_size, "seq_len": args.seq_len, "k": args.k,
        "bare_forward_tokens_per_s": [round(r, 1) for r in bare],
        "forward_and_topk_tokens_per_s": [round(r, 1) for r in extract],
        "forward_and_float32_topk_tokens_per_s": [round(r, 1) for r in upcast],
        "ratio_median": round(float(np.median([e / b for e, b in zip(extract, bare)])), 3),
        "float32_topk_ratio_median": round(float(np.median([e / b for e, b in zip(upcast, bare)])), 3),
    }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
