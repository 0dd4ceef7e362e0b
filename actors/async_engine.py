"""AsyncEngine: the async front of EngineCore, what a Serve replica wraps.

``generate`` streams Deltas; one background task runs the core in a worker thread, which steps
back to back while there is work and hands each step's deltas to the event loop, so the loop stays
free for I/O and never delays a step. The worker thread is the only place engine state changes
while serving.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import torch

from .communicator import ReplicaGroupFailed
from .config import EngineConfig
from .engine import EngineCore, Prompt
from .outputs import Delta
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineBroken(RuntimeError):
    """The engine cannot step anymore; its replica must be replaced."""


def check_device(device: torch.device | str) -> None:
    """A tiny op on the device: raises if it fails or computes wrong (an idle engine's probe)."""
    x = torch.arange(4.0, device=device)
    if float((x * x).sum()) != 14.0:
        raise RuntimeError("the device computed a wrong sum")


class EngineFront:
    """What the replica's two engine hosts share (this module's AsyncEngine, a thread of the
    process; engine_process.EngineProcess, a child process): per-delta streaming on top of their
    ``generate_ready``, and ``healthy`` on top of their ``check_health``."""

    def generate_ready(self, prompt: Prompt, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[list[Delta]]:  # fmt: skip
        raise NotImplementedError

    def check_health(self) -> None:
        raise NotImplementedError

    async def generate(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[Delta]:
        """Stream the request's deltas; the iterator ends when every sequence has finished.
        Closing the iterator early (a client that went away) aborts the request."""
        batches = self.generate_ready(prompt, params, request_id)
        try:
            async for ready in batches:
                for delta in ready:
                    yield delta
        finally:
            await batches.aclose()  # at once, not when collected: it aborts the request

    @property
    def healthy(self) -> bool:
        try:
            self.check_health()
        except EngineBroken:
            return False
        return True


class AsyncEngine(EngineFront):
    """Async front of EngineCore: ``generate`` streams Deltas; one background task runs the
    core's steps in a worker thread (see the module's docstring)."""

    # How stale a stats snapshot may get while steps run back to back: metrics() walks every
    # live block, too costly to do after every step of a busy engine.
    STATS_INTERVAL_S = 0.25
    # A step that raises (outside execute/sampling, which fail only their own requests; or
    # StepFailed: model steps fail whatever the batch) fails the requests in flight; this many
    # in a row mean the fault persists: the engine stops and reports unhealthy, so Serve
    # replaces the replica instead of it retrying forever.
    MAX_CONSECUTIVE_STEP_FAILURES = 3
    # A step running longer than this means the device or the loop is stuck.
    STUCK_STEP_S = 120.0
    # An idle engine proves its device works with a tiny op (a step proves it while busy).
    PROBE_TIMEOUT_S = 10.0
    # The GIL switch interval of a process that hosts an engine (CPython's default: 5 ms). The
    # stepping thread runs long stretches of Python (a prefill launches its kernels one by
    # one); the event loop that streams its tokens out then waits up to the interval for each
    # handoff. Measured on an H100 (7B bf16, engine in the ingress, proxy mode, c=1): gRPC
    # TTFT 25.4 ms at 5 ms, 18.3 ms at 0.5 ms, TPOT unchanged.
    SWITCH_INTERVAL_S = 0.0005

    def __init__(self, config: EngineConfig, core: EngineCore | None = None) -> None:
        self.core = core or EngineCore(config)
        if sys.getswitchinterval() > self.SWITCH_INTERVAL_S:  # process-wide; a lower one stays
            sys.setswitchinterval(self.SWITCH_INTERVAL_S)
        self._queues: dict[str, asyncio.Queue] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._stepping = False
        self._step_lock = threading.Lock()
        self._stats: dict[str, float] = {}
        self._stats_time = 0.0
        self._step_failures = 0
        self._step_started = 0.0
        self.broken: str | None = None  # why the engine stopped for good
        # One thread: compiles serialize on the grammar cache's lock anyway.
        self._grammar_thread = ThreadPoolExecutor(1, thread_name_prefix="segserve-grammar")

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    def shutdown(self) -> None:
        self.core.shutdown()

    def _ensure_loop(self) -> None:
        if self.broken is not None:
            raise EngineBroken(self.broken)
        loop = asyncio.get_running_loop()
        if self._task is not None and self._task.done() and self._task.get_loop() is loop:
            # Killed on this event loop: not restarted (its cause is unknown); the health
            # check fails and Serve replaces the replica. (A task of an event loop that has
            # closed, e.g. one asyncio.run per call in tests, is simply started afresh.)
            self.broken = "the engine loop was cancelled"
            raise EngineBroken(self.broken)
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run())
            self._task.add_done_callback(self._loop_ended)

    def _loop_ended(self, task: asyncio.Task) -> None:
        """However the loop ends, no stream may wait on it: each ends with an error, and the
        health check fails from then on (Serve replaces the replica)."""
        if not task.cancelled() and self.broken is None:
            self.broken = f"the engine loop raised {task.exception()!r}"
        if self._queues:
            logger.error("the engine loop stopped (%s); failing the requests in flight: %s",
                         self.broken or "cancelled", sorted(self._queues))  # fmt: skip
        self._fail_all()

    async def _run(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self.core.has_work():
                self._wake.clear()
                await self._wake.wait()
                continue
            # The worker thread steps back to back while there is work, handing each step's
            # deltas to this loop without waiting for it: a loop busy with the streams (Serve's
            # sends, SSE framing) delays their delivery, never the next step.
            halt = threading.Event()
            # Set before the thread starts: stats() must not read live state from now on.
            self._stepping, self._step_started = True, time.monotonic()
            steps = loop.run_in_executor(None, self._steps, loop, halt)
            try:
                await asyncio.shield(steps)
            except asyncio.CancelledError:
                # The thread finishes its step (its deltas still reach their streams) and stops;
                # a restarted loop's first step waits for it (_step_lock).
                halt.set()
                raise
            except ReplicaGroupFailed as e:  # a rank is gone: nothing to retry
                self.broken = str(e)
                logger.error("%s; the replica reports unhealthy", e)
                self._fail_all()
                return
            except Exception:
                self._step_failures += 1
                logger.exception("engine step raised (%d in a row); failing the requests in "
                                 "flight: %s", self._step_failures, sorted(self._queues))
                self._fail_all()
                if self._step_failures >= self.MAX_CONSECUTIVE_STEP_FAILURES:
                    self.broken = f"the engine step failed {self._step_failures} times in a row"
                    logger.error("%s; the replica reports unhealthy", self.broken)
                    return

    def _deliver(self, deltas: list[Delta]) -> None:
        for d in deltas:
            q = self._queues.get(d.request_id)
            if q is not None:
                q.put_nowait(d)

    def _fail_all(self) -> None:
        """End every stream with an error and abort its request (the core drops what it can
        at its next step; a core that cannot step anymore is abandoned whole)."""
        for request_id, q in list(self._queues.items()):
            q.put_nowait(Delta(request_id, 0, [], "", "error", request_done=True))
            self.core.abort(request_id)

    def _steps(self, loop: asyncio.AbstractEventLoop, halt: threading.Event) -> None:
        """Runs in a worker thread, the only place engine state changes while serving: steps
        until the engine has no work or ``halt`` is set, each step's deltas handed to ``loop``.
        A step that raises ends the run (``_run`` counts and handles it). The lock keeps the
        steps of a cancelled loop and those of its restart from overlapping."""
        with self._step_lock:
            self._stepping = True
            try:
                while not halt.is_set():
                    self._step_started = time.monotonic()
                    deltas = self.core.step()
                    # Requests failing alone one after another (EngineCore._isolate) are no
                    # success: the failed steps keep counting until a step succeeds.
                    if not self.core.device_suspect:
                        self._step_failures = 0
                    busy = self.core.has_work()
                    if not busy:  # before the last deltas: whoever they wake reads idle stats
                        self._stats, self._stats_time = self.core.stats(), time.monotonic()
                    if deltas:
                        try:
                            loop.call_soon_threadsafe(self._deliver, deltas)
                        except RuntimeError:  # the loop has closed: no stream is left to read
                            return
                    if not busy:
                        return
                    # After the deltas are handed over, so the walk over the live blocks
                    # (milliseconds for a big batch) never delays a token.
                    now = time.monotonic()
                    if now - self._stats_time >= self.STATS_INTERVAL_S:
                        self._stats, self._stats_time = self.core.stats(), now
            finally:
                self._stepping = False

    async def generate_ready(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[list[Delta]]:
        """As ``generate``, but each item is every delta that is ready when the consumer asks:
        one step's deltas of an n > 1 request, or several steps' when the consumer fell behind.
        A consumer with a fixed cost per item (a stream hop) pays it once for all of them."""
        self._ensure_loop()
        if params is not None and params.structured is not None:
            # Compiling a grammar walks the vocabulary and can take seconds (xgrammar releases
            # the GIL meanwhile): not on this loop, which serves every other stream and the
            # health check. make_request touches no engine state.
            group = await asyncio.get_running_loop().run_in_executor(
                self._grammar_thread, self.core.make_request, prompt, params, request_id)
        else:
            group = self.core.make_request(prompt, params, request_id)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[group.request_id] = queue
        try:
            self.core.submit(group)  # QueueFull: the caller answers 429
        except BaseException:
            del self._queues[group.request_id]
            raise
        self._wake.set()
        done = False
        try:
            while not done:
                ready = [await queue.get()]
                while not queue.empty():
                    ready.append(queue.get_nowait())
                done = ready[-1].request_done
                yield ready
        finally:
            self._queues.pop(group.request_id, None)
            if not done:
                self.core.abort(group.request_id)
                self._wake.set()

    async def abort(self, request_id: str) -> None:
        self.core.abort(request_id)
        if self._wake is not None:
            self._wake.set()

    def check_health(self) -> None:
        """Raises EngineBroken unless the engine can step: its loop is alive (not started yet
        counts as alive), no fault has persisted, and no step has hung."""
        if self.broken is not None:
            raise EngineBroken(self.broken)
        if self._task is not None and self._task.done():
            raise EngineBroken("the engine loop has stopped")
        if self._stepping and time.monotonic() - self._step_started > self.STUCK_STEP_S:
            raise EngineBroken(f"an engine step has run for over {self.STUCK_STEP_S:.0f} s")
        group = self.core.tp_group
        if self._stepping and group is not None:
            # The step thread checks the group between steps only; one waiting in a collective
            # for a rank that died or stopped (SIGSTOP: not dead, so only STUCK_STEP_S would
            # end it) is found here, from the health check.
            try:
                group.check()
                group.check_not_stopped()
            except ReplicaGroupFailed as e:
                self.broken = str(e)
                logger.error("%s; the replica reports unhealthy", self.broken)
                raise EngineBroken(self.broken) from e

    async def probe(self) -> None:
        """``check_health``, and on an idle engine a tiny op on its device: a device that
        fails (or hangs) marks the engine broken before a request finds out."""
        self.check_health()
        if self._stepping or self.core.has_work():
            return  # the steps themselves show the device works
        try:
            await asyncio.wait_for(asyncio.to_thread(self._device_op), self.PROBE_TIMEOUT_S)
        except Exception as e:
            self.broken = f"the device probe failed: {e!r}"
            logger.error("%s; the replica reports unhealthy", self.broken)
            raise EngineBroken(self.broken) from e

    def _device_op(self) -> None:  # a method: the fault tests make the device fail here
        check_device(self.core.runner.device)

    def stats(self) -> dict[str, float]:
        """The KV manager's metrics and queue sizes. While a step runs in the worker thread this
        is the snapshot taken after a recent step (reading live state then would race it)."""
        if self._stepping:
            return dict(self._stats)
        return self.core.stats()
