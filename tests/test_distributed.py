"""The engine as an MLX distributed group: two ranks over loopback, started by ``mlx.launch``.

Rank 0 shares each turn's submissions with rank 1, both run the same steps on their shard, and
the tokens must be exactly those of one process: alone, batched, handed over from alone to the
batch, after a cancellation, with a stop word. This is the engine's part of serving across
machines; the daemon's is in ``test_distributed_e2e.py`` and ``test_distributed_ssh.py``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

TESTS = Path(__file__).resolve().parent
LAUNCH = Path(sys.executable).parent / "mlx.launch"


@pytest.fixture(scope="module")
def sharded_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny qwen2 model with the weight index ``sharded_load`` reads to fetch a shard."""
    folder = tmp_path_factory.mktemp("sharded") / "tiny"
    shutil.copytree(tiny_model, folder)
    names = mx.load(str(folder / "model.safetensors")).keys()
    index = {"metadata": {}, "weight_map": {name: "model.safetensors" for name in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def run(command: list[str], out: Path) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and out.exists(), done.stdout + done.stderr
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def one_process(sharded_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("single") / "tokens.json"
    return run([sys.executable, str(TESTS / "engine_rank.py"), str(sharded_model), str(out)], out)


@pytest.mark.parametrize("sharding", ["pipeline", "tensor"])
def test_two_ranks_generate_what_one_process_does(
    sharded_model: Path, one_process: dict, tmp_path: Path, sharding: str
) -> None:
    out = tmp_path / "tokens.json"
    command = [str(LAUNCH), "--backend", "ring", "-n", "2", "--hosts", "127.0.0.1", "--",
               sys.executable, str(TESTS / "engine_rank.py"), str(sharded_model), str(out), sharding]  # fmt: skip
    two_ranks = run(command, out)
    assert one_process["cancelled"] is True and one_process["hot_is_answered"] is True
    assert two_ranks == one_process
