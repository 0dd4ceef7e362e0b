"""The engine core in a child process (actors/engine_process.py), without Ray: it streams what
the in-process engine generates, raises the same errors before the stream, frees a leaver's
blocks, and a child that dies, hangs or cannot start fails cleanly instead of hanging anything.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from segserve import LLM, SamplingParams
from segserve.actors import EngineConfig
from segserve.actors.async_engine import EngineBroken
from segserve.actors.engine import QueueFull
from segserve.actors.engine_process import EngineProcess

PROMPT = [0, 17, 99, 23, 200, 41, 7, 7, 150]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0)
LONG = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def path(tiny_models):
    return tiny_models["llama"][0]


@pytest.fixture(scope="module")
def engine(path):
    ep = EngineProcess(EngineConfig(model=path, block_size=4, num_kv_blocks=256, max_num_seqs=3,
                                    max_queue_len=1))  # fmt: skip
    yield ep
    ep.shutdown()


async def _collect(ep: EngineProcess, prompt, params) -> dict[int, tuple[list[int], str, str]]:
    out: dict[int, tuple[list[int], str, str | None]] = {}
    async for d in ep.generate(prompt, params):
        ids, text, _ = out.get(d.index, ([], "", None))
        out[d.index] = (ids + d.token_ids, text + d.text, d.finish_reason)
    return out


async def _until(pred, timeout: float = 30.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        await asyncio.sleep(0.02)
    return pred()


def test_a_process_engine_streams_what_the_in_process_engine_generates(engine, path):
    """Greedy, seeded sampling with n=3, and beam search: the same tokens and text as the
    offline engine (itself checked against HF in test_engine_vs_hf.py)."""
    llm = LLM(path, block_size=4)
    cases = [GREEDY, SamplingParams(max_tokens=12, temperature=1.0, n=3, seed=7),
             SamplingParams(max_tokens=8, beam_width=3, temperature=0.0)]  # fmt: skip
    for params in cases:
        want = llm.generate([PROMPT], params)[0].outputs
        got = asyncio.run(_collect(engine, PROMPT, params))
        assert sorted(got) == [o.index for o in want], params
        for o in want:
            ids, text, finish = got[o.index]
            assert (ids, text, finish) == (o.token_ids, o.text, o.finish_reason), params
    assert engine.stats()["blocks_used"] == 0


def test_bad_requests_and_a_full_queue_raise_before_the_stream(engine):
    async def main():
        with pytest.raises(ValueError, match="exceeds the model's max length"):
            await _collect(engine, PROMPT * 1000, GREEDY)
        with pytest.raises(ValueError, match="outside the model's vocabulary"):
            await _collect(engine, [10**9], GREEDY)
        # three running (max_num_seqs) and one waiting (max_queue_len): more are refused
        results = await asyncio.gather(*(_collect(engine, PROMPT, LONG) for _ in range(6)),
                                       return_exceptions=True)  # fmt: skip
        assert sum(isinstance(r, QueueFull) for r in results) >= 1, results
        for r in results:
            assert isinstance(r, QueueFull) or len(r[0][0]) == 400, r
        assert engine.healthy

    asyncio.run(main())


def test_a_leaver_aborts_its_request_and_frees_its_blocks(engine):
    async def main():
        stream = engine.generate(PROMPT, LONG)
        first = await stream.__anext__()
        assert first.token_ids
        # A snapshot taken while it runs (every 0.25 s), so the idle one below is a new one.
        assert await _until(lambda: engine.stats()["running_requests"] == 1), engine.stats()
        await stream.aclose()
        # The child aborted it: idle stats come back with nothing in use.
        assert await _until(lambda: engine.stats()["running_requests"] == 0
                            and engine.stats()["blocks_used"] == 0), engine.stats()
        await engine.probe()  # idle: the child runs a tiny op on its device

    asyncio.run(main())


def test_a_probe_from_another_threads_loop_leaves_the_reader_alone(engine):
    """Only the loop that reads the child's socket may touch its streams: a health check run
    on another thread's loop does what it can without taking the socket over."""
    async def main():
        assert (await _collect(engine, PROMPT, GREEDY))[0][0]
        await asyncio.to_thread(lambda: asyncio.run(engine.probe()))
        assert engine._loop is asyncio.get_running_loop()
        assert (await _collect(engine, PROMPT, GREEDY))[0][0]

    asyncio.run(main())


def test_structured_output_compiles_in_the_child(tmp_path):
    ep = EngineProcess(EngineConfig(model="demo", num_kv_blocks=64))
    try:
        params = SamplingParams(max_tokens=8, temperature=0.0, structured={"choice": ["yes", "no"]})
        got = asyncio.run(_collect(ep, "Yes or no?", params))
        want = LLM("demo").generate(["Yes or no?"], params)[0].outputs[0]
        assert got[0][1] == want.text and want.text in ("yes", "no")
    finally:
        ep.shutdown()


def test_a_dead_engine_process_fails_its_stream_and_reports_unhealthy(path):
    ep = EngineProcess(EngineConfig(model=path, block_size=4, num_kv_blocks=256))
    try:
        async def main():
            deltas = []
            async for d in ep.generate(PROMPT, LONG):
                deltas.append(d)
                if len(deltas) == 1:
                    os.kill(ep._proc.pid, signal.SIGKILL)
            assert deltas[-1].finish_reason == "error" and deltas[-1].request_done
            with pytest.raises(EngineBroken, match="exited with code -9"):
                ep.check_health()
            with pytest.raises(EngineBroken):
                await _collect(ep, PROMPT, GREEDY)
            with pytest.raises(EngineBroken):
                await ep.probe()

        asyncio.run(main())
    finally:
        ep.shutdown()


def test_a_hung_engine_process_fails_the_health_check(path, monkeypatch):
    """A child that stops answering with a request in flight (a step that hangs: SIGSTOP here)
    fails the health check after STUCK_STEP_S, so Serve replaces the replica."""
    monkeypatch.setattr(EngineProcess, "STUCK_STEP_S", 1.0)
    ep = EngineProcess(EngineConfig(model=path, block_size=4, num_kv_blocks=256))
    try:
        async def main():
            stream = ep.generate(PROMPT, LONG)
            await stream.__anext__()
            os.kill(ep._proc.pid, signal.SIGSTOP)
            ep.check_health()  # not yet
            await asyncio.sleep(1.5)
            with pytest.raises(EngineBroken, match="has run for over"):
                ep.check_health()
            os.kill(ep._proc.pid, signal.SIGCONT)
            await stream.aclose()

        asyncio.run(main())
    finally:
        ep.shutdown()


def test_shutdown_from_another_thread_stops_the_child_and_refuses_new_requests(path):
    """Serve stops a replica from a thread of its own while the replica's loop reads the
    child's socket: the child exits cleanly, the loop lets the socket go, and a request after
    that is refused as from a broken engine (the router then retries it elsewhere)."""
    ep = EngineProcess(EngineConfig(model=path, block_size=4, num_kv_blocks=256))

    async def main():
        assert (await _collect(ep, PROMPT, GREEDY))[0][0]  # this loop reads the socket
        await asyncio.to_thread(ep.shutdown)
        assert await _until(lambda: ep._conn.closed)
        with pytest.raises(EngineBroken):
            await _collect(ep, PROMPT, GREEDY)

    asyncio.run(main())
    assert ep._proc.returncode == 0 and not ep.healthy


def test_a_model_that_cannot_load_raises_the_childs_error(tmp_path):
    with pytest.raises(Exception) as in_process:
        LLM(str(tmp_path / "missing"))
    with pytest.raises(type(in_process.value)) as child:
        EngineProcess(EngineConfig(model=str(tmp_path / "missing")))
    assert str(child.value) == str(in_process.value)


def test_an_engine_process_ends_with_its_parent():
    """A replica killed outright (SIGKILL: no shutdown runs) takes its engine process along:
    the child sees its socket close and exits, so no orphan holds the device."""
    script = textwrap.dedent("""
        import os, sys
        from segserve.actors import EngineConfig
        from segserve.actors.engine_process import EngineProcess
        ep = EngineProcess(EngineConfig(model="demo", num_kv_blocks=64))
        print(ep._proc.pid, flush=True)
        os.kill(os.getpid(), 9)
    """)
    parent = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert parent.returncode == -9, parent.stderr
    child = int(parent.stdout.split()[0])

    def gone() -> bool:
        try:
            with open(f"/proc/{child}/status") as f:
                return "\nState:\tZ" in f.read()  # exited, not yet reaped by init
        except FileNotFoundError:
            return True

    end = time.monotonic() + 30
    while not gone() and time.monotonic() < end:
        time.sleep(0.1)
    assert gone(), f"engine process {child} outlived its parent"
