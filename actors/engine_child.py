"""The engine process's side of EngineProcess (engine_process.py): ``python -m
segserve.actors.engine_child FD`` builds an EngineCore from the config the parent sends down the
socket FD, then steps it while it has work, reading the parent's messages between steps.
"""

from __future__ import annotations

import logging
import pickle
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

from .async_engine import AsyncEngine, EngineBroken, check_device
from .communicator import ReplicaGroupFailed
from .config import EngineConfig
from .engine import EngineCore

logger = logging.getLogger(__name__)


class _ChildLoop:
    """Steps the core back to back while it has work and reads the parent's messages between
    steps (without waiting while there is work). One thread: nothing else touches the core, but
    the grammar compiles, which run in a thread of their own as in AsyncEngine."""

    def __init__(self, conn: Connection, config: EngineConfig) -> None:
        self.conn = conn
        self.core = EngineCore(config)
        self.inflight: set[str] = set()
        self.compiling: dict[str, Any] = {}  # request id -> Future of make_request
        self.grammar_thread = ThreadPoolExecutor(1, thread_name_prefix="segserve-grammar")
        self.step_failures = 0
        self.stats_time = 0.0
        self.stopped = False  # a persistent fault: stop stepping, keep answering

    def run(self) -> None:
        conn, core = self.conn, self.core
        conn.send(("ready", {"max_model_len": core.max_model_len, "stats": core.stats()}))
        try:
            while True:
                busy = core.has_work() and not self.stopped
                # Idle: block on the socket (with a short timeout while a grammar compiles).
                wait = 0 if busy else (0.005 if self.compiling else None)
                while conn.poll(wait):
                    if not self._handle(conn.recv()):
                        return
                    wait = 0
                self._submit_compiled()
                if core.has_work() and not self.stopped:
                    self._step()
        except (EOFError, OSError):  # the parent is gone: so is every stream
            return

    def _handle(self, message: tuple) -> bool:
        kind = message[0]
        if kind == "submit":
            _, request_id, prompt, params = message
            if params is not None and params.structured is not None:
                self.compiling[request_id] = self.grammar_thread.submit(
                    self.core.make_request, prompt, params, request_id)
            else:
                self._submit(request_id, lambda: self.core.make_request(prompt, params, request_id))
        elif kind == "abort":
            request_id = message[1]
            future = self.compiling.pop(request_id, None)
            if future is not None:  # out of `compiling`, it is never submitted
                future.cancel()
            elif request_id in self.inflight:
                self.core.abort(request_id)
        elif kind == "probe":
            self.conn.send(("probe", message[1], self._probe()))
        elif kind == "shutdown":
            return False
        return True

    def _submit(self, request_id: str, make) -> None:
        try:
            if self.stopped:
                raise EngineBroken("the engine has stopped")
            self.core.submit(make())
            self.inflight.add(request_id)
        except Exception as e:  # ValueError, QueueFull...: the parent's generate raises it
            self.conn.send(("rejected", request_id, _picklable(e)))

    def _submit_compiled(self) -> None:
        for request_id, future in list(self.compiling.items()):
            if future.done():
                del self.compiling[request_id]
                self._submit(request_id, future.result)

    def _step(self) -> None:
        core = self.core
        try:
            deltas = core.step()
        except ReplicaGroupFailed as e:  # a rank is gone: nothing to retry
            self._fail_inflight()
            self._stop(str(e))
            return
        except Exception:
            self.step_failures += 1
            logger.exception("engine step raised (%d in a row); failing the requests in "
                             "flight: %s", self.step_failures, sorted(self.inflight))  # fmt: skip
            self._fail_inflight()
            if self.step_failures >= AsyncEngine.MAX_CONSECUTIVE_STEP_FAILURES:
                self._stop(f"the engine step failed {self.step_failures} times in a row")
            return
        if not core.device_suspect:
            self.step_failures = 0
        for d in deltas:
            if d.request_done:
                self.inflight.discard(d.request_id)
        busy = core.has_work()
        now = time.monotonic()
        # Idle: the stats go first, so whoever the last deltas wake reads idle stats. Busy:
        # after the deltas, so the walk over the live blocks never delays a token.
        if not busy:
            self._send_stats(now)
        if deltas:
            self.conn.send(("deltas", deltas))
        if busy and now - self.stats_time >= AsyncEngine.STATS_INTERVAL_S:
            self._send_stats(now)

    def _send_stats(self, now: float) -> None:
        self.conn.send(("stats", self.core.stats()))
        self.stats_time = now

    def _fail_inflight(self) -> None:
        for request_id in self.inflight:
            self.core.abort(request_id)
        self.conn.send(("failed", sorted(self.inflight)))
        self.inflight.clear()

    def _stop(self, why: str) -> None:
        logger.error("%s; the replica reports unhealthy", why)
        self.stopped = True
        self.conn.send(("broken", why))

    def _probe(self) -> str | None:
        if self.stopped:
            return "the engine has stopped"
        try:
            check_device(self.core.runner.device)
            return None
        except Exception as e:
            return repr(e)


def _picklable(e: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(str(e))


def main(fd: int) -> None:
    conn = Connection(fd)
    config, level = conn.recv()  # and the parent's segserve log level
    logging.basicConfig(format="%(asctime)s %(levelname)s engine-process %(name)s: %(message)s")
    logging.getLogger("segserve").setLevel(level)
    try:
        loop = _ChildLoop(conn, config)
    except Exception as e:
        logger.exception("the engine failed to start")
        conn.send(("failed", _picklable(e)))
        return
    try:
        loop.run()
    finally:
        loop.core.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]))
