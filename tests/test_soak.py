"""A one-minute soak (bench/soak.py) of the real ``ai-platform serve`` on the demo model.

Mixed operations (with the third-party ``sentiment``), concurrency 1 -> 16 -> 1 with idle
gaps, inputs up to the limits, clients hanging up mid-generation, constant prefix-cache
evictions, limit changes, glibc heap checks: no process may die, no 5xx but 503, no ERROR line
in the server's log, RSS at the end within 10% of RSS after warm-up, and the usage counters must
equal the 200s the client saw.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from support import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.demo_model]

OPERATIONS = ("summarize", "translate", "classify", "sentiment")


def test_one_minute_soak(tmp_path: Path, demo_model_dir: Path) -> None:
    out = tmp_path / "soak.json"
    command = [sys.executable, str(ROOT / "bench" / "soak.py"), "--minutes", "1", "--levels", "1,16,4"]
    command += ["--model", str(demo_model_dir), "--json", str(out)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.is_file(), run.stdout[-4000:] + run.stderr[-4000:]
    summary = json.loads(out.read_text())
    report = run.stdout[-6000:]
    assert summary["crashes"]["count"] == 0, report
    assert summary["unexpected_5xx"] == [], report
    assert summary["transport_errors"] == [], report
    assert summary["bad_bodies"] == [], report
    assert summary["counters"]["match"], report
    for operation in OPERATIONS:
        assert summary["requests"][operation].get("200", 0) > 0, (operation, report)
    assert sum(summary["disconnects_total"].values()) > 0, report
    assert max(phase["clients"] for phase in summary["phases"]) == 16, report
    assert summary["error_log_lines"]["count"] == 0, report
    rss = summary["rss"]
    assert rss["end_mb"] <= rss["after_warmup_mb"] * 1.10, report  # flat within 10% after warm-up
    assert summary["failures"] == [], report
    assert run.returncode == 0, report
