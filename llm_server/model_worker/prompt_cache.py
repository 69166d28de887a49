"""The engine's prompt cache: finished sequences' KV caches, so repeated prefixes are not computed again.

Every finished generation leaves its KV cache in mlx-lm's ``LRUPromptCache`` (bounded by
``prompt_cache_mb``), keyed by its tokens. A new prompt starts from the cache of the longest
shared prefix (a trimmed copy), so the system prompt and tool schemas that every request repeats,
and the earlier rounds of a tool-calling conversation, are not computed again. Made and used on
the MLX thread only. Off in a distributed group (its eviction goes by bytes, which differ between
the ranks' shards, so the ranks would fall out of step).
"""

from __future__ import annotations

from typing import Any

_CACHE_KEY = "model"  # LRUPromptCache keys entries by model too; this engine has one


class PromptCache:
    """mlx-lm's ``LRUPromptCache`` within a byte budget; with a budget of 0 it is off."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lru: Any = None
        if max_bytes > 0:
            from mlx_lm.models.cache import LRUPromptCache

            self._lru = LRUPromptCache(max_bytes=max_bytes)

    def cached_prefix(self, prompt: list[int]) -> tuple[Any, list[int]]:
        """The KV cache of the longest cached prefix of `prompt` (a copy) and the tokens left."""
        if self._lru is None:
            return None, prompt
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        cache, rest = self._lru.fetch_nearest_cache(_CACHE_KEY, prompt)
        if cache is not None and not rest:  # all of it cached: the last token must still run
            if not can_trim_prompt_cache(cache):
                return None, prompt
            trim_prompt_cache(cache, 1)
            rest = prompt[-1:]
        return cache, rest

    def remember(self, generator: Any, tokens: list[int], cache: Any) -> None:
        """Put a finished sequence's KV cache in the cache, within the byte budget that the
        batch generator's own prompt caches leave."""
        if self._lru is None or cache is None or not tokens:
            return
        self._lru.insert_cache(_CACHE_KEY, tokens, cache)
        self._lru.trim_to(n_bytes=self.max_bytes - generator.prompt_cache_nbytes)

    def clear(self) -> None:
        """Drop every cached KV cache (the model is being freed)."""
        self._lru = None
