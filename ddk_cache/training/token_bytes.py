"""Each token id of a tokenizer as the exact bytes of text it stands for: what two tokenizers have in common.

Why bytes and not strings: two tokenizers agree on nothing but the text. A byte-level BPE (GPT-2, Llama 3,
Qwen, SmolLM) spells the byte 0x20 as "Ġ" and a SentencePiece model (Llama 2, Gemma, Mistral) spells a space
as "▁" and odd bytes as "<0xE2>"; a token can also be part of a UTF-8 character, which no string holds.
Mapped to bytes, "Ġthe" and "▁the" are both b" the", and a window's tokens concatenate to its text exactly,
so both sides' token boundaries become byte offsets in one text (`token_alignment.py`).

Special tokens (EOS, BOS, chat markers) stand for no text: they get `None`, and alignment treats each as a
unit of its own. Added tokens that are not special are literal text. A tokenizer whose tokens are not a
byte-level or SentencePiece spelling (WordPiece's "##", or one with a normaliser that changes the text) is
refused in one line: its ids cannot be turned into the text they came from.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

from ddk_cache.errors import DDKCacheError

SENTENCEPIECE_SPACE = "▁"
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's reversible map from the 256 bytes to printable characters, inverted (`bytes_to_unicode`)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes)}


def spelling(tokenizer) -> str:
    """"byte_level" or "sentencepiece": how the tokenizer's vocabulary spells text; anything else is refused."""
    if not getattr(tokenizer, "is_fast", False):
        raise DDKCacheError(f"the tokenizer {tokenizer.name_or_path} is a slow (Python) tokenizer, whose tokens have no byte offsets: "
                            "load it with use_fast=True, or save a fast one (tokenizer.json) into its folder")
    document = json.loads(tokenizer.backend_tokenizer.to_str())
    decoder = json.dumps(document.get("decoder"))
    if '"ByteLevel"' in decoder:
        return "byte_level"
    if '"Metaspace"' in decoder or SENTENCEPIECE_SPACE in decoder or '"ByteFallback"' in decoder:
        return "sentencepiece"
    raise DDKCacheError(f"the tokenizer {tokenizer.name_or_path} spells its tokens neither byte-level (GPT-2) nor SentencePiece "
                        f"(its decoder is {decoder[:80]}): its ids cannot be mapped back to the text's bytes")


def special_ids(tokenizer) -> set[int]:
    """Ids that stand for no text: the special tokens, added ones included."""
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, added in tokenizer.added_tokens_decoder.items() if added.special}
    return ids


def token_bytes(tokenizer) -> list[bytes | None]:
    """Index = id: the bytes each token stands for, None for special tokens (and for ids no token has)."""
    how = spelling(tokenizer)
    special = special_ids(tokenizer)
    added = {i: a.content for i, a in tokenizer.added_tokens_decoder.items() if not a.special}
    alphabet = _byte_level_alphabet()
    out: list[bytes | None] = [None] * len(tokenizer)
    for token, index in tokenizer.get_vocab().items():
        if index >= len(out) or index in special:
            continue
        if index in added:
            out[index] = added[index].encode()
        elif how == "byte_level":
            out[index] = bytes(alphabet[c] for c in token) if all(c in alphabet for c in token) else token.encode()
        else:
            byte = _BYTE_TOKEN.match(token)
            out[index] = bytes([int(byte.group(1), 16)]) if byte else token.replace(SENTENCEPIECE_SPACE, " ").encode()
    return out
