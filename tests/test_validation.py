"""Request body parsing (the 400 cases are also covered end to end in test_http_contract)."""

from __future__ import annotations

import pytest

from llm_server.common.protocol import FailureCategory, http_status
from llm_server.http.validation import BadRequest, parse_prompt


def test_valid_prompt_and_extra_fields() -> None:
    assert parse_prompt(b'{"prompt": "hi", "other": 1}') == "hi"
    assert parse_prompt('{"prompt": "\u00e9\U0001F600"}'.encode()) == "\u00e9\U0001F600"
    assert parse_prompt(b'{"prompt": "\\ud83d\\ude00"}') == "\U0001F600"  # a valid surrogate pair


@pytest.mark.parametrize("body", [b"", b"{", b"[]", b'{"prompt": 1}', b'{"prompt": " "}', b'{"prompt": NaN}',
                                  b'{"prompt": "\\udc00"}', b"\xc3\x28", b"[" * 50000])
def test_rejections(body: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_prompt(body)


def test_status_mapping_is_the_one_place() -> None:
    assert http_status(FailureCategory.BAD_REQUEST) == 400
    assert http_status(FailureCategory.INTERNAL) == 500
    assert http_status(FailureCategory.UNAVAILABLE) == 503
