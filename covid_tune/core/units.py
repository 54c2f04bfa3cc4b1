"""Quantities as people read them: durations and sizes."""

from __future__ import annotations


def duration(seconds: float | None) -> str:
    """``1hr 40min``, ``3min 5s`` or ``12s``."""
    if seconds is None:
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}hr {minutes}min"
    return f"{minutes}min {secs}s" if minutes else f"{secs}s"


def parse_duration(text: str) -> float | None:
    """Seconds in ``90``, ``45s``, ``30m``, ``2h`` or ``1h30m``; None if it is not one."""
    import re

    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*"
                         r"(?:(\d+(?:\.\d+)?)s?)?\s*", str(text))
    if not parts or not any(parts.groups()):
        return None
    hours, minutes, seconds = (float(g) if g else 0.0 for g in parts.groups())
    total = 3600 * hours + 60 * minutes + seconds
    return total if total > 0 else None


def human_bytes(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return ""


# --- the selection split: a seeded, stratified part of Train ---------------------------
