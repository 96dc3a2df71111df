"""The allowed range of every numeric flag, declared once per command and checked before any work.

Why a table and not checks spread through the code: the audit found settings that reverse or break
training and still exit 0 (`--min-lr-ratio -1` turns the schedule into gradient ascent, `--mix 2` gives
cross-entropy the weight -1, a negative `--warmup` or `--clip`). A declared range is visible in one
place, documented by its own error message, and checked for every flag alike, NaN included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ddk_cache.errors import SettingError


@dataclass(frozen=True)
class Range:
    """`low <= value <= high` (either bound optional; `open_low` / `open_high` exclude it)."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def contains(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            return False
        return self.high is None or (value < self.high or (not self.open_high and value == self.high))

    def describe(self) -> str:
        if self.high is None:
            return f"{'>' if self.open_low else '>='} {_number(self.low)}"
        if self.low is None:
            return f"{'<' if self.open_high else '<='} {_number(self.high)}"
        return f"in {'(' if self.open_low else '['}{_number(self.low)}, {_number(self.high)}{')' if self.open_high else ']'}"


POSITIVE = Range(0, open_low=True)
NON_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)
FRACTION = Range(0, 1)  # both ends allowed


def check_ranges(values: dict[str, Any], ranges: dict[str, Range]) -> None:
    """One line for the first flag (by the table's order) outside its range; None means "not given" and passes."""
    for name, allowed in ranges.items():
        value = values[name]
        if value is not None and not allowed.contains(value):
            raise SettingError(f"--{name.replace('_', '-')} must be {allowed.describe()}, got {value}")


def _number(value: float | None) -> str:
    return str(int(value)) if value is not None and float(value).is_integer() else str(value)
