"""The trained tiny model for the tool tests, and the MCP server configs it was trained for.

Random weights never call a tool, so the tool tests use a tiny model trained (in seconds, on the
CPU) to reproduce a handful of transcripts: a user asks, the assistant emits a tool call in the
model's own format, the tool answers, the assistant answers using the result. The transcripts
are built from the *live* servers: their tool schemas come from ``MCPHost.tools()`` and their
results from ``MCPHost.call_tool`` — the very code the daemon runs — and rendered with
``llm_server.model_worker.chat``, so what the model memorised is byte-for-byte what the daemon will show it.
"""

from __future__ import annotations

import asyncio
import copy
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinymodel import Conversation, cached_trained_model

from llm_server.common.servers import parse_servers
from llm_server.common.protocol import prompt_messages
from llm_server.model_worker.chat import ToolCall, assistant_message, tool_message, withdraw_tool_results
from llm_server.model_worker.mcp_host import MCPHost

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
CALC_SERVER = TESTS / "servers" / "calc_server.py"
SYSTEM_PROMPT = "You are a helpful assistant."
TOOL_TIMEOUT_S = 1.0
MAX_TOOL_ROUNDS = 2
FILE_TEXT = "The launch code is 4242.\n"
# More than the tiny model's 16384-token context window holds, in any tokenization.
BIG_REPORT_CHARS = 200_000
UNKNOWN_TOOL_PROMPT = "What is 2 times 3?"  # the model calls 'multiply', a tool nobody offers
BAD_MARKUP_PROMPT = "Add two and three."  # the model writes a tool call that does not parse
BAD_MARKUP = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}\n</tool_call>'  # a brace short
BLANK_PROMPT = "Say nothing."
BLANK_ANSWER = "   "  # an answer of whitespace only
INDENTED_PROMPT = "Indent your greeting."
INDENTED_ANSWER = "  Hello!"  # leading whitespace


def filesystem_server_binary() -> str:
    """The npm filesystem server that tests/run.sh installs (or LLM_SERVER_FS_SERVER)."""
    path = os.environ.get("LLM_SERVER_FS_SERVER") or str(
        ROOT / ".test-deps" / "npm" / "node_modules" / ".bin" / "mcp-server-filesystem"
    )
    if not os.access(path, os.X_OK):
        raise AssertionError(
            f"{path} is missing: run tests/run.sh, which installs @modelcontextprotocol/server-filesystem"
        )
    return path


def calc_servers() -> dict[str, Any]:
    return {"calc": {"command": sys.executable, "args": [str(CALC_SERVER)]}}


def time_servers() -> dict[str, Any]:
    return {"time": {"command": sys.executable, "args": ["-m", "mcp_server_time", "--local-timezone", "UTC"]}}


def files_servers(folder: Path) -> dict[str, Any]:
    return {"files": {"command": filesystem_server_binary(), "args": [str(folder)]}}


@dataclass(frozen=True)
class Turn:
    """One scripted exchange: tool calls in order (name, arguments), then the final answer.

    `bare` is for requests in which the tools disappear: after the first `bare[0]` calls the
    daemon renders the conversation without tools (the round limit, or the server died), and the
    model is trained to answer `bare[1]` there, as it would in that exact prompt.
    """

    prompt: str
    calls: tuple[tuple[str, dict[str, Any]], ...]
    answer: str
    bare: tuple[int, str] | None = None
    overflow: bool = False  # the results overflow the context window (see ToolLoop)


CALC_TURNS = (
    Turn("Say hello.", (), "Hello! How can I help you today?"),
    Turn("What is 2 + 3?", (("add", {"a": 2, "b": 3}),), "2 + 3 = 5."),
    Turn("Wait for 5 seconds.", (("slow", {"seconds": 5}),), "The wait did not finish in time."),
    Turn(
        "Echo hello again and again.",
        (("echo", {"text": "hello"}),) * 3,
        "I echoed hello three times.",
        bare=(MAX_TOOL_ROUNDS, "I echoed hello twice."),
    ),
    Turn(
        "Please crash the calculator.", (("crash", {}),), "The calculator crashed.", bare=(1, "The calculator crashed.")
    ),
    Turn("What is 2 + 3?", (), "I cannot add right now.", bare=(0, "I cannot add right now.")),
    Turn(
        "Read me the big report.",
        (("big", {"size": BIG_REPORT_CHARS}),),
        "The report is too large for me to read.",
        overflow=True,
    ),
    # 'multiply' is offered by nobody: POST / tells the model so (it answers), /v1 hands the call back.
    Turn(UNKNOWN_TOOL_PROMPT, (("multiply", {"a": 2, "b": 3}),), "2 times 3 is 6."),
    Turn(BAD_MARKUP_PROMPT, (), BAD_MARKUP),
    Turn(BLANK_PROMPT, (), BLANK_ANSWER),
    Turn(INDENTED_PROMPT, (), INDENTED_ANSWER),
)
TIME_TURNS = (
    Turn(
        "What time is it in Tokyo when it is 12:00 in UTC?",
        (("convert_time", {"source_timezone": "UTC", "time": "12:00", "target_timezone": "Asia/Tokyo"}),),
        "When it is 12:00 in UTC, it is 21:00 in Tokyo.",
    ),
)


def files_turns(folder: Path) -> tuple[Turn, ...]:
    return (
        Turn(
            "What does notes.txt say?",
            (("read_text_file", {"path": str(folder / "notes.txt")}),),
            "notes.txt says: The launch code is 4242.",
        ),
        Turn(
            "Which files are in the folder?",
            (("list_directory", {"path": str(folder)}),),
            "The folder holds one file: notes.txt.",
        ),
    )


async def _transcripts(servers: dict[str, Any], turns: tuple[Turn, ...]) -> list[Conversation]:
    """Run each turn's calls against the live servers and record the whole conversation."""
    conversations: list[Conversation] = []
    host: MCPHost | None = None
    try:
        for turn in turns:
            # A fresh host once a server is gone ('crash' kills its own): each transcript needs
            # the tool list as the daemon shows it at the start of a request.
            if host is None or any(status.state != "up" for status in host.status().values()):
                if host is not None:
                    await host.aclose()
                host = MCPHost(parse_servers(servers), tool_timeout_s=TOOL_TIMEOUT_S, restart=False)
                await host.start()
            conversations += await _record(host, turn)
    finally:
        if host is not None:
            await host.aclose()
    return conversations


async def _record(host: MCPHost, turn: Turn) -> list[Conversation]:
    """One turn's conversation(s), with the calls made for real."""
    tools = host.tools()
    assert tools, f"no tools: {host.status()}"
    messages = prompt_messages(SYSTEM_PROMPT, turn.prompt)
    for n, (name, arguments) in enumerate(turn.calls):
        call = ToolCall(name, arguments, id=f"call_{n}")
        result = await host.call_tool(name, arguments)
        messages += [assistant_message("", [call]), tool_message(call, result.text, result.is_error)]
    if turn.overflow:
        # The daemon withdraws results that overflow the window and drops the tools: train the
        # call in the prompt with tools, and the answer in the prompt it then renders.
        start = len(prompt_messages(SYSTEM_PROMPT, turn.prompt))
        withdrawn = copy.deepcopy(messages)
        withdraw_tool_results(withdrawn)
        return [
            Conversation(messages[: start + 1], tools),
            Conversation([*withdrawn, {"role": "assistant", "content": turn.answer}], None),
        ]
    conversations = []
    if turn.bare is not None:  # the same calls, then the answer in the prompt without tools
        done = 2 * turn.bare[0] + len(prompt_messages(SYSTEM_PROMPT, turn.prompt))
        conversations.append(Conversation([*messages[:done], {"role": "assistant", "content": turn.bare[1]}], None))
    if turn.calls or turn.bare is None:
        conversations.append(Conversation([*messages, {"role": "assistant", "content": turn.answer}], tools))
    return conversations


def build_tool_model(cache_root: Path, files_folder: Path) -> Path:
    """Train (or reuse) the model that knows every scripted exchange above."""
    (files_folder / "notes.txt").write_text(FILE_TEXT)

    async def collect() -> list[Conversation]:
        return [
            *await _transcripts(calc_servers(), CALC_TURNS),
            *await _transcripts(time_servers(), TIME_TURNS),
            *await _transcripts(files_servers(files_folder), files_turns(files_folder)),
        ]

    conversations = asyncio.run(collect())
    return cached_trained_model(cache_root, conversations, seed=0)
