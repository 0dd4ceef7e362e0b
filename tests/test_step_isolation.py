"""A model step that fails is pinned on the request that causes it: the step's requests are run
again apart, in halves, until that one fails alone (Suspects in actors/scheduler.py). The oracle
is the same requests on a clean engine (greedy and seeded sampling are deterministic), and the KV
pool must be whole again afterwards. A step that fails whatever the batch still ends everything
and breaks the engine, never retrying forever."""

from __future__ import annotations

import asyncio
import math

import pytest
from segserve.actors import EngineConfig, EngineCore, SamplingParams
from segserve.actors.async_engine import AsyncEngine, EngineBroken
from segserve.actors.engine import StepFailed
from segserve.actors.scheduler import Suspects
from segserve.actors.sequence import Status
from segserve.deploy.replica import LLMReplica

POISON = 7  # a prompt holding this token id makes every step it is part of fail
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
BLOCK = 4
LEAD_TO_A_FORK_COPY = 2  # steps after which the beams' next step copies a block


def _core(path: str) -> EngineCore:
    return EngineCore(EngineConfig(model=path, kernel_backend="reference", block_size=BLOCK,
                                   num_kv_blocks=96, max_model_len=128))  # fmt: skip


def _poison(core: EngineCore, always: bool = False, copies: list | None = None) -> list[int]:
    """Make the runner fail every step holding a poisoned prompt (or every step); returns the
    number of requests of each failed step (and adds its block copies to ``copies``)."""
    real, failed = core.runner.execute, []

    def execute(batch, block_copies, *args, **kwargs):
        groups = {id(item.seq.group): item.seq.group for item in batch}.values()
        if always or any(POISON in g.prompt_ids for g in groups):
            failed.append(len(groups))
            if copies is not None:
                copies.extend(block_copies)
            for layer in core.runner.kv_caches:  # half done: the copies' targets are garbage
                for _, dst in block_copies:
                    layer.k[dst] = layer.v[dst] = float("nan")
            raise RuntimeError("injected kernel fault")
        return real(batch, block_copies, *args, **kwargs)

    core.runner.execute = execute
    return failed


def _run(core: EngineCore, first, rest, lead: int = 1, max_steps: int = 500) -> dict[str, dict]:
    """Submit ``first`` (id, prompt, params), step ``lead`` times (its prompt is then in the
    prefix cache), then the ``rest``; returns per request its tokens and finish reason by
    sequence index."""
    out: dict[str, dict] = {}

    def drain():
        for d in core.step():
            seq = out.setdefault(d.request_id, {}).setdefault(d.index, {"ids": [], "end": None})
            seq["ids"] += d.token_ids
            seq["end"] = d.finish_reason or seq["end"]

    core.add_request(first[1], first[2], first[0])
    for _ in range(lead):
        drain()
    for request_id, prompt, params in rest:
        core.add_request(prompt, params, request_id)
    for _ in range(max_steps):
        if not core.has_work():
            return out
        drain()
    raise AssertionError(f"still busy after {max_steps} steps")


def _assert_pool_whole(core: EngineCore) -> None:
    kv = core.kv
    assert kv.num_available() == kv.num_blocks and not any(kv.ref_count), "blocks leaked"
    assert not kv.pending_copies and not core.has_work()


def _requests():
    base = list(range(10, 30))  # 5 blocks of 4
    sampled = SamplingParams(max_tokens=8, temperature=1.0, seed=3, n=2, ignore_eos=True)
    first = ("base", base, GREEDY)
    rest = [
        ("other", list(range(40, 53)), GREEDY),
        ("prefix-hit", base[:12] + [60, 61, 62], GREEDY),  # 3 prompt blocks from the cache
        ("n2", list(range(70, 79)), sampled),  # two samples sharing one prompt segment
        ("poisoned", base[:8] + [POISON, 90, 91], GREEDY),  # shares blocks with base too
        ("late", list(range(100, 106)), GREEDY),
    ]
    return first, rest


def test_only_the_request_at_fault_fails_and_the_others_match_a_clean_run(tiny_models):
    path, _ = tiny_models["llama"]
    first, rest = _requests()
    clean = _run(_core(path), first, [r for r in rest if r[0] != "poisoned"])
    core = _core(path)
    failed = _poison(core)
    got = _run(core, first, rest)

    assert got.pop("poisoned") == {0: {"ids": [], "end": "error"}}
    assert got == clean
    assert all(s["end"] == "length" and len(s["ids"]) == 8 for r in got.values()
               for s in r.values())  # fmt: skip
    assert len(clean["n2"]) == 2 and clean["n2"][0] != clean["n2"][1]  # two real samples
    assert core.kv.prefix_cache_hit_tokens >= 12  # prefix-hit (and poisoned) reused base's KV
    # Bisection: the poisoned request took part in log2(batch) + 1 failed steps, the last alone.
    assert failed[0] == 1 + len(rest) and failed[-1] == 1  # base is still running with them
    assert len(failed) <= math.ceil(math.log2(failed[0])) + 1
    _assert_pool_whole(core)
    assert not core.device_suspect  # innocent steps succeeded since


class _Request:  # what Suspects reads of a request
    def __init__(self, bad: bool) -> None:
        self.bad, self.status = bad, Status.RUNNING


@pytest.mark.parametrize("bad", [[3], [0, 7], [1, 2, 5], list(range(8))])
def test_bisection_finds_every_bad_request_and_no_innocent_in_log2_steps(bad):
    """Suspects alone, against a hand-made oracle: a step fails iff it holds a bad request."""
    requests = [_Request(i in bad) for i in range(8)]
    suspects, at_fault, steps = Suspects(), [], dict.fromkeys(requests, 0)
    batch = requests
    while batch:
        for r in batch:
            steps[r] += 1
        if any(r.bad for r in batch):
            for r in suspects.failed(batch):
                r.status = Status.FINISHED  # the engine ends it
                at_fault.append(r)
        else:
            suspects.succeeded(batch)
        batch = suspects.next_cohort()
    assert sorted(requests.index(r) for r in at_fault) == bad
    assert max(steps.values()) <= math.log2(len(requests)) + 1
    assert suspects.device_suspect == (len(bad) == len(requests))  # nothing ever succeeded


def test_requests_arriving_while_isolating_wait_and_never_join_the_suspects(tiny_models):
    path, _ = tiny_models["llama"]
    core = _core(path)
    failed = _poison(core)
    inner, batches = core.runner.execute, []

    def spy(batch, *args, **kwargs):
        batches.append(({i.seq.group.request_id for i in batch}, bool(core.scheduler.suspects)))
        return inner(batch, *args, **kwargs)

    core.runner.execute = spy
    first = {"a": [10, 11, 12], "poisoned": [5, POISON], "b": [20, 21, 22, 23], "c": [30, 31]}
    for request_id, prompt in first.items():
        core.add_request(prompt, GREEDY, request_id)
    core.step()
    assert failed == [4] and core.scheduler.suspects  # the batch failed: all four suspects
    core.add_request([40, 41, 42], GREEDY, "newcomer")
    ends = {}
    while core.has_work():
        ends.update((d.request_id, d.finish_reason) for d in core.step() if d.request_done)
    assert ends == {"poisoned": "error", "a": "length", "b": "length", "c": "length",
                    "newcomer": "length"}  # fmt: skip
    isolating = [ids for ids, active in batches if active]
    assert isolating and all(ids < set(first) for ids in isolating)  # only suspects, apart
    _assert_pool_whole(core)


def test_beams_and_a_shared_response_block_survive_a_failed_step(tiny_models):
    """Beams that fork share response blocks; the shared partial block is copied at the next
    step. When that step fails, the copies must be made by its retry, not lost."""
    path, _ = tiny_models["llama"]
    beams = SamplingParams(max_tokens=10, beam_width=4)
    first = ("beams", list(range(20, 31)), beams)
    rest = [("poisoned", [5, POISON, 9], GREEDY), ("other", list(range(40, 46)), GREEDY)]
    lead = LEAD_TO_A_FORK_COPY
    clean = _run(_core(path), first, rest[1:], lead)
    core = _core(path)
    copies: list = []
    failed = _poison(core, copies=copies)
    got = _run(core, first, rest, lead)
    assert got.pop("poisoned") == {0: {"ids": [], "end": "error"}}
    assert got == clean and len(got["beams"]) == 4
    assert failed[0] == 3 and copies  # the failed step held block copies
    _assert_pool_whole(core)


def test_a_step_that_always_fails_ends_every_request_and_retries_a_bounded_number_of_times(
        tiny_models):
    path, _ = tiny_models["llama"]
    first, rest = _requests()
    core = _core(path)
    failed = _poison(core, always=True)
    got = _run(core, first, rest)
    assert {r: {i: s["end"] for i, s in seqs.items()} for r, seqs in got.items()} == {
        r[0]: {0: "error"} for r in [first, *rest]}
    # first alone, then the rest bisected down to single requests: 1 + (2 * 5 - 1) steps
    assert len(failed) == 1 + 2 * len(rest) - 1
    _assert_pool_whole(core)
    assert core.device_suspect
    # Requests keep failing alone with nothing succeeding: the device is at fault. The next
    # step that fails raises for the AsyncEngine to count, having ended every request.
    after = core.make_request([3, 4, 5], GREEDY, "after")
    core.submit(after)
    with pytest.raises(StepFailed):
        for _ in range(10):
            core.step()
    assert core.build_output(after).outputs[0].finish_reason == "error"
    _assert_pool_whole(core)


def test_a_device_that_fails_every_step_breaks_the_engine():
    """Through the AsyncEngine (what a replica runs): every request ends with a 500, then,
    once the fault has persisted, the replica reports unhealthy and refuses with a 503."""
    replica = LLMReplica(dict(model="demo", device="cpu", dtype="float32", num_kv_blocks=64,
                              max_model_len=256), "demo", "cpu")  # fmt: skip
    _poison(replica.engine.core, always=True)
    sampling = {"max_tokens": 4, "temperature": 0.0}

    async def one(request_id):
        return [item async for item in replica.generate([1, 2, 3], sampling, request_id)]

    async def main():
        statuses = []
        for i in range(2 + AsyncEngine.MAX_CONSECUTIVE_STEP_FAILURES + 1):
            items = await asyncio.gather(*(one(f"r{i}-{j}") for j in range(2)))
            statuses.append({it[-1]["error"]["status"] for it in items})
            while replica.engine.core.has_work() and replica.engine.broken is None:
                await asyncio.sleep(0.01)
        assert set().union(*statuses[:-1]) <= {500, 503} and statuses[-1] == {503}, statuses
        with pytest.raises(EngineBroken):
            await replica.check_health()

    asyncio.run(main())


def test_through_a_replica_the_request_at_fault_is_a_500_and_the_others_complete():
    replica = LLMReplica(dict(model="demo", device="cpu", dtype="float32", num_kv_blocks=64,
                              max_model_len=256), "demo", "cpu")  # fmt: skip
    failed = _poison(replica.engine.core)
    sampling = {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True}
    prompts = {"r1": [1, 2, 3, 4], "bad-1": [1, POISON, 3], "r2": [9, 8, 6], "r3": [20, 21]}

    async def one(request_id):
        return [i async for i in replica.generate(prompts[request_id], sampling, request_id)]

    def tokens(items):
        return [t for item in items for t in item["token_ids"]]

    async def main():
        alone = {r: tokens(await one(r)) for r in prompts if r != "bad-1"}
        assert not failed
        together = dict(zip(prompts, await asyncio.gather(*map(one, prompts)), strict=True))
        assert failed[0] == len(prompts)  # the bad request shared its step with all the others
        bad = together.pop("bad-1")
        assert len(bad) == 1 and bad[0]["error"]["status"] == 500, bad
        message = bad[0]["error"]["message"]
        assert "bad-1" in message and "injected" not in message  # its id, no internals
        assert {r: tokens(items) for r, items in together.items()} == alone
        assert all(len(t) == 6 for t in alone.values())
        await replica.check_health()
        assert replica.engine.stats()["blocks_used"] == 0

    asyncio.run(main())
