"""Format 3's array semantics: the integers an array stores, and the documented rule back to the values.

Why: format 2 let zarr-python apply two transforms through numcodecs codecs (`numcodecs.delta` on the ids,
`numcodecs.fixedscaleoffset` on the log-probs). They are zarr-python extensions, not Zarr v3 codecs: TensorStore,
zarrs and zarrita refuse to open those arrays at all, so a cache meant for every team's reader was readable by
one library. Format 3 keeps every codec chain within the Zarr v3 core (`bytes`, `blosc`, `crc32c`,
`sharding_indexed`) and stores the transformed integers themselves; the rule that turns them into values is
the array's attribute `ddk_cache_encoding` (one of the two below) and docs/cache-format.md's prose, so any
Zarr v3 reader gets the stored integers and any reader of the page gets the values:

- `{"name": "delta", "axis": -1}`: along the last axis, slot 0 holds the value and slot j > 0 the difference
  from slot j - 1; the values are the cumulative sum (the ids of a position ascend, so every difference is >= 0
  and the padding slots, which repeat the last id, store 0).
- `{"name": "fixed_scale", "scale": S}`: the stored integer is round(value x S), the value integer / S as float32
  (computed in float64, as numcodecs' FixedScaleOffset did: the same values as a format-2 store).

Checksums (`integrity.py`) cover what zarr decodes: here the stored integers. The reader checks each array's
attribute against the layout's before decoding, so an edited scale is refused instead of silently rescaling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ddk_cache.store.metadata import HeaderError

ENCODING_ATTR = "ddk_cache_encoding"
ENCODINGS = ("delta", "fixed_scale")


@dataclass(frozen=True)
class Encoding:
    """How an array's stored integers become its values (`name`: delta or fixed_scale; `scale` for fixed_scale)."""

    name: str
    scale: int | None = None

    def __post_init__(self) -> None:
        if self.name not in ENCODINGS:
            raise HeaderError(f"unknown array encoding {self.name!r} (this ddk-cache knows {', '.join(ENCODINGS)}): upgrade ddk-cache")
        if (self.name == "fixed_scale") != (isinstance(self.scale, int) and not isinstance(self.scale, bool) and self.scale > 0):
            raise HeaderError(f"array encoding {self.name!r} has scale {self.scale!r}: fixed_scale takes a positive integer scale, delta none")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "axis": -1} if self.name == "delta" else {"name": self.name, "scale": self.scale}

    @classmethod
    def from_dict(cls, raw: Any) -> "Encoding":
        if not isinstance(raw, dict) or "name" not in raw:
            raise HeaderError(f"the array attribute {ENCODING_ATTR} is {raw!r}, not an encoding object")
        if raw["name"] == "delta" and raw.get("axis", -1) != -1:
            raise HeaderError(f"delta encoding along axis {raw.get('axis')!r}: ddk-cache writes axis -1 only")
        return cls(raw["name"], raw.get("scale"))

    def encode(self, values: np.ndarray, dtype: str) -> np.ndarray:
        """The integers to store for `values`, as `dtype` (fixed_scale clamps to the dtype's range)."""
        if self.name == "delta":
            ids = np.asarray(values).astype(np.int64)
            stored = ids.copy()
            stored[..., 1:] = np.diff(ids, axis=-1)
            return stored.astype(dtype)
        limit = np.iinfo(dtype)
        return np.clip(np.round(np.asarray(values, dtype=np.float64) * self.scale), -limit.max, limit.max).astype(dtype)

    def decode(self, stored: np.ndarray) -> np.ndarray:
        """The values of stored integers: ids (delta, in the stored dtype) or float32 (fixed_scale)."""
        if self.name == "delta":
            return np.cumsum(stored, axis=-1, dtype=np.int64).astype(stored.dtype)
        return (stored.astype(np.float64) / self.scale).astype(np.float32)


def array_encoding(attributes: Any) -> Encoding | None:
    """The encoding an array's attributes name, None if none (format 1 and 2 arrays, and arrays stored as they are)."""
    raw = dict(attributes).get(ENCODING_ATTR)
    return None if raw is None else Encoding.from_dict(raw)


def decoded(array: Any, rows: Any = slice(None)) -> np.ndarray:
    """Rows of a zarr array as values: its stored integers decoded by its own encoding attribute (if any)."""
    encoding = array_encoding(array.attrs)
    stored = array[rows]
    return stored if encoding is None else encoding.decode(stored)
