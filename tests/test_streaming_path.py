"""The streaming path's hops: deltas that are ready travel as one stream item (the engine's
``generate_ready``, the replica's ``coalesce``, the ingress's ``ReplicaStream`` unpacking them),
and ``ingress.engine_in_ingress`` puts the engine in the ingress replica (no replica hop).

Oracles: hand-written wire items, and the offline engine (``LLM``, held to HF transformers by
tests/test_engine_vs_hf.py) for the tokens a stream must carry. The live test of
``engine_in_ingress`` is in tests/test_serve.py (its Serve instance runs such an app too).
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from segserve import LLM, SamplingParams
from segserve.actors.async_engine import AsyncEngine
from segserve.actors.config import EngineConfig
from segserve.deploy.app import build_app
from segserve.deploy.config import ServiceConfig
from segserve.deploy.errors import APIError
from segserve.deploy.replica import coalesce
from segserve.deploy.streams import ReplicaStream, open_stream

ENGINE = {"model": "demo", "device": "cpu", "dtype": "float32", "num_kv_blocks": 64,
          "max_model_len": 256}  # fmt: skip
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPT = [5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def expected() -> list[int]:
    return LLM(**ENGINE).generate([PROMPT], GREEDY)[0].outputs[0].token_ids


# ----- coalescing ------------------------------------------------------------------------------
def test_coalesce_joins_one_sequences_deltas_and_keeps_the_last_ones_end():
    items = [
        {"index": 0, "token_ids": [1], "text": "a", "logprobs": [(1, -0.5, [])],
         "prompt_logprobs": [(9, -1.0, [])]},
        {"index": 0, "token_ids": [2, 3], "text": "bc", "logprobs": [(2, -0.25, []), (3, -1, [])]},
        {"index": 0, "token_ids": [4], "text": "d", "logprobs": [(4, -2.0, [])],
         "finish_reason": "length", "num_cached_tokens": 16},
    ]  # fmt: skip
    assert coalesce(items) == {
        "index": 0, "token_ids": [1, 2, 3, 4], "text": "abcd",
        "logprobs": [(1, -0.5, []), (2, -0.25, []), (3, -1, []), (4, -2.0, [])],
        "prompt_logprobs": [(9, -1.0, [])], "finish_reason": "length", "num_cached_tokens": 16,
    }  # fmt: skip


def test_coalesce_keeps_sequences_apart_in_their_order():
    items = [{"index": 0, "token_ids": [1], "text": "a"},
             {"index": 1, "token_ids": [7], "text": "x"},
             {"index": 1, "token_ids": [8], "text": "y", "finish_reason": "stop"},
             {"index": 0, "token_ids": [2], "text": "b"}]  # fmt: skip
    assert coalesce(items) == [{"index": 0, "token_ids": [1], "text": "a"},
                               {"index": 1, "token_ids": [7, 8], "text": "xy",
                                "finish_reason": "stop"},
                               {"index": 0, "token_ids": [2], "text": "b"}]  # fmt: skip
    one = {"index": 0, "token_ids": [1], "text": "a"}
    assert coalesce([one]) is one


def test_a_consumer_that_falls_behind_gets_every_ready_delta_in_one_item(expected):
    engine = AsyncEngine(EngineConfig(**ENGINE))

    async def main() -> list[list]:
        items = engine.generate_ready(PROMPT, GREEDY, "late")
        first = await items.__anext__()  # the prefill's delta
        # The engine runs to the end, and every later delta reaches the request's queue,
        # before we ask again. (Waiting on has_work() alone races the loop's delivery of the
        # last step, which lands on the event loop after the step's thread returns.)
        queue = engine._queues["late"]
        for _ in range(3000):
            if queue.qsize() == len(expected) - 1:
                break
            await asyncio.sleep(0.01)
        return [first, *[ready async for ready in items]]

    batches = asyncio.run(main())
    assert len(batches) == 2 and len(batches[1]) == len(expected) - 1
    deltas = [d for ready in batches for d in ready]
    assert [t for d in deltas for t in d.token_ids] == expected
    assert deltas[-1].request_done and deltas[-1].finish_reason == "length"
    assert not engine._queues


# ----- the ingress unpacks what the replica coalesced ------------------------------------------
class _Gen:
    """A replica call's items as Serve's DeploymentResponseGenerator gives them."""

    def __init__(self, items: list) -> None:
        self._items = iter(items)
        self.cancelled = False

    async def __anext__(self):
        try:
            return next(self._items)
        except StopIteration:
            raise StopAsyncIteration from None

    def cancel(self) -> None:
        self.cancelled = True


class _Handle:
    def __init__(self, items: list) -> None:
        self.gen = _Gen(items)
        self.generate = self

    def options(self, **_):
        return self

    def remote(self, *_):
        return self.gen


def _prep():
    return SimpleNamespace(prompt_ids=PROMPT, sampling={}, request_id="r", deadline=None,
                           cached_tokens=0, pool=SimpleNamespace(in_flight=0))  # fmt: skip


def test_replica_stream_hands_out_a_lists_deltas_one_by_one():
    a = {"index": 0, "token_ids": [1], "text": "a"}
    b = {"index": 1, "token_ids": [2], "text": "b"}
    c = {"index": 0, "token_ids": [3], "text": "c", "finish_reason": "stop"}
    d = {"index": 1, "token_ids": [4], "text": "d", "finish_reason": "stop",
         "num_cached_tokens": 3}  # fmt: skip
    prep = _prep()

    async def main() -> list:
        stream = await open_stream(_Handle([[a, b], [c, d]]), prep)
        assert prep.pool.in_flight == 1
        return [item async for item in stream]

    assert asyncio.run(main()) == [a, b, c, d]
    assert prep.cached_tokens == 3 and prep.pool.in_flight == 0


def test_an_error_after_a_list_still_fails_the_stream():
    prep = _prep()
    handle = _Handle([[{"index": 0, "token_ids": [1], "text": "a"}],
                      {"error": APIError(500, "boom (request id r)").to_dict()}])  # fmt: skip

    async def main() -> None:
        stream = await open_stream(handle, prep)
        assert isinstance(stream, ReplicaStream)
        assert (await stream.__anext__())["token_ids"] == [1]
        with pytest.raises(APIError) as info:
            await stream.__anext__()
        assert info.value.status == 500

    asyncio.run(main())
    assert handle.gen.cancelled and prep.pool.in_flight == 0


# ----- engine_in_ingress -----------------------------------------------------------------------
ONE_POOL = {
    "models": [{"name": "demo", "path": "demo", "dtype": "float32", "max_model_len": 256}],
    "pools": [{"name": "cpu", "device": "cpu", "num_replicas": 1, "num_kv_blocks": 64,
               "max_num_seqs": 4, "max_queue_len": 8, "cpus_per_replica": 1}],
    "ingress": {"engine_in_ingress": True},
}  # fmt: skip


def test_engine_in_ingress_needs_one_model_on_one_pool():
    two = {**ONE_POOL, "pools": [*ONE_POOL["pools"], {**ONE_POOL["pools"][0], "name": "b"}]}
    with pytest.raises(ValueError, match="engine_in_ingress needs exactly one model"):
        ServiceConfig.model_validate(two)


def test_engine_in_ingress_is_one_deployment_with_the_pools_options():
    ingress = build_app(ONE_POOL)._bound_deployment
    assert ingress.name == "Ingress" and ingress.init_args[1] == {}
    assert ingress.ray_actor_options["num_cpus"] == 1
    cfg = ingress._deployment_config
    assert cfg.num_replicas == 1
    assert cfg.request_router_config.request_router_class.endswith("KVHeadroomRouter")
