"""docs/asyncio.md's FastAPI app and its test, run as the page shows them, through the
plugin's ``sharded_counter_aio_env`` fixture (pytest-asyncio), on both engines."""

from __future__ import annotations

import asyncio
import sys
import time
import types
from pathlib import Path
from typing import Any

import httpx
import pytest

from sharded_counter.aio import AsyncCounter

pytestmark = [pytest.mark.backends, pytest.mark.asyncio]

PAGE = Path(__file__).resolve().parents[1] / "docs" / "asyncio.md"


def code_of(heading: str) -> str:
    section = PAGE.read_text(encoding="utf-8").split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.fixture
def app_module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The page's app, importable as ``app`` (as its test imports it)."""
    module = types.ModuleType("app")
    exec(compile(code_of("A FastAPI endpoint"), "docs/asyncio.md", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, "app", module)
    return module


async def test_the_pages_test_passes(
    sharded_counter_aio_env: dict[str, str], app_module: types.ModuleType
) -> None:
    namespace: dict[str, Any] = {}
    exec(compile(code_of("Testing it"), "docs/asyncio.md", "exec"), namespace)
    await namespace["test_hits_are_counted"](sharded_counter_aio_env)


async def test_concurrent_requests_count_exactly_and_the_limit_answers_429(
    sharded_counter_aio_env: dict[str, str], app_module: types.ModuleType
) -> None:
    transport = httpx.ASGITransport(app=app_module.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        answers = await asyncio.gather(
            *(client.post("/pages/home/hit", params={"client": f"c{i % 4}"}) for i in range(80))
        )
        assert [a.status_code for a in answers] == [200] * 80
        assert (await client.get("/pages/home")).json() == {"page": "home", "hits": 80}
        # 101 hits inside one window of the minute: start with a few seconds of it left.
        left = 60 - time.time() % 60
        if left < 5:
            await asyncio.sleep(left + 0.05)
        statuses = [
            (await client.post("/pages/away/hit", params={"client": "greedy"})).status_code
            for _ in range(101)
        ]
        assert statuses == [200] * 100 + [429]
    assert await AsyncCounter("page:away").get_count(nocache=True) == 100


async def test_the_readme_example_counts(sharded_counter_aio_env: dict[str, str]) -> None:
    readme = (PAGE.parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### asyncio\n", 1)[1].split("\n## ", 1)[0]
    namespace: dict[str, Any] = {}
    source = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(source, "README.md", "exec"), namespace)
    transport = httpx.ASGITransport(app=namespace["app"])
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for _ in range(3):
            assert (await client.post("/pages/readme/hit")).json() == {"page": "readme"}
    assert await AsyncCounter("page:readme").get_count() == 3
