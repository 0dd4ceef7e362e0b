"""EngineProcess: the engine core in a process of its own, behind AsyncEngine's interface.

In a Serve replica the stepping thread of an in-process AsyncEngine shares one GIL with Ray's
core-worker threads, Serve's replica loop and (engine in the ingress) the HTTP/gRPC code. A
prefill launches its kernels one by one from Python, so every one of those threads waits for
the GIL while it runs, and it waits for theirs: the time to first token and the gap between
tokens grow with the traffic the replica's other threads carry. Here the core steps in a child
process (``python -m segserve.actors.engine_child``, vLLM V1's split), and the replica's
process only moves messages: requests, aborts and probes down a local socket, each step's deltas
and a stats snapshot back up. The parent reads them on its event loop (``add_reader``), so a
token costs one socket write and one loop wake-up to reach its stream.

Lifecycle: the child exits when its socket closes (the replica died or shut down), so it never
outlives its replica. A child that dies fails every request in flight, and the replica then
reports unhealthy, as for an engine loop that stopped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from typing import Any

from .async_engine import AsyncEngine, EngineBroken, EngineFront
from .config import EngineConfig
from .outputs import Delta
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)


CHILD_MODULE = "segserve.actors.engine_child"


def engine_processes() -> dict[int, int]:
    """{pid: parent pid} of the engine processes running on this machine (Linux's /proc; empty
    elsewhere): for tools that watch them, such as bench/soak.py."""
    out = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if CHILD_MODULE.encode() not in f.read():
                    continue
            with open(f"/proc/{entry}/status") as f:
                out[int(entry)] = int(next(ln.split()[1] for ln in f if ln.startswith("PPid:")))
        except (OSError, ValueError, StopIteration):  # gone meanwhile, or not a process
            continue
    return out


def supports_engine_process(config: EngineConfig) -> bool:
    """The child is no Ray worker: a replica group whose ranks are Ray actors stays in-process."""
    return config.tensor_parallel_size == 1 or config.tp_launcher == "processes"


class EngineProcess(EngineFront):
    """The parent's side: ``generate_ready``/``generate``, ``abort``, ``stats``, ``probe`` and
    ``check_health`` as AsyncEngine's, the core in a child process (see the module's docstring)."""

    START_TIMEOUT_S = 900.0  # loading a big checkpoint from a slow disk
    # Requests in flight and no word from the child for this long: a step hangs.
    STUCK_STEP_S = AsyncEngine.STUCK_STEP_S
    PROBE_TIMEOUT_S = AsyncEngine.PROBE_TIMEOUT_S
    SOCKET_BUFFER_BYTES = 4 * 2**20

    def __init__(self, config: EngineConfig) -> None:
        if not supports_engine_process(config):
            raise ValueError("an engine process needs tensor_parallel_size 1 or tp_launcher "
                             "'processes' (its ranks cannot be Ray actors)")
        ours, theirs = socket.socketpair()
        for sock in (ours, theirs):  # a long prompt or a big step's deltas in one write
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.SOCKET_BUFFER_BYTES)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.SOCKET_BUFFER_BYTES)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", CHILD_MODULE, str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
        )  # fmt: skip
        theirs.close()
        self._conn = Connection(ours.detach())
        self._queues: dict[str, asyncio.Queue] = {}
        self._probes: dict[str, asyncio.Future] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_heard = time.monotonic()
        self.broken: str | None = None
        self._shutting_down = False
        try:
            self._conn.send((config, logging.getLogger("segserve").getEffectiveLevel()))
            if not self._conn.poll(self.START_TIMEOUT_S):
                raise RuntimeError(f"no answer in {self.START_TIMEOUT_S:.0f} s")
            kind, info = self._conn.recv()
        except (EOFError, OSError, RuntimeError) as e:
            self._proc.kill()
            code = self._proc.wait()
            raise RuntimeError(f"the engine process did not start ({e!r}, exit code {code}); "
                               "its log has the cause") from None
        if kind == "failed":  # the child's own exception: a bad model path, out of memory...
            self._proc.wait()
            raise info
        self.max_model_len: int = info["max_model_len"]
        self._stats: dict[str, float] = info["stats"]

    # ----- messages from the child, read on the event loop ----------------------------------
    def _bind(self) -> bool:
        """Read the child's messages on the running loop: the first caller's (a test's next
        ``asyncio.run`` takes over from a closed one). False if another thread's running loop
        reads them: its queues and futures are not this loop's to touch."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return True
        if self._loop is not None and not self._loop.is_closed():
            if self._loop.is_running():
                return False
            self._loop.remove_reader(self._conn.fileno())
        self._loop = loop
        loop.add_reader(self._conn.fileno(), self._on_readable)
        return True

    def _on_readable(self) -> None:
        try:
            while self._conn.poll():
                self._dispatch(self._conn.recv())
        except (EOFError, OSError):
            code = self._proc.wait()
            self._stop_reading()
            if self._shutting_down:
                self._conn.close()
                self._fail_all()
            else:
                self._break(f"the engine process exited with code {code}")

    def _stop_reading(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._conn.fileno())
        self._loop = None

    def _dispatch(self, message: tuple) -> None:
        self._last_heard = time.monotonic()
        kind = message[0]
        if kind == "deltas":
            for d in message[1]:
                q = self._queues.get(d.request_id)
                if q is not None:
                    q.put_nowait(d)
        elif kind == "stats":
            self._stats = message[1]
        elif kind == "rejected":  # make_request or submit raised: generate_ready re-raises it
            q = self._queues.get(message[1])
            if q is not None:
                q.put_nowait(message[2])
        elif kind == "failed":  # a step raised: the child has ended these requests
            self._fail(message[1])
        elif kind == "broken":
            self._break(message[1])
        elif kind == "probe":
            fut = self._probes.pop(message[1], None)
            if fut is not None and not fut.done():
                fut.set_result(message[2])

    def _break(self, why: str) -> None:
        if self.broken is None:
            self.broken = why
            logger.error("%s; the replica reports unhealthy", why)
        self._fail_all()

    def _fail_all(self) -> None:
        self._fail(list(self._queues))

    def _fail(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            q = self._queues.get(request_id)
            if q is not None:
                q.put_nowait(Delta(request_id, 0, [], "", "error", request_done=True))

    def _send(self, message: tuple) -> None:
        try:
            self._conn.send(message)
        except OSError as e:  # the child is gone; its EOF will say how
            raise EngineBroken(f"the engine process is gone ({e!r})") from None

    # ----- AsyncEngine's interface -----------------------------------------------------------
    async def generate_ready(
        self, prompt: Any, params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[list[Delta]]:
        """As AsyncEngine.generate_ready: the child's validation errors (ValueError) and a full
        queue (QueueFull) are raised here, before the first item."""
        if self.broken is not None:
            raise EngineBroken(self.broken)
        if not self._bind():
            raise RuntimeError("this EngineProcess is read on another thread's event loop")
        request_id = request_id or uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        if not self._queues:  # from idle: the stuck-step clock starts now
            self._last_heard = time.monotonic()
        self._queues[request_id] = queue
        done = False
        try:
            self._send(("submit", request_id, prompt, params))
            while not done:
                ready = [await queue.get()]
                while not queue.empty():
                    ready.append(queue.get_nowait())
                if isinstance(ready[0], BaseException):
                    done = True  # the child never took it
                    raise ready[0]
                done = ready[-1].request_done
                yield ready
        finally:
            self._queues.pop(request_id, None)
            if not done and self.broken is None:
                try:
                    self._send(("abort", request_id))
                except EngineBroken:
                    pass

    async def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def check_health(self) -> None:
        """Raises EngineBroken unless the child can step: it runs, no fault has persisted,
        and it has not gone silent for STUCK_STEP_S with requests in flight."""
        if self.broken is not None:
            raise EngineBroken(self.broken)
        code = self._proc.poll()
        if code is not None:
            # No stream is touched here (Serve may call this off the event loop): the socket's
            # EOF, read on the loop, fails them.
            raise EngineBroken(f"the engine process exited with code {code}")
        if self._queues and time.monotonic() - self._last_heard > self.STUCK_STEP_S:
            raise EngineBroken(f"an engine step has run for over {self.STUCK_STEP_S:.0f} s")

    async def probe(self) -> None:
        """``check_health``, and on an idle engine a tiny op on its device, in the child."""
        self.check_health()
        if self._queues or not self._bind():
            # The steps themselves show the device works. (Called on a loop that does not
            # read the child, the checks above are what it can do.)
            return
        token = uuid.uuid4().hex
        fut = self._probes[token] = asyncio.get_running_loop().create_future()
        try:
            self._send(("probe", token))
            error = await asyncio.wait_for(fut, self.PROBE_TIMEOUT_S)
        except Exception as e:
            error = repr(e)
        finally:
            self._probes.pop(token, None)
        if error is not None:
            self._break(f"the device probe failed: {error}")
            raise EngineBroken(self.broken)

    def stats(self) -> dict[str, float]:
        """The child's latest snapshot: taken when it went idle, and every
        AsyncEngine.STATS_INTERVAL_S while it steps."""
        return dict(self._stats)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the child: it shuts its core down and exits; killed if it does not. Safe from
        any thread (Serve stops a replica from its own): the socket is closed here only when
        no other thread's loop still reads it; that one sees the EOF and lets it go."""
        self._shutting_down = True
        self.broken = self.broken or "the engine has shut down"
        if self._proc.poll() is None:
            try:
                self._conn.send(("shutdown",))
                self._proc.wait(timeout_s)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        loop = self._loop
        if loop is not None and not loop.is_closed() and loop.is_running():
            try:
                ours = asyncio.get_running_loop() is loop
            except RuntimeError:
                ours = False
            if not ours:
                return
        self._stop_reading()
        self._conn.close()
