"""Faults without a Ray instance: an engine error becomes a 500 naming only the request id, a
dead replica an opaque, retryable 503 (retried once before the first token), and no failure
path leaks engine queues or in-flight counts; one request's fault fails it alone, and a dead
loop or device makes the replica unhealthy. The live checks are in test_faults_live.py."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
from ray.exceptions import ActorDiedError
from segserve.actors import SamplingParams
from segserve.actors.async_engine import AsyncEngine, EngineBroken
from segserve.actors.engine import QueueFull
from segserve.deploy.caller_watch import CallerWatch
from segserve.deploy.errors import APIError
from segserve.deploy.replica import LLMReplica
from segserve.deploy.streams import open_stream, replica_error

ENGINE = dict(model="demo", device="cpu", dtype="float32", num_kv_blocks=64, max_model_len=256,
              max_num_seqs=4, max_queue_len=2)  # fmt: skip
SECRET = "boom in actor 9f3a at 10.1.2.3 pid 4242"


@pytest.fixture(scope="module")
def replica():
    return LLMReplica(ENGINE, "demo", "cpu")


async def _items(replica, request_id, max_tokens=4):
    sampling = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    return [item async for item in replica.generate([1, 2, 3, 4, 5], sampling, request_id)]


def test_engine_error_is_a_500_naming_only_the_request_id(replica, monkeypatch):
    runner = replica.engine.core.runner

    def broken(*args, **kwargs):
        raise RuntimeError(SECRET)

    async def main():
        with monkeypatch.context() as m:
            m.setattr(runner, "execute", broken)
            items = await _items(replica, "req-err-1")
        assert len(items) == 1, items  # no item claims the request finished normally
        err = items[0]["error"]
        assert err["status"] == 500 and "req-err-1" in err["message"]
        for leak in ("9f3a", "10.1.2.3", "4242", "boom", "Traceback", "RuntimeError"):
            assert leak not in err["message"]
        # The engine goes on: the next request completes in full.
        items = await _items(replica, "req-ok-1")
        assert sum(len(i["token_ids"]) for i in items) == 4
        assert items[-1]["finish_reason"] == "length"
        assert replica.engine.stats()["blocks_used"] == 0

    asyncio.run(main())


def test_constraints_that_leave_no_token_are_the_requests_400_not_a_500(replica):
    """allowed_token_ids that the structured output never allows: no token can be sampled. The
    request's own doing (found by bench/fuzz.py), so a 400 that says so, not an internal 500."""
    sampling = {"max_tokens": 4, "temperature": 0.0, "structured": {"choice": ["abc"]},
                "allowed_token_ids": [5]}  # fmt: skip

    async def main():
        items = [i async for i in replica.generate([1, 2, 3], sampling, "req-conflict")]
        assert len(items) == 1, items
        err = items[0]["error"]
        assert err["status"] == 400 and err["param"] == "structured", err
        assert "no token" in err["message"] and "allowed_token_ids" in err["message"]
        assert replica.engine.stats()["blocks_used"] == 0

    asyncio.run(main())


def test_an_unexpected_grpc_failure_is_internal_naming_only_an_error_id(monkeypatch):
    """A bug in the gRPC path (the fuzzer found a RecursionError) must not reach the client as
    Serve's traceback, actor id and address: INTERNAL, with an id the log has the cause under."""
    import grpc
    from segserve.deploy import grpc_api

    class Context:
        code = details = None

        def set_code(self, code):
            self.code = code

        def set_details(self, details):
            self.details = details

    def broken(*args, **kwargs):
        raise KeyError(SECRET)

    monkeypatch.setattr(grpc_api, "prepare", broken)

    async def main():
        unary, stream = Context(), Context()
        await grpc_api.generate(None, None, unary)
        with pytest.raises(APIError):
            async for _ in grpc_api.generate_stream(None, None, stream):
                pass
        for ctx in (unary, stream):
            assert ctx.code == grpc.StatusCode.INTERNAL and "error id" in ctx.details
            assert SECRET not in ctx.details and "KeyError" not in ctx.details

    asyncio.run(main())


def test_replica_errors_say_nothing_internal():
    died = ActorDiedError()
    e = replica_error(died, "rid-7")
    assert e.status == 503 and e.grpc_code_name == "UNAVAILABLE" and "rid-7" in e.message
    assert str(died)[:20] not in e.message and "Actor" not in e.message
    e = replica_error(RuntimeError(SECRET), "rid-8")
    assert e.status == 500 and e.grpc_code_name == "INTERNAL" and SECRET not in e.message


class _Gen:
    def __init__(self, items, fail=None):
        self.items, self.fail, self.cancelled = list(items), fail, False

    async def __anext__(self):
        if self.fail is not None:
            raise self.fail
        if not self.items:
            raise StopAsyncIteration
        return self.items.pop(0)

    def cancel(self):
        self.cancelled = True


class _Handle:
    """A deployment handle whose calls return the given generators in turn."""

    def __init__(self, *gens):
        self.gens = list(gens)
        self.calls = 0

    def options(self, **_):
        return self

    @property
    def generate(self):
        return self

    def remote(self, *args):
        self.calls += 1
        return self.gens.pop(0)


def _prep():
    return SimpleNamespace(prompt_ids=[1], sampling={}, request_id="rid-r", cached_tokens=0,
                           pool=SimpleNamespace(in_flight=0), deadline=None)  # fmt: skip


def test_a_dead_replica_before_the_first_token_is_retried_once():
    async def main():
        item = {"index": 0, "token_ids": [5], "text": "x", "finish_reason": "length"}
        prep = _prep()
        handle = _Handle(_Gen([], ActorDiedError()), _Gen([item]))
        stream = await open_stream(handle, prep)
        assert handle.calls == 2 and prep.pool.in_flight == 1
        assert [i async for i in stream] == [item] and prep.pool.in_flight == 0

        prep = _prep()
        handle = _Handle(_Gen([], ActorDiedError()), _Gen([], ActorDiedError()))
        with pytest.raises(APIError) as info:
            await open_stream(handle, prep)
        assert info.value.status == 503 and handle.calls == 2 and prep.pool.in_flight == 0

    asyncio.run(main())


def test_a_full_queue_leaks_no_stream_queue(replica):
    engine = replica.engine

    async def main():
        long = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
        # Enough streams to fill the batch and the queue; the rest get QueueFull.
        gens = [engine.generate([1, 2, 3], long, f"fill-{i}") for i in range(12)]
        # All submit before the engine's first step: the inbox holds them all.
        firsts = await asyncio.gather(*(g.__anext__() for g in gens), return_exceptions=True)
        refused = sum(isinstance(f, QueueFull) for f in firsts)
        assert refused == len(gens) - ENGINE["max_queue_len"], firsts
        live = len(gens) - refused
        assert len(engine._queues) == live
        for g in gens:
            await g.aclose()
        assert not engine._queues
        while engine.core.has_work():  # the aborts drain before the next test
            await asyncio.sleep(0.01)

    asyncio.run(main())


def test_an_abort_waiting_in_the_inbox_is_no_queued_request():
    """A client that just left leaves an abort in the engine's inbox until its next step; a
    request arriving then is no more queued than it would be a moment later."""
    from segserve.actors.config import EngineConfig
    from segserve.actors.engine import EngineCore

    core = EngineCore(EngineConfig(model="demo", num_kv_blocks=64, max_queue_len=1))
    long = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    first = core.add_request([1, 2, 3], long)
    core.step()  # running now: the queue is empty
    core.abort(first)
    core.add_request([4, 5, 6], long)  # the abort in the inbox took the one slot before
    with pytest.raises(QueueFull):  # a second waiting request is still one too many
        core.add_request([7, 8, 9], long)


def test_a_stream_response_never_iterated_still_closes_its_replica_stream():
    from segserve.deploy.openai_api import ClosingStreamingResponse
    from starlette.requests import ClientDisconnect

    closed = []

    async def body():
        yield "data: x\n\n"

    async def gone(message):  # the client left: the first send fails
        raise OSError("client disconnected")

    async def receive():
        return {"type": "http.disconnect"}

    async def main():
        response = ClosingStreamingResponse(body(), lambda: closed.append(1))
        with pytest.raises((OSError, ClientDisconnect)):  # Starlette renames it
            await response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, gone)
        assert closed == [1]

    asyncio.run(main())


def test_a_step_fault_fails_the_requests_in_flight_and_the_engine_goes_on(replica, monkeypatch):
    scheduler = replica.engine.core.scheduler
    real = scheduler.schedule
    calls = []

    def once(*args, **kwargs):  # bookkeeping outside execute/sampling raises, once
        calls.append(1)
        if len(calls) == 1:
            raise KeyError(SECRET)
        return real(*args, **kwargs)

    async def main():
        monkeypatch.setattr(scheduler, "schedule", once)
        items = await _items(replica, "req-step-1")
        assert items[0]["error"]["status"] == 500 and SECRET not in items[0]["error"]["message"]
        while replica.engine.core.has_work():  # the failed request's abort drains
            await asyncio.sleep(0.01)
        items = await _items(replica, "req-step-2")
        assert sum(len(i["token_ids"]) for i in items) == 4
        await replica.check_health()
        monkeypatch.setattr(scheduler, "schedule", real)
        assert replica.engine.stats()["blocks_used"] == 0

    asyncio.run(main())


def test_a_persistent_step_fault_fails_the_health_check():
    broken_replica = LLMReplica(ENGINE, "demo", "cpu")

    def broken(*args, **kwargs):
        raise KeyError(SECRET)

    broken_replica.engine.core.scheduler.schedule = broken

    async def main():
        statuses = []
        for i in range(AsyncEngine.MAX_CONSECUTIVE_STEP_FAILURES + 1):
            items = await _items(broken_replica, f"req-p-{i}")
            assert len(items) == 1
            statuses.append(items[0]["error"]["status"])
            engine = broken_replica.engine
            while engine.core.has_work() and engine.broken is None:  # its abort drains
                await asyncio.sleep(0.01)
        # Each request fails (nothing hangs); once the fault has persisted the engine stops,
        # the health check fails, and later requests are refused as retryable.
        assert statuses[-1] == 503 and set(statuses[:-1]) <= {500, 503}, statuses
        with pytest.raises(EngineBroken):
            await broken_replica.check_health()

    asyncio.run(main())


def test_the_deadline_cancels_the_call_with_a_timeout_error():
    class _Hang(_Gen):
        async def __anext__(self):
            await asyncio.sleep(3600)

    async def main():
        prep = _prep()
        prep.deadline = time.monotonic() + 0.05
        gen = _Hang([])
        with pytest.raises(APIError) as info:
            await open_stream(_Handle(gen), prep)
        assert info.value.status == 504 and info.value.grpc_code_name == "DEADLINE_EXCEEDED"
        assert "timed out" in info.value.message
        assert gen.cancelled and prep.pool.in_flight == 0

        item = {"index": 0, "token_ids": [5], "text": "x"}
        prep = _prep()
        prep.deadline = time.monotonic() + 60
        gen = _Gen([item])
        stream = await open_stream(_Handle(gen), prep)
        gen.__class__ = _Hang  # the first token came; the next never does
        prep.deadline = time.monotonic() + 0.05
        assert await stream.__anext__() == item
        with pytest.raises(APIError) as info:
            await stream.__anext__()
        assert info.value.status == 504 and gen.cancelled and prep.pool.in_flight == 0

    asyncio.run(main())


# ----- one request's fault fails that request only --------------------------------------------
class _BrokenDetok:
    def add(self, token):
        raise RuntimeError(SECRET)

    def flush(self):
        raise RuntimeError(SECRET)


async def _pair(replica, bad_id):
    """A good request and a bad one in the same batch; the good one's reference alone."""
    alone = await _items(replica, "ref", max_tokens=6)
    good, bad = await asyncio.gather(_items(replica, "good", max_tokens=6),
                                     _items(replica, bad_id, max_tokens=6))  # fmt: skip
    while replica.engine.core.has_work():
        await asyncio.sleep(0.01)
    await replica.check_health()  # the engine goes on
    return alone, good, bad


def _assert_only_bad_failed(alone, good, bad, bad_id, replica):
    assert [i["token_ids"] for i in good] == [i["token_ids"] for i in alone]
    assert good[-1]["finish_reason"] == "length"
    assert [list(i) for i in bad] == [["error"]], bad
    err = bad[0]["error"]
    assert err["status"] == 500 and bad_id in err["message"] and SECRET not in err["message"]
    assert replica.engine.stats()["blocks_used"] == 0


def test_a_detokenizer_fault_fails_only_its_request(replica, monkeypatch):
    core = replica.engine.core
    real = core._new_seq

    def new_seq(group, index):
        seq = real(group, index)
        if group.request_id == "bad-detok":
            seq.detok = _BrokenDetok()
        return seq

    monkeypatch.setattr(core, "_new_seq", new_seq)
    alone, good, bad = asyncio.run(_pair(replica, "bad-detok"))
    _assert_only_bad_failed(alone, good, bad, "bad-detok", replica)


def test_a_scheduling_fault_fails_only_its_request(replica, monkeypatch):
    kv = replica.engine.core.kv
    real = kv.admit

    def admit(group):
        if group.request_id == "bad-admit":
            raise KeyError(SECRET)
        return real(group)

    monkeypatch.setattr(kv, "admit", admit)
    alone, good, bad = asyncio.run(_pair(replica, "bad-admit"))
    _assert_only_bad_failed(alone, good, bad, "bad-admit", replica)


def test_a_cancelled_engine_loop_ends_its_streams_and_the_replica_reports_unhealthy():
    victim = LLMReplica(ENGINE, "demo", "cpu")
    victim.replica_id = "replica-victim"
    engine = victim.engine

    async def main():
        sampling = {"max_tokens": 200, "temperature": 0.0, "ignore_eos": True}
        stream = victim.generate([1, 2, 3, 4, 5], sampling, "req-loop-1")
        first = await stream.__anext__()
        assert first["token_ids"]
        engine._task.cancel()  # the loop dies mid-stream
        rest = [item async for item in stream]
        assert rest and "error" in rest[-1] and rest[-1]["error"]["status"] == 500, rest
        assert sum(len(i.get("token_ids", ())) for i in rest) < 199  # it did not finish
        with pytest.raises(EngineBroken):
            await victim.check_health()
        # Not restarted: later requests are refused as retryable, for another replica.
        items = await _items(victim, "req-loop-2")
        assert items[0]["error"]["status"] == 503, items
        assert items[0]["unavailable_replica"] == "replica-victim"

    asyncio.run(main())


def test_a_failing_device_fails_the_health_check_and_requests_go_elsewhere():
    sick = LLMReplica(ENGINE, "demo", "cpu")
    sick.replica_id = "replica-sick"

    def fails():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    sick.engine._device_op = fails

    async def main():
        with pytest.raises(EngineBroken):
            await sick.check_health()
        assert sick.record_routing_stats()["healthy"] == 0.0
        items = await _items(sick, "req-sick-1")
        assert len(items) == 1 and items[0]["error"]["status"] == 503
        assert items[0]["unavailable_replica"] == "replica-sick"  # for the ingress's router
        assert "CUDA" not in items[0]["error"]["message"]

    asyncio.run(main())


def test_a_broken_replicas_503_is_retried_on_another_and_the_router_skips_it(monkeypatch):
    from segserve.deploy import routing_view

    marked = []
    router = SimpleNamespace(mark_unavailable=marked.append)
    monkeypatch.setitem(routing_view.ROUTERS, ("app", "LLM:demo:cpu"), router)
    refused = {"error": APIError(503, "the replica is unavailable").to_dict(),
               "unavailable_replica": "replica-b"}  # fmt: skip
    item = {"index": 0, "token_ids": [5], "text": "x", "finish_reason": "length"}

    async def main():
        prep = _prep()
        prep.pool.deployment = "LLM:demo:cpu"
        handle = _Handle(_Gen([refused]), _Gen([item]))
        stream = await open_stream(handle, prep)
        assert handle.calls == 2 and marked == ["replica-b"]
        assert [i async for i in stream] == [item] and prep.pool.in_flight == 0

    asyncio.run(main())


def test_a_unary_request_whose_replica_dies_mid_way_starts_again_elsewhere():
    """Nothing of a unary reply has reached the client, so it is not lost with the replica."""
    from segserve.deploy.service import ServiceCore
    from segserve.deploy.streams import open_streams

    class _DiesAfter(_Gen):  # streams its items, then the replica dies
        async def __anext__(self):
            if not self.items:
                raise ActorDiedError()
            return self.items.pop(0)

    first = {"index": 0, "token_ids": [5], "text": "a"}
    whole = [{"index": 0, "token_ids": [7], "text": "b"},
             {"index": 0, "token_ids": [8], "text": "c", "finish_reason": "length"}]  # fmt: skip

    async def main():
        prep = _prep()
        prep.pool.deployment = "dep"
        handle = _Handle(_DiesAfter([first, first]), _Gen(whole))
        core = SimpleNamespace(open_streams=lambda preps: open_streams({"dep": handle}, preps))
        fed, restarts = [], []

        def restart():
            restarts.append(len(fed))
            fed.clear()

        stream = await core.open_streams([prep])
        await ServiceCore.feed_all(core, [prep], stream, lambda pos, item: fed.append(item),
                                   restart)  # fmt: skip
        assert restarts == [2] and fed == whole and handle.calls == 2
        assert prep.pool.in_flight == 0

        # A second death is the client's 503.
        prep = _prep()
        prep.pool.deployment = "dep"
        handle = _Handle(_DiesAfter([first]), _DiesAfter([first]))
        with pytest.raises(APIError) as info:
            await ServiceCore.feed_all(core, [prep], await core.open_streams([prep]),
                                       lambda pos, item: None, lambda: None)  # fmt: skip
        assert info.value.status == 503 and handle.calls == 2 and prep.pool.in_flight == 0

    asyncio.run(main())


class _Caller:
    """A caller's actor handle: ``__ray_ready__.remote()`` answers, or fails as a dead actor's."""

    def __init__(self) -> None:
        self.dead = False
        self.__ray_ready__ = self

    def remote(self):
        async def ready():
            if self.dead:
                raise ActorDiedError()
            return True

        return ready()


def test_a_dead_callers_calls_are_aborted_and_a_live_callers_go_on(monkeypatch):
    """Ray runs an actor call to its end when its caller dies: the replica pings the ingress
    replicas it has calls from (CallerWatch) and cancels the calls of one that is gone, which
    aborts their engine requests; a live caller's calls are left alone."""
    monkeypatch.setattr(CallerWatch, "PERIOD_S", 0.05)
    victim = LLMReplica(ENGINE, "demo", "cpu")
    sampling = {"max_tokens": 200, "temperature": 0.0, "ignore_eos": True}
    alive, doomed = _Caller(), _Caller()

    async def consume(request_id, caller):
        return [i async for i in victim.generate([1, 2, 3], sampling, request_id, caller)]

    async def main():
        kept = asyncio.create_task(consume("req-kept", ("actor-a", alive)))
        cut = asyncio.create_task(consume("req-cut", ("actor-b", doomed)))
        while len(victim.engine._queues) < 2:
            await asyncio.sleep(0.01)
        doomed.dead = True
        with pytest.raises(asyncio.CancelledError):
            await cut
        items = await kept
        assert sum(len(i["token_ids"]) for i in items) == 200
        while victim.engine.core.has_work():  # the abort drains
            await asyncio.sleep(0.01)
        assert victim.engine.stats()["blocks_used"] == 0
        assert victim.metrics.request_counts == {"abort": 1, "length": 1}

    asyncio.run(main())
