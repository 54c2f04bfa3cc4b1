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


def human_bytes(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return ""


# --- the selection split: a seeded, stratified part of Train ---------------------------
