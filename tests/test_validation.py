"""Request body parsing (the 400 cases are also covered end to end in test_http_contract)."""

from __future__ import annotations

import pytest

from llm_server.common.protocol import FailureCategory, Options, http_status
from llm_server.http.validation import BadRequest, parse_prompt_request


def test_valid_prompt_and_extra_fields() -> None:
    assert parse_prompt_request(b'{"prompt": "hi", "other": 1}').prompt == "hi"
    assert parse_prompt_request('{"prompt": "\u00e9\U0001F600"}'.encode()).prompt == "\u00e9\U0001F600"
    assert parse_prompt_request(b'{"prompt": "\\ud83d\\ude00"}').prompt == "\U0001F600"  # a valid surrogate pair


@pytest.mark.parametrize("body", [b"", b"{", b"[]", b'{"prompt": 1}', b'{"prompt": " "}', b'{"prompt": NaN}',
                                  b'{"prompt": "\\udc00"}', b"\xc3\x28", b"[" * 50000])
def test_rejections(body: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_prompt_request(body)


def test_status_mapping_is_the_one_place() -> None:
    assert http_status(FailureCategory.BAD_REQUEST) == 400
    assert http_status(FailureCategory.INTERNAL) == 500
    assert http_status(FailureCategory.UNAVAILABLE) == 503


def test_per_request_options_are_read() -> None:
    parsed = parse_prompt_request(
        b'{"prompt": "hi", "stream": true, "temperature": 0.7, "top_p": 0.9, "min_p": 0.05, "max_tokens": 12,'
        b' "system_prompt": ""}'
    )
    options = parsed.options
    assert (options.stream, options.temperature, options.top_p, options.min_p, options.max_tokens) == (
        True, 0.7, 0.9, 0.05, 12
    )
    assert parsed.system_prompt == ""  # an empty one means "no system turn", not "the config's"
    assert parse_prompt_request(b'{"prompt": "hi"}').options == Options()


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", '"hot"'), ("temperature", "-1"), ("top_p", "0"), ("top_p", "1.5"), ("min_p", "2"),
     ("max_tokens", "0"), ("max_tokens", "1.5"), ("max_tokens", "true"), ("stream", '"yes"'),
     ("system_prompt", "3")],
)  # fmt: skip
def test_bad_options_are_400s_naming_the_field(field: str, value: str) -> None:
    with pytest.raises(BadRequest, match=f"'{field}'") as caught:
        parse_prompt_request(f'{{"prompt": "hi", "{field}": {value}}}'.encode())
    assert caught.value.param == field
