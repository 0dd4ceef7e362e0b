"""LLM: the offline, synchronous API.

llm = LLM(model="demo", device="cpu", dtype="float32")
outs = llm.generate(["Hello"], SamplingParams(max_tokens=16, temperature=0.0))
outs[0].outputs[0].text

With ``tensor_parallel_size=N`` the engine is rank 0 of a replica group whose other ranks are Ray
actors in a placement group (a local Ray starts when none is running); ``tp_launcher=
"processes"`` starts them as local processes instead, without Ray. ``shutdown()`` (or a ``with``
block) stops them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from .async_engine import AsyncEngine
from .config import EngineConfig
from .engine import EngineCore, Prompt
from .outputs import Delta, RequestOutput
from .sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str = "demo", **kwargs: Any) -> None:
        self.config = EngineConfig(model=model, **kwargs)
        self.engine = EngineCore(self.config)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion, batched; outputs come back in prompt order."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        if not prompts:
            raise ValueError("prompts is empty")
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        # Validate everything before queueing anything, so a bad prompt fails the call cleanly.
        groups = [
            self.engine.make_request(p, sp or SamplingParams())
            for p, sp in zip(prompts, params_list, strict=True)
        ]
        for group in groups:
            self.engine.submit(group)
        while self.engine.has_work():
            self.engine.step()
        return [self.engine.build_output(g) for g in groups]

    async def stream(self, prompts: list[Prompt],
                     params: SamplingParams | None = None) -> AsyncIterator[tuple[int, Delta]]:
        """Run every prompt at once, batched, and yield ``(prompt index, delta)`` as the
        deltas come. Prompts are validated first: a bad one raises before anything runs."""
        params = params or SamplingParams()
        for prompt in prompts:
            self.engine.make_request(prompt, params)
        engine = AsyncEngine(self.config, core=self.engine)
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def one(i: int, prompt: Prompt) -> None:
            try:
                async for d in engine.generate(prompt, params):
                    queue.put_nowait((i, d))
            finally:
                queue.put_nowait(done)

        tasks = [asyncio.create_task(one(i, p)) for i, p in enumerate(prompts)]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is done:
                    remaining -= 1
                else:
                    yield item
            await asyncio.gather(*tasks)  # a request that failed raises here
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def stats(self) -> dict[str, float]:
        return self.engine.stats()

    def shutdown(self) -> None:
        """Stop the replica group's other ranks (a no-op with tensor_parallel_size 1)."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
