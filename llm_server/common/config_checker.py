"""Type and range checks on config values whose messages name the file and the key, and where
a relative path in a config is relative to."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from .config_error import ConfigError
from .values import is_integer, is_number


def resolve_path(config_path: Path, name: str) -> Path:
    """Relative paths in the config are relative to the config file's folder."""
    candidate = Path(name).expanduser()
    return candidate if candidate.is_absolute() else config_path.parent.resolve() / candidate


class Checker:
    """Type and range checks whose messages name the file and the key."""

    _MISSING = object()

    def __init__(self, path: Path, values: Mapping[str, Any]) -> None:
        self.path = path
        self.values = values

    def _get(self, key: str, default: Any) -> Any:
        value = self.values.get(key, self._MISSING)
        if value is self._MISSING:
            if default is self._MISSING:
                raise ConfigError(f"{self.path}: required key '{key}' is missing")
            return default
        return value

    def _fail(self, key: str, what: str) -> ConfigError:
        return ConfigError(f"{self.path}: '{key}' must be {what}")

    def string(self, key: str, *, allow_empty: bool = False, default: Any = _MISSING) -> str:
        value = self._get(key, default)
        if not isinstance(value, str) or (not allow_empty and not value.strip()):
            raise self._fail(key, "a string" if allow_empty else "a non-empty string")
        return value

    def optional_string(self, key: str) -> str | None:
        """Absent or null: None; otherwise a non-empty string (whose value is never quoted)."""
        if self.values.get(key) is None:
            return None
        return self.string(key)

    def optional_integer(self, key: str, low: int, high: int) -> int | None:
        """Absent or null: None; otherwise an integer in range."""
        if self.values.get(key) is None:
            return None
        return self.integer(key, low, high)

    def integer(self, key: str, low: int, high: int, *, default: Any = _MISSING) -> int:
        value = self._get(key, default)
        if not is_integer(value, low, high):
            raise self._fail(key, f"an integer from {low} to {high}")
        return value

    def number(
        self,
        key: str,
        low: float,
        high: float,
        low_open: bool = False,
        default: Any = _MISSING,
    ) -> float:
        value = self._get(key, default)
        if not is_number(value, low, high, low_open=low_open):
            bound = f"> {low}" if low_open else f">= {low}"
            upper = "" if math.isinf(high) else f" and <= {high}"
            raise self._fail(key, f"a number {bound}{upper}")
        return float(value)
