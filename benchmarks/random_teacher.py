"""A teacher folder with random weights and a real tokenizer, for speed measurements only.

Why: a speed benchmark needs the teacher's shapes (layers, width, vocabulary), not its
knowledge, and a device machine may not be able to receive real weights (the demo teacher's
538 MB do not travel to the GPU machine here). Throughput is the same as with real weights;
store *sizes* are not (a random teacher's distributions are flatter, so they compress worse),
so benchmarks report sizes from real teachers only.

    python benchmarks/random_teacher.py --tokenizer /work/teacher-smollm2 --shape llama-1b --out /tmp/teacher-1b
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

# TinyLlama-1.1B's shape (22 layers, width 2048, GQA 32/4 heads) with the tokenizer's vocabulary
SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path, required=True, help="a teacher folder: its tokenizer (and config, with --shape same)")
    parser.add_argument("--shape", default="same", choices=["same", *SHAPES], help="same: the --tokenizer folder's own config")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where to initialise (cuda: seconds instead of minutes for 1B)")
    args = parser.parse_args()
    if args.shape == "same":
        config = AutoConfig.from_pretrained(args.tokenizer)
    else:
        vocab = AutoConfig.from_pretrained(args.tokenizer).vocab_size
        config = LlamaConfig(vocab_size=vocab, **SHAPES[args.shape])
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(args.out)
    for name in TOKENIZER_FILES:
        if (args.tokenizer / name).exists():
            shutil.copy(args.tokenizer / name, args.out / name)
    print(f"{args.out}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, random weights")


if __name__ == "__main__":
    main()
