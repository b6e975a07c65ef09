"""How gridlab writes durations and sizes for people: one definition each, used by every command's output."""

from __future__ import annotations


def duration(seconds: float) -> str:
    """Seconds below 2 min, minutes below 2 h, hours below 4 days, days beyond."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 4 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:,.1f} days"


def size(count: float) -> str:
    """Bytes in decimal units (kB = 1000 B): "532 B", "1.2 MB", "3,400.0 TB"."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:,.0f} {unit}" if unit == "B" else f"{count:,.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable: TB ends the loop")
