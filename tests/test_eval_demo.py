"""``ai-platform eval`` on the demo model (issue 12): the real command, two examples per operation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ai_platform.testing import platform_env

CLI = str(Path(sys.executable).parent / "ai-platform")


@pytest.mark.demo_model
def test_eval_on_the_demo_model(tmp_path: Path, demo_model_dir: Path) -> None:
    env = platform_env(tmp_path, MODELS_DIR=str(demo_model_dir.parent), ENABLED_PLUGINS="summarize,translate,classify")
    env.pop("DEFAULT_MODEL")
    env.update(PATH=os.environ.get("PATH", "/usr/bin:/bin"), HOME=str(tmp_path))
    started = time.monotonic()
    result = subprocess.run(
        [CLI, "eval", "--model", demo_model_dir.name, "--limit", "2", "--json", "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    rows = {r["operation"]: r for r in body["results"]}
    assert sorted(rows) == ["classify", "summarize", "translate"]
    for row in rows.values():
        assert row["model"] == demo_model_dir.name and row["examples"] == 2 and row["errors"] == 0, row
        assert row["precision"] in ("fp32", "int8", "int4")  # from the folder's export.json
        assert 0 <= row["score"] <= 100 and row["latency_ms"]["p95"] >= row["latency_ms"]["mean"] / 2 > 0
        assert all(run["response"] is not None for run in row["runs"])
    assert rows["classify"]["metric"] == "accuracy" and 0 <= rows["classify"]["details"]["ece"] <= 1
    assert rows["translate"]["metric"] == "chrF" and rows["translate"]["output_tokens_per_second"] > 0
    assert rows["summarize"]["metric"] == "ROUGE-L" and "sentence_compliance" in rows["summarize"]["details"]
    # every classify answer is one of its categories, with the model's confidence
    for run in rows["classify"]["runs"]:
        assert run["response"]["label"] in run["response"]["scores"]
        assert run["judged"]["confidence"] == run["response"]["confidence"]
    assert time.monotonic() - started < 120  # ~30 s on two cores; the budget for this test is ~60 s
