"""``${VAR}`` placeholders in the config: the one place that finds them, says where each value
comes from, and fills them in.

A value comes from the environment first, then from ``.env`` beside the config file (read
lazily, once, without touching ``os.environ``). Values are never logged or written anywhere:
``llm-server check`` reports each variable's source, ``llm-server service`` the names the
service will need.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from .config_error import ConfigError

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def names_used(config_path: Path) -> list[str]:
    """The ``${VAR}`` names anywhere in the config file's text, sorted, each once."""
    return sorted(set(_VAR.findall(config_path.read_text(encoding="utf-8"))))


class Variables:
    """The variables a config file can use: the environment, then its folder's ``.env``."""

    def __init__(self, config_path: Path) -> None:
        self.dotenv_path = config_path.parent / ".env"
        self._dotenv: dict[str, str | None] | None = None

    def source(self, name: str) -> str | None:
        """Where ``name``'s value comes from, in words (None: nowhere); never the value."""
        if name in os.environ:
            return "the environment"
        return str(self.dotenv_path) if self._from_dotenv(name) is not None else None

    def value(self, name: str, where: str) -> str:
        """``name``'s value; ``where`` (the key using it) names it in the error if it is unset."""
        if name in os.environ:
            return os.environ[name]
        value = self._from_dotenv(name)
        if value is None:
            raise ConfigError(
                f"'{where}' uses ${{{name}}}, which is set neither in the environment nor in {self.dotenv_path}"
            )
        return value

    def substitute(self, value: Any, where: str = "") -> Any:
        """``value`` with ``${VAR}`` replaced in every string, at any depth (keys are left
        alone); ``where`` is the key path so far, for the error."""
        if isinstance(value, str):
            return _VAR.sub(lambda m: self.value(m.group(1), where or "value"), value)
        if isinstance(value, dict):
            return {k: self.substitute(v, f"{where}.{k}" if where else k) for k, v in value.items()}
        if isinstance(value, list):
            return [self.substitute(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    def _from_dotenv(self, name: str) -> str | None:
        if self._dotenv is None:
            self._dotenv = dict(dotenv_values(self.dotenv_path)) if self.dotenv_path.is_file() else {}
        return self._dotenv.get(name)
