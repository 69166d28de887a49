"""The side-by-side benchmark's quick mode runs and writes its report (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_compare_quick_mode_writes_a_report(tmp_path: Path) -> None:
    """Scenario:
    1. ``bench/compare.py --quick``: the tiny model, 1 and 4 clients, one round per side, every
       side (stream_generate, BatchGenerator, llm-server, mlx_lm.server) in its own process;
    2. it exits 0 and writes the JSON and Markdown report;
    3. every side answered every request with exactly the requested token count, from the same
       prompt token count, and llm-server had no errors. Speeds are reported, never judged here.
    """
    out = tmp_path / "quick"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compare.py"), "--quick", "--out", str(out),
         "--cache", str(tmp_path / "models")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.with_suffix(".json").read_text())
    assert "| clients |" in out.with_suffix(".md").read_text()
    levels = report["shapes"]["tiny"]["levels"]
    assert set(levels) == {"1", "4"}
    assert set(levels["1"]) == {"stream_generate", "BatchGenerator", "llm-server", "mlx_lm.server"}
    assert set(levels["4"]) == {"BatchGenerator", "llm-server", "mlx_lm.server"}
    for sides in levels.values():
        prompt_counts = {tuple(side["prompt_tokens"]) for side in sides.values()}
        assert len(prompt_counts) == 1, sides  # every side saw the same prompts
        for name, side in sides.items():
            assert side["wrong_token_counts"] == 0, (name, side)
            assert side["tokens_per_s"] > 0, (name, side)
        assert sides["llm-server"]["errors"] == sides["llm-server"]["resets"] == 0
