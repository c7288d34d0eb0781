"""Reports of a run: the terminal summary and the JSON report. They format; they never recompute."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def dig(mapping: Any, *keys: str) -> Any:
    """``mapping[k1][k2]...`` of a report dict, or None where a level is missing or null."""
    for key in keys:
        if not isinstance(mapping, Mapping):
            return None
        mapping = mapping.get(key)
    return mapping
