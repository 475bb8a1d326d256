"""One home for turning numbers into text: durations, p-values, intervals, percentages and SI prefixes.

Reports, cost tables and CLI summaries all format through here, so a figure reads the same everywhere.
"""

from __future__ import annotations

import math

from data_schemas.metrics import MetricValue


def fmt(value: float | None, digits: int = 3) -> str:
    """A number with `digits` decimals, '—' when missing or not finite."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}f}"


def fmt_ci(mv: MetricValue | None, digits: int = 3) -> str:
    """'0.912 (0.871–0.944)', or just the value when the interval is missing; a zero-width interval (every
    resample gave the same value, as at perfect separation in a small sample) is not estimable, never certainty."""
    if mv is None or mv.value is None:
        return "—"
    if mv.ci_low is None or mv.ci_high is None or not (math.isfinite(mv.ci_low) and math.isfinite(mv.ci_high)):
        return fmt(mv.value, digits)
    if mv.ci_high - mv.ci_low <= 1e-12:
        return f"{mv.value:.{digits}f} (interval not estimable)"
    return f"{mv.value:.{digits}f} ({mv.ci_low:.{digits}f}–{mv.ci_high:.{digits}f})"


def format_duration(seconds: float | None) -> str:
    """Short human duration: '42 s', '12.5 min', '3.1 h', '13.4 d', '2.1 y'; '—' when missing."""
    if seconds is None or not math.isfinite(seconds):
        return "—"
    if seconds < 120:
        return f"{seconds:.0f} s" if seconds >= 1 else f"{seconds:.2f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds < 730 * 86400:
        return f"{seconds / 86400:.1f} d"
    return f"{seconds / (365.25 * 86400):.1f} y"


def fmt_si(value: float | None, unit: str = "") -> str:
    """'4.1 G' style engineering notation, '—' when missing."""
    if value is None or not math.isfinite(value):
        return "—"
    for factor, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.1f} {prefix}{unit}"
    return f"{value:.1f} {unit}".rstrip()


def fmt_p(p_value: float | None) -> str:
    """'0.004', '0.41' or '< 0.001'."""
    if p_value is None:
        return "—"
    if p_value < 0.001:
        return "< 0.001"
    return f"{p_value:.3f}" if p_value < 0.01 else f"{p_value:.2f}"


def fmt_pct(value: float | None) -> str:
    """'31%' or '—'."""
    return "—" if value is None else f"{100 * value:.0f}%"


def fmt_ratio(actual: float | None, estimate: float | None) -> str:
    """actual / estimate as '1.09×', '—' when either is missing."""
    if actual is None or not estimate:
        return "—"
    return f"{actual / estimate:.2f}×"


_MD_SPECIAL = "\\`*_[]|~"  # inline emphasis, code, links, tables, strikethrough


def md_escape(value: object) -> str:
    """User-supplied text made inert in Markdown: HTML characters as entities, Markdown punctuation backslash-escaped,
    newlines as spaces, so a label name or a reason can neither inject HTML nor break a table."""
    text = str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = "".join("\\" + ch if ch in _MD_SPECIAL else ch for ch in text)
    return " ".join(text.splitlines())
