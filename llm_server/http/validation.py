"""Turning request bodies into typed requests, strictly.

Sanic's ``request.json`` is lenient (it accepts ``NaN``, for one), so bodies are decoded here
with the standard library: UTF-8 only, no non-standard constants, no pathological nesting, and no
lone surrogates that would poison the tokenizer. Each rejection says what was wrong and names the
field, so a client can fix its request without reading code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..common.grammars import ANY_OBJECT, SchemaError, check_schema
from ..common.protocol import Options
from ..common.values import is_integer, is_number


class BadRequest(ValueError):
    """The body cannot be served; the message goes back to the client (``param``: the field),
    with ``status`` 400, or 404 for what it names that does not exist (a stored response)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


def _reject_constant(name: str) -> Any:
    raise BadRequest(f"body is not valid JSON: {name} is not a JSON value")


def decode_object(body: bytes, expected: str) -> dict[str, Any]:
    """The JSON object in ``body`` (``expected`` says what it should hold, for the message)."""
    if not body:
        raise BadRequest(f"body is empty; expected a JSON object with {expected}")
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
        raise BadRequest(f"body must be a JSON object, not {json_type(document)}")
    return document


@dataclass(frozen=True)
class PromptRequest:
    """A valid ``POST /`` body."""

    prompt: str
    system_prompt: str | None  # None: the config's
    options: Options


def parse_prompt_request(body: bytes) -> PromptRequest:
    """``POST /``: ``prompt`` (required), and the optional ``stream``, ``system_prompt``,
    ``temperature``, ``top_p``, ``min_p``, ``max_tokens``, ``format`` (``"json"``: the response
    is a JSON object; a JSON Schema: a JSON value valid against it); other fields are ignored."""
    document = decode_object(body, "a string 'prompt'")
    if "prompt" not in document:
        raise BadRequest("body has no 'prompt' field", "prompt")
    prompt = text_field(document, "prompt", required=True)
    assert prompt is not None
    if not prompt.strip():
        raise BadRequest("'prompt' is empty", "prompt")
    fields = Fields(document)
    return PromptRequest(
        prompt,
        text_field(document, "system_prompt"),
        Options(
            max_tokens=fields.integer("max_tokens", 1, 10_000_000),
            temperature=fields.number("temperature", 0.0, 100.0),
            top_p=fields.number("top_p", 0.0, 1.0, low_open=True),
            min_p=fields.number("min_p", 0.0, 1.0),
            stream=fields.boolean("stream") or False,
            answer_schema=_format(document.get("format")),
        ),
    )


def _format(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if value == "json":
        return ANY_OBJECT
    if not isinstance(value, dict):
        raise BadRequest("'format' must be \"json\" or a JSON Schema object", "format")
    return schema_field(value, "format")


def text_field(document: dict[str, Any], name: str, *, required: bool = False, where: str = "") -> str | None:
    """A string field that the tokenizer can take (no unpaired surrogates), or None if absent."""
    label = f"{where}{name}"
    if name not in document or (document[name] is None and not required):
        return None
    value = document[name]
    if not isinstance(value, str):
        raise BadRequest(f"'{label}' must be a string, not {json_type(value)}", label)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"'{label}' contains an unpaired UTF-16 surrogate escape", label) from None
    return value


def joined_text(value: Any, where: str, fields: dict[str, str], separator: str) -> str:
    """A string, or an array of typed text parts joined by ``separator``: ``fields`` maps each
    accepted part type to the field holding its text (the Responses API's content parts, the
    Messages API's text blocks)."""
    if isinstance(value, str):
        return text_field({"v": value}, "v", where=where) or ""
    if not isinstance(value, list):
        raise BadRequest(f"'{where}' must be a string or an array of {', '.join(fields)} parts", where)
    texts = []
    for i, part in enumerate(value):
        at = f"{where}[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in fields:
            raise BadRequest(f"'{at}': {kind!r} parts are not supported here ({', '.join(fields)} are)", at)
        texts.append(text_field(part, fields[kind], required=True, where=f"{at}.") or "")
    return separator.join(texts)


class Fields:
    """Optional typed fields of one JSON object; absent or null is None, a wrong value is a 400."""

    def __init__(self, document: dict[str, Any], where: str = "") -> None:
        self.document = document
        self.where = where

    def _get(self, name: str) -> Any:
        return self.document.get(name)

    def _fail(self, name: str, what: str) -> BadRequest:
        return BadRequest(f"'{self.where}{name}' must be {what}", f"{self.where}{name}")

    def number(self, name: str, low: float, high: float, *, low_open: bool = False) -> float | None:
        value = self._get(name)
        if value is None:
            return None
        if not is_number(value, low, high, low_open=low_open):
            raise self._fail(name, f"a number {'>' if low_open else '>='} {low:g} and <= {high:g}")
        return float(value)

    def integer(self, name: str, low: int, high: int) -> int | None:
        value = self._get(name)
        if value is None:
            return None
        if not is_integer(value, low, high):
            raise self._fail(name, f"an integer from {low} to {high}")
        return value

    def boolean(self, name: str) -> bool | None:
        value = self._get(name)
        if value is None:
            return None
        if not isinstance(value, bool):
            raise self._fail(name, "true or false")
        return value


def schema_field(value: Any, param: str) -> dict[str, Any]:
    """A JSON Schema the answer (or a tool's arguments) must follow: one that the grammar library
    compiles, else a 400 naming the feature it lacks (never an unconstrained answer instead)."""
    try:
        return check_schema(value)
    except SchemaError as exc:
        raise BadRequest(f"'{param}' cannot be enforced: {exc}", param) from None


def json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), type(value).__name__)
