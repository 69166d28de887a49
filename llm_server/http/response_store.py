"""The one piece of state the daemon keeps between requests: recent Responses conversations.

The OpenAI Responses API lets a client continue from ``previous_response_id`` instead of sending
the conversation again, so each stored response keeps its whole conversation (without the
``instructions``, which the API does not carry over). Only ``/v1/responses`` uses it, and only
for a request that does not say ``store: false``; ``POST /`` and chat completions stay
stateless. It is bounded — ``MAX_RESPONSES`` responses and ``MAX_CHARS`` characters of
conversation, the least recently used dropped first — lives in the HTTP process's memory, and
is lost when that process restarts (a later ``previous_response_id`` is then a 404).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

MAX_RESPONSES = 256
MAX_CHARS = 64_000_000  # about 64 MB of conversation text in all


class ResponseStore:
    def __init__(self, max_responses: int = MAX_RESPONSES, max_chars: int = MAX_CHARS) -> None:
        self._items: OrderedDict[str, tuple[list[dict[str, Any]], int]] = OrderedDict()
        self._chars = 0
        self.max_responses = max_responses
        self.max_chars = max_chars

    def __len__(self) -> int:
        return len(self._items)

    def get(self, response_id: str) -> list[dict[str, Any]] | None:
        """A copy of the stored conversation (None: unknown, dropped or lost)."""
        found = self._items.get(response_id)
        if found is None:
            return None
        self._items.move_to_end(response_id)
        return json.loads(json.dumps(found[0]))

    def put(self, response_id: str, messages: list[dict[str, Any]]) -> None:
        size = len(json.dumps(messages, ensure_ascii=False))
        if size > self.max_chars:
            return  # larger than the whole store: kept nowhere
        self._items[response_id] = (messages, size)
        self._chars += size
        while len(self._items) > self.max_responses or self._chars > self.max_chars:
            _, (_, dropped) = self._items.popitem(last=False)
            self._chars -= dropped
