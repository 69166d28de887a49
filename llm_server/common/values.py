"""Whether a JSON value is a number or an integer within bounds: the one test that request
bodies (``http/validation.py``) and the config (``common/config.py``) both apply.

Each caller words its own message and raises its own error (a 400 naming the field, a config
error naming the file and key); what counts as acceptable is decided here alone.
"""

from __future__ import annotations

import math
from typing import Any, TypeGuard


def is_number(value: Any, low: float, high: float, *, low_open: bool = False) -> TypeGuard[int | float]:
    """An int or float, not a bool (``True`` is an int to Python, not a number to a client), not
    NaN or infinite (JSON has neither; Python's parser lets them in), with ``low <= value <= high``
    (``low < value`` when ``low_open``). Ints are compared as they are: ``math.isfinite`` would
    raise ``OverflowError`` on one too big for a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return (value > low if low_open else value >= low) and value <= high


def is_integer(value: Any, low: int, high: int) -> TypeGuard[int]:
    """An int, not a bool, with ``low <= value <= high`` (``1.0`` is not an integer here)."""
    return not isinstance(value, bool) and isinstance(value, int) and low <= value <= high
