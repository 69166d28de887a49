"""The supervisor stays light: it spawns its children by module path and imports none of them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_supervisor_imports_neither_sanic_mcp_nor_mlx() -> None:
    """Before: the arbiter imported the worker and the HTTP app (~800 modules, ~1.3 s)."""
    code = (
        "import sys, llm_server.cli; "
        "print(','.join(m for m in ('sanic', 'mcp', 'mlx', 'mlx_lm', 'anyio', 'httpx', 'llm_server.model_worker', 'llm_server.http') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", out.stdout


PACKAGE = ROOT / "llm_server"
PROCESSES = ("supervisor", "http", "model_worker")
ENTRY = ("cli", "check", "service", "__main__")


def _imports(path: Path) -> set[str]:
    """The ``llm_server`` modules ``path`` imports (absolute names, relative imports resolved)."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.removesuffix(".__init__")
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("llm_server")}


def _layer(module: str) -> str:
    """``common``, a process package's name, or ``entry`` for the top-level modules."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] in ENTRY:
        return "entry"
    return parts[1]


def test_every_import_arrow_points_down() -> None:
    """The house drawn from the imports: entry -> processes -> common, and no process package
    imports another (they meet only through ``common``'s messages)."""
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = _layer(".".join(path.relative_to(ROOT).with_suffix("").parts))
        for target in _imports(path):
            there = _layer(target)
            if there == here or there == "common" or target == "llm_server":
                continue
            if here == "entry" and there in PROCESSES:
                continue
            wrong.append(f"{path.relative_to(ROOT)} ({here}) imports {target} ({there})")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_itself_round_a_circle() -> None:
    """Modules split along their seams import what they share from beneath, never each other."""
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for p in PACKAGE.rglob("*.py")}  # fmt: skip
    graph = {name: {t for t in _imports(path) if t in modules and t != name and not name.startswith(t + ".")}
             for name, path in modules.items()}  # fmt: skip
    circles: list[str] = []
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            circles.append(" -> ".join(trail[trail.index(name):] + [name]))
            return
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, trail + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    assert not circles, "\n".join(circles)
