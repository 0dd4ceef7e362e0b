"""The HTTP API's shared path in one process, without Ray: a real ServiceCore whose replica
handles are in-process AsyncEngines (the replica's own wire format, delta_to_wire), so tests
run a request through parse -> prepare -> stream -> render in milliseconds.

tests/test_serve.py runs the same path through Ray Serve for real; these tests cover the many
field combinations that would be slow there.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from segserve.actors.async_engine import AsyncEngine
from segserve.deploy.config import ServiceConfig, engine_config
from segserve.deploy.errors import APIError, engine_error_param
from segserve.deploy.openai_api import CHAT_COMPLETIONS, COMPLETIONS, serve_openai
from segserve.deploy.replica import delta_to_wire
from segserve.deploy.router import deployment_name
from segserve.deploy.service import ServiceCore


class _Call:
    """What ``handle.generate.remote(...)`` returns with ``stream=True``: an async iterator
    with ``cancel()``; errors come as one ``{"error": ...}`` item, as from LLMReplica."""

    def __init__(self, engine: AsyncEngine, prompt_ids: list[int], sampling: dict, rid: str):
        self._it = self._run(engine, prompt_ids, sampling, rid)

    @staticmethod
    async def _run(engine, prompt_ids, sampling, rid):
        from segserve import SamplingParams

        try:
            async for d in engine.generate(prompt_ids, SamplingParams(**sampling), rid):
                yield delta_to_wire(d)
        except ValueError as e:
            yield {"error": APIError(400, str(e), engine_error_param(str(e))).to_dict()}

    def __anext__(self):
        return self._it.__anext__()

    def cancel(self) -> None:
        asyncio.get_running_loop().create_task(self._it.aclose())


class _Handle:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.generate = self

    def options(self, **_: Any) -> _Handle:
        return self

    def remote(self, prompt_ids, sampling, rid) -> _Call:
        return _Call(self.engine, prompt_ids, sampling, rid)


class _Request:
    def __init__(self, body: bytes, headers: dict[str, str] | None = None) -> None:
        self._body = body
        self.headers = headers or {}

    async def body(self) -> bytes:
        return self._body

    async def stream(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self._body), 2**16):  # as an ASGI server hands it over
            yield self._body[start:start + 2**16]


class InProcessService:
    """``post(path, body)`` -> (status, JSON body) or, streamed, the list of SSE payloads."""

    def __init__(self, config: dict[str, Any]) -> None:
        cfg = ServiceConfig.model_validate(config)
        handles = {}
        for m in cfg.models:
            for p in cfg.pools_for(m):
                handles[deployment_name(m.name, p.name)] = _Handle(
                    AsyncEngine(engine_config(m, p)))
        self.core = ServiceCore(cfg, handles, "test")

    def engine(self, model: str) -> AsyncEngine:
        return next(h.engine for name, h in self.core.handles.items()
                    if name.startswith(f"LLM:{model}:"))

    async def post(self, path: str, body: dict[str, Any] | bytes,
                   headers: dict[str, str] | None = None) -> tuple[int, Any]:
        endpoint = {"/v1/completions": COMPLETIONS, "/v1/chat/completions": CHAT_COMPLETIONS}[path]
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        try:
            out = await serve_openai(self.core, endpoint, _Request(raw, headers))
        except APIError as e:
            return e.status, e.body()
        if isinstance(out, dict):
            return 200, out
        events = [chunk async for chunk in out.body_iterator]
        return 200, sse_payloads(events)


def sse_payloads(events: list[str]) -> list[Any]:
    """The JSON of each ``data:`` event, and the final "[DONE]" as the string."""
    out = []
    for event in events:
        assert event.startswith("data: ") and event.endswith("\n\n"), event
        data = event[len("data: "):-2]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out
