"""Turning a request body into a prompt, strictly.

Sanic's ``request.json`` is lenient (it accepts ``NaN``, for one), so bodies are decoded here
with the standard library: UTF-8 only, no non-standard constants, no pathological nesting, and no
lone surrogates that would poison the tokenizer. Each rejection says what was wrong.
"""

from __future__ import annotations

import json
from typing import Any


class BadRequest(ValueError):
    """The body cannot be served; the message goes back to the client as ``{"Error": ...}``."""


def _reject_constant(name: str) -> Any:
    raise BadRequest(f"body is not valid JSON: {name} is not a JSON value")


def parse_prompt(body: bytes) -> str:
    """Return the ``prompt`` of a JSON object body, or raise ``BadRequest``."""
    if not body:
        raise BadRequest("body is empty; expected a JSON object with a string 'prompt'")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"body is not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        document = json.loads(text, parse_constant=_reject_constant)
    except BadRequest:
        raise
    except RecursionError:
        raise BadRequest("body is not valid JSON: nested too deeply") from None
    except ValueError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise BadRequest(f"body must be a JSON object, not {_json_type(document)}")
    if "prompt" not in document:
        raise BadRequest("body has no 'prompt' field")
    prompt = document["prompt"]
    if not isinstance(prompt, str):
        raise BadRequest(f"'prompt' must be a string, not {_json_type(prompt)}")
    if not prompt.strip():
        raise BadRequest("'prompt' is empty")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("'prompt' contains an unpaired UTF-16 surrogate escape") from None
    return prompt


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), type(value).__name__)
