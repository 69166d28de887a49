"""Shared fixtures: the tiny real model and daemons started in temp working directories."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["HF_HUB_OFFLINE"] = "1"
# Built test models live beside the user's other caches, so every checkout shares them (keyed by
# what they were built from; see tinymodel.cached_model_dir).
TEST_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llm-server-tests"

from daemon import Daemon, base_config  # noqa: E402
from tinymodel import never_stop, write_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny Qwen2-style model with a real tokenizer and chat template.

    Its end-of-turn embedding row is zeroed (embeddings are tied, so that token's logit is
    always 0 while the best other logit is positive): greedy decoding never stops early, and
    every answer is exactly ``max_tokens`` long, which makes in-flight timing predictable.
    """
    folder = write_tiny_model(tmp_path_factory.mktemp("model") / "tiny", seed=0)
    never_stop(folder)
    return folder


@pytest.fixture
def make_daemon(tmp_path: Path, tiny_model: Path) -> Iterator[Callable[..., Daemon]]:
    """Build daemons in this test's temp folder; every one is killed at teardown if still alive."""
    made: list[Daemon] = []

    def make(config: dict | None = None, *, env: dict[str, str] | None = None, name: str = "daemon",
             **overrides: object) -> Daemon:
        if config is None:
            config = base_config(tiny_model, 0, **overrides)
        daemon = Daemon(tmp_path / name, config, env)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.kill_all()


@pytest.fixture(scope="session")
def files_folder() -> Path:
    """The folder the filesystem MCP server may see (holds notes.txt). Its path is part of the
    trained transcripts, so it is fixed per user, not per checkout: a fresh clone (CI) reuses
    the trained model."""
    folder = TEST_CACHE / "files"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def tool_model(files_folder: Path) -> Path:
    """A tiny model trained to call the test servers' tools (cached across sessions)."""
    from tool_model import build_tool_model

    return build_tool_model(TEST_CACHE / "models", files_folder)
