"""Filters of the operator's dashboard."""

from __future__ import annotations

from typing import Any

from django import template

register = template.Library()


@register.filter
def duration(seconds: float | str | None) -> str:
    """Seconds as an operator reads them: "45 s", "3 min 20 s", "2 h 5 min", "3 d 4 h"; "-" for none."""
    if seconds is None or seconds == "":
        return "-"
    total = round(float(seconds))
    if total < 60:
        return f"{total} s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


@register.filter
def sum_of(values: list[int] | None) -> int:
    """The sum of a list of counts (a chart's bars)."""
    return sum(values or ())


@register.filter
def get(mapping: dict[str, Any] | None, key: str) -> Any:
    """`mapping[key]`, or None (a template cannot index a dict by a variable)."""
    return (mapping or {}).get(key)
