"""Event timestamps: the unit (s, ms, us, ns) detected from magnitude or given, range checks, and unix seconds."""

from __future__ import annotations

import numpy as np
import pandas as pd

EARLIEST = 0  # 1970-01-01T00:00:00Z: earlier times are refused (negative unix times are almost always garbage)
LATEST = 4_102_444_800  # 2100-01-01T00:00:00Z in unix seconds
UNIT_SCALES: dict[str, int] = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
UNIT_NAMES: dict[str, str] = {"s": "seconds", "ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds"}
TIMESTAMP_UNITS: tuple[str, ...] = ("auto", *UNIT_SCALES)
# Smallest value "auto" reads in each unit. 1e11 ms is 1973-03-03 while 1e11 s is year 5138, so a value belongs to
# one unit only; between a unit's 2100 and the next unit's floor (e.g. 4.1e9..1e11) nothing is guessed.
BAND_FLOORS: dict[str, float] = {"s": 0.0, "ms": 1e11, "us": 1e14, "ns": 1e17}


class TimestampError(ValueError):
    """A timestamp that cannot be used; `position` is its index in the column, `hint` explains why."""

    def __init__(self, position: int, what: str, hint: str = "") -> None:
        super().__init__(f"{what}{hint}")
        self.position, self.what, self.hint = position, what, hint


def _first(flags: np.ndarray) -> int:
    """Index of the first True flag."""
    return int(np.flatnonzero(flags)[0])


def _band(value: float) -> str:
    """The unit whose band holds a non-negative value."""
    return [unit for unit, floor in BAND_FLOORS.items() if value >= floor][-1]


def detect_unit(values: np.ndarray) -> str:
    """The unit of a column of finite, non-negative times, from its largest value; mixed units are refused."""
    top = int(np.argmax(values))
    unit = _band(float(values[top]))
    if values[top] / UNIT_SCALES[unit] > LATEST:
        if unit == "ns":
            raise TimestampError(top, "timestamp out of range", " (after 2100 even read as nanoseconds)")
        following = list(UNIT_SCALES)[list(UNIT_SCALES).index(unit) + 1]
        raise TimestampError(top, "ambiguous timestamp", f" (after 2100 as {UNIT_NAMES[unit]}, before 1973 as "
                             f"{UNIT_NAMES[following]}); set timestamp_unit to one of {', '.join(UNIT_SCALES)}")
    other = values < BAND_FLOORS[unit]
    if other.any():
        first = _first(other)
        raise TimestampError(first, "timestamp in another unit", f": it looks like {UNIT_NAMES[_band(values[first])]}"
                             f" while the largest, {values[top]:.0f}, looks like {UNIT_NAMES[unit]} (mixed units?); "
                             "set timestamp_unit to read every value in one unit")
    return unit


def check_range(seconds: np.ndarray, unit_name: str) -> None:
    """Refuse times before 1970 or after 2100 (as read in `unit_name`), naming the first."""
    early, late = seconds < EARLIEST, seconds > LATEST
    if early.any():
        raise TimestampError(_first(early), "timestamp before 1970", f" (read as {unit_name})")
    if late.any():
        raise TimestampError(_first(late), "timestamp after 2100", f" (read as {unit_name})")


def numbers_to_seconds(numeric: pd.Series, unit: str = "auto") -> tuple[np.ndarray, str]:
    """Unix seconds (floored) from numbers in `unit` ("auto": detected), and the unit used.

    Non-finite values, values that overflow int64 and times outside 1970-2100 raise TimestampError.
    """
    if unit not in TIMESTAMP_UNITS:
        raise ValueError(f"timestamp_unit must be one of {', '.join(TIMESTAMP_UNITS)}, got {unit!r}")
    values = numeric.to_numpy(dtype=np.float64)  # (N,) exact below 2**53, enough for every check
    finite = np.isfinite(values)
    if not finite.all():
        raise TimestampError(_first(~finite), "non-finite timestamp")
    if (values < 0).any():
        raise TimestampError(_first(values < 0), "timestamp before 1970")
    if unit == "auto":
        unit = detect_unit(values) if len(values) else "s"
    scale = UNIT_SCALES[unit]
    check_range(values / scale, UNIT_NAMES[unit])
    if numeric.dtype.kind in "iu":  # integers: floor-divide exactly (float would round nanoseconds)
        return numeric.to_numpy(dtype=np.int64) // scale, unit
    return np.floor(values / scale).astype(np.int64), unit
