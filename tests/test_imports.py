"""The supervisor stays light: it spawns its children by module path and imports none of them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_supervisor_imports_neither_sanic_mcp_nor_mlx() -> None:
    """Before: the arbiter imported the worker and the HTTP app (~800 modules, ~1.3 s)."""
    code = (
        "import sys, llm_server.supervisor.cli; "
        "print(','.join(m for m in ('sanic', 'mcp', 'mlx', 'mlx_lm', 'anyio', 'httpx', 'llm_server.model_worker', 'llm_server.http') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", out.stdout
