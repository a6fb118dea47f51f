"""An idle model gives back what long inputs took (issue 11, item 13).

Measured on the model's own process (``MODEL_ISOLATION=process``), so nothing else in the
test process blurs its resident memory.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import psutil
import pytest

from ai_platform.operations import Message
from ai_platform.runtime.model_process import ModelProcess
from ai_platform.runtime.served_model import ModelOptions

pytestmark = [pytest.mark.anyio, pytest.mark.demo_model]

LONG = "The quarterly report covers revenue, costs, hiring and the outlook for next year. " * 40  # ~800 tokens
MB = 2**20


def rss(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / MB


async def test_memory_returns_near_its_warm_level_once_idle(demo_model_dir: Path) -> None:
    model = ModelProcess("demo", demo_model_dir, ModelOptions(execution_provider="cpu", prefix_cache_bytes=0))
    await model.start()
    assert model.pid is not None
    try:
        await model.generate([Message("user", "Say hi.")], 4)
        await asyncio.sleep(0.5)
        warm = rss(model.pid)
        peak = warm
        for round_ in range(2):
            text = f"{LONG} ({round_})"
            await model.choose([Message("user", f"Classify: {text}")], ["business", "sports", "politics and law"])
            calls = [model.generate([Message("user", f"Summarize: {text} {k}")], 8) for k in range(4)]
            await asyncio.gather(*calls)
            peak = max(peak, rss(model.pid))
        deadline = time.monotonic() + 10
        while rss(model.pid) - warm > 100 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        idle = rss(model.pid)
        assert peak - warm > 100, f"the long inputs did not use memory ({warm:.0f} -> {peak:.0f} MB): no test"
        assert idle - warm <= 100, f"idle at {idle:.0f} MB, warm {warm:.0f} MB, peak {peak:.0f} MB"
    finally:
        await model.close()
