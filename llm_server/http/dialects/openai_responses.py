"""``POST /v1/responses``: the OpenAI Responses API, as the ``openai`` SDK and Codex speak it.

``ResponsesTurn`` renders the ``response`` object — its ``output`` items: a ``reasoning`` item
when the model thought, the ``message`` with its ``output_text``, the client's ``function_call``
items — or its stream of typed events, each with its ``sequence_number``: ``response.created``,
``response.in_progress``, every item ``added``, filled (``response.output_text.delta``,
``response.reasoning_text.delta``, ``response.function_call_arguments.delta``) and ``done``,
then ``response.completed`` (``response.incomplete`` when ``max_output_tokens`` cut it, as the
API does; ``response.failed`` for an error after the start). A finished response is stored
(``response_store``) unless the request said ``store: false``, for a later request's
``previous_response_id``; an unknown id is a 404. Errors are OpenAI's error object.
"""

from __future__ import annotations

import time
from typing import Any

from ...common.config import Config
from ...common.protocol import Delta, GenerationStats, Reply
from ..response_store import ResponseStore
from ..validation import BadRequest
from .base import Dialect, Turn, sse
from .openai_shapes import error_body
from .responses_request import ResponsesRequest, parse_responses_request


def usage_body(stats: GenerationStats) -> dict[str, Any]:
    return {
        "input_tokens": stats.prompt_tokens,
        "input_tokens_details": {"cached_tokens": stats.cached_tokens},
        "output_tokens": stats.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": stats.prompt_tokens + stats.completion_tokens,
    }


class ResponsesTurn(Turn):
    def __init__(self, request: ResponsesRequest, conversation: list[dict[str, Any]], system: str | None,
                 response_id: str, model: str, store: ResponseStore | None) -> None:  # fmt: skip
        messages = ([{"role": "system", "content": system}] if system else []) + conversation
        super().__init__(messages, request.options)
        self.request = request
        self.conversation = conversation  # what a follow-up continues from (no instructions)
        self.response_id = response_id
        self.model = model
        self.store = store
        self.created = int(time.time())
        self._sequence = 0
        self._output: list[dict[str, Any]] = []  # the stream's items so far
        self._open: dict[str, Any] | None = None  # the item being streamed (message or reasoning)
        self._text = ""

    def _response(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None = None,
                  error: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
        echo = self.request.echo
        body = {
            "id": self.response_id, "object": "response", "created_at": self.created, "status": status,
            "model": self.model, "output": output, "usage": usage, "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": self.request.instructions, "previous_response_id": self.request.previous_response_id,
            "store": self.store is not None, "tools": echo["tools"] or [], "tool_choice": echo["tool_choice"] or "auto",
            "parallel_tool_calls": True if echo["parallel_tool_calls"] is None else echo["parallel_tool_calls"],
            "reasoning": echo["reasoning"], "text": echo["text"] or {"format": {"type": "text"}},
            "temperature": echo["temperature"], "top_p": echo["top_p"], "metadata": echo["metadata"] or {},
            "max_output_tokens": echo["max_output_tokens"], "truncation": "disabled",
        }  # fmt: skip
        return body

    def _items(self, reply: Reply) -> list[dict[str, Any]]:
        status = "incomplete" if reply.finish_reason == "length" else "completed"
        items = []
        if reply.reasoning:
            items.append(self._reasoning_item(reply.reasoning, status))
        if reply.text or not reply.tool_calls:
            items.append(self._message_item(reply.text, status))
        for call in reply.tool_calls:
            items.append({"id": f"fc_{call.id}", "type": "function_call", "call_id": call.id, "name": call.name,
                          "arguments": call.arguments, "status": "completed"})  # fmt: skip
        return items

    def _message_item(self, text: str, status: str) -> dict[str, Any]:
        return {"id": f"msg_{self.response_id[5:]}", "type": "message", "role": "assistant", "status": status,
                "content": [] if status == "in_progress" else [_text_part(text)]}  # fmt: skip

    def _reasoning_item(self, text: str, status: str) -> dict[str, Any]:
        content = [] if status == "in_progress" else [{"type": "reasoning_text", "text": text}]
        return {"id": f"rs_{self.response_id[5:]}", "type": "reasoning", "summary": [], "content": content,
                "status": status}  # fmt: skip

    def _finish(self, reply: Reply) -> tuple[str, list[dict[str, Any]]]:
        """The response's status and output; the conversation stored for a follow-up."""
        status = "incomplete" if reply.finish_reason == "length" else "completed"
        if self.store is not None:
            turn: dict[str, Any] = {"role": "assistant", "content": reply.text}
            if reply.reasoning:
                turn["reasoning_content"] = reply.reasoning
            if reply.tool_calls:
                turn["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                      for c in reply.tool_calls]  # fmt: skip
            self.store.put(self.response_id, self.conversation + [turn])
        return status, self._items(reply)

    def reply(self, reply: Reply) -> dict[str, Any]:
        status, items = self._finish(reply)
        return self._response(status, items, usage_body(reply.stats))

    def _event(self, kind: str, **fields: Any) -> str:
        self._sequence += 1
        return sse({"type": kind, "sequence_number": self._sequence - 1, **fields}, kind)

    def opening(self) -> list[str]:
        response = self._response("in_progress", [])
        return [self._event("response.created", response=response),
                self._event("response.in_progress", response=response)]  # fmt: skip

    def _begin(self, reasoning: bool) -> str:
        index = len(self._output)
        item = self._reasoning_item("", "in_progress") if reasoning else self._message_item("", "in_progress")
        self._open, self._text = item, ""
        self._output.append(item)
        events = self._event("response.output_item.added", output_index=index, item=item)
        part = {"type": "reasoning_text", "text": ""} if reasoning else _text_part("")
        return events + self._event("response.content_part.added", item_id=item["id"], output_index=index,
                                    content_index=0, part=part)  # fmt: skip

    def _end_item(self, status: str) -> str:
        item, self._open = self._open, None
        assert item is not None
        index = len(self._output) - 1
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        if item["type"] == "reasoning":
            part = {"type": "reasoning_text", "text": self._text}
            events = self._event("response.reasoning_text.done", **where, text=self._text)
        else:
            part = _text_part(self._text)
            events = self._event("response.output_text.done", **where, text=self._text, logprobs=[])
        events += self._event("response.content_part.done", **where, part=part)
        item.update(status=status, content=[part])
        return events + self._event("response.output_item.done", output_index=index, item=item)

    def piece(self, delta: Delta) -> str:
        events = ""
        wanted = "reasoning" if delta.reasoning else "message"
        if self._open is None or self._open["type"] != wanted:
            if self._open is not None:
                events += self._end_item("completed")
            events += self._begin(delta.reasoning)
        self._text += delta.text
        assert self._open is not None
        where = {"item_id": self._open["id"], "output_index": len(self._output) - 1, "content_index": 0}
        if delta.reasoning:
            return events + self._event("response.reasoning_text.delta", **where, delta=delta.text)
        return events + self._event("response.output_text.delta", **where, delta=delta.text, logprobs=[])

    def end(self, reply: Reply) -> list[str]:
        status, items = self._finish(reply)
        events = []
        if self._open is not None:
            events.append(self._end_item(status))
        if not any(item["type"] == "message" for item in self._output) and not reply.tool_calls:
            events += [self._begin(False), self._end_item(status)]  # an empty answer: one empty message
        for item in items:
            if item["type"] != "function_call":
                continue
            index = len(self._output)
            self._output.append(item)
            events.append(self._event("response.output_item.added", output_index=index,
                                      item={**item, "arguments": "", "status": "in_progress"}))  # fmt: skip
            events.append(self._event("response.function_call_arguments.delta", item_id=item["id"],
                                      output_index=index, delta=item["arguments"]))  # fmt: skip
            events.append(self._event("response.function_call_arguments.done", item_id=item["id"],
                                      output_index=index, name=item["name"], arguments=item["arguments"]))  # fmt: skip
            events.append(self._event("response.output_item.done", output_index=index, item=item))
        final = self._response(status, self._output, usage_body(reply.stats))
        events.append(self._event("response.completed" if status == "completed" else "response.incomplete",
                                  response=final))  # fmt: skip
        return events

    def failure(self, status: int, message: str) -> str:
        error = {"code": "server_error" if status >= 500 else "invalid_request", "message": message}
        return self._event("response.failed", response=self._response("failed", self._output, error=error))


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class OpenAIResponses(Dialect):
    name = "responses"
    path = "/v1/responses"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.store = ResponseStore()

    def claims(self, path: str) -> bool:
        return path == self.path or path.startswith(self.path + "/")

    def parse(self, body: bytes, request_id: str) -> Turn:
        request = parse_responses_request(body)
        conversation = request.items
        if request.previous_response_id is not None:
            earlier = self.store.get(request.previous_response_id)
            if earlier is None:
                raise BadRequest(f"no stored response {request.previous_response_id!r} (this server keeps the last "
                                 f"{self.store.max_responses}, in memory)", "previous_response_id", 404)  # fmt: skip
            conversation = earlier + conversation
        system = request.instructions if request.instructions is not None else self.config.system_prompt
        return ResponsesTurn(request, conversation, system or None, f"resp_{request_id}",
                             request.model or self.config.served_model_name, self.store if request.store else None)  # fmt: skip

    def error_body(self, status: int, message: str, param: str | None = None) -> dict[str, Any]:
        return error_body(status, message, param)
