"""One way to write numbers people read: money, tokens, durations, scores; and markdown escaping.

Every report, the live view and `flow status` go through these, so the same amount reads the
same wherever it appears.
"""

from __future__ import annotations

import re

# What markdown-it-py acts on inside a line (emphasis, code, links, HTML, tables, strikethrough,
# entities), and `#` where it would start a heading; CommonMark lets each be backslash-escaped,
# and the rest of the text stays readable in the raw file.
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&])")
_MD_HEADING = re.compile(r"(?m)^(\s*)#(?=[#\s]|$)")


def usd(amount: float) -> str:
    """Dollars to four decimals: small per-call costs stay visible."""
    return f"${amount:.4f}"


def tokens(count: int) -> str:
    return f"{count:,}"


def duration(seconds: float | None) -> str:
    """Seconds with one decimal under a minute, then minutes and seconds."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def count(value: float) -> str:
    """A count (of calls), whole when it is (nearly) whole: forecasts average over runs."""
    return f"{value:.0f}" if abs(value - round(value)) < 0.05 else f"{value:.1f}"


def pct(value: float | None) -> str:
    """A signed ratio as a whole percentage; `–` when there is none."""
    return "–" if value is None else f"{value:+.0%}"


def clip(text: str, limit: int) -> str:
    """The first line of `text`, cut at a word boundary (with …) when longer than `limit`."""
    lines = text.strip().splitlines()
    line = lines[0].strip() if lines else ""
    if len(line) <= limit:
        return line
    cut = line[: limit - 1]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip(" ,;:.-—") + "…"


def score(value: float) -> str:
    return f"{value:.1f}"


def md(text: str) -> str:
    """Model or user text made literal in markdown: `__init__.py` stays `__init__.py`."""
    return _MD_HEADING.sub(r"\1\\#", _MD_SPECIAL.sub(r"\\\1", text))
