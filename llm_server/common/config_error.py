"""``ConfigError``, beneath the config's readers (``variables``, ``servers``, ``config``), which
all raise it."""

from __future__ import annotations


class ConfigError(Exception):
    """The configuration cannot be used; the message is meant for the user and names the file
    and the key, so it can be fixed without reading code."""
