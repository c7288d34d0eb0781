"""Validators shared by the configuration (``config.py``) and custom suites (``tasks/suites.py``).

Each returns what is wrong (or the checked value) and leaves raising to its caller, which knows
which error names the key: a pytest usage error for the configuration, a ``SuiteError`` for suites.
No pytest here: ``tasks/`` must not know about pytest.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any, TypeGuard


def is_int(value: Any) -> TypeGuard[int]:
    """An integer that is not a bool (TOML's true is not 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def unknown_key(table: Mapping[str, Any], known: Iterable[str]) -> tuple[str, str] | None:
    """The first key of ``table`` not in ``known``, with a hint ("did you mean ...?"), or None."""
    known = list(known)
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            return key, f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
    return None
