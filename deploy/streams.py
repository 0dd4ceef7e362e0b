"""Replica streams as the ingress reads them: one per prompt, merged for a batch of prompts.

A stream is opened by awaiting its first item, so an error the replica finds (pool too small,
its queue full) surfaces before a response is committed. Closing a stream early (the client
went away, or a sibling prompt of its batch failed) cancels the replica call, which aborts the
request and frees its KV blocks; every stream is closed exactly once, started or not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Protocol

from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from ..proto.servicer import opaque_internal, replica_gone
from . import routing_view
from .caller_watch import calling_actor
from .errors import APIError

logger = logging.getLogger(__name__)

# The replica process died or cannot be reached: nothing about the request was wrong, and
# another replica (or this one, replaced) can serve it.
REPLICA_GONE = (RayActorError, ActorUnavailableError)


class ReplicaGone(APIError):
    """503: the replica died or became unreachable; the request itself was fine."""


def replica_error(e: BaseException, request_id: str) -> APIError:
    """A failed replica call as the status the client should see. Ray's messages carry actor
    ids, pids, addresses and tracebacks: those go to the log under the request id, and the
    client gets only the id to quote."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, BackPressureError):
        return APIError(429, "the service is overloaded, retry later")
    if isinstance(e, DeploymentUnavailableError):
        return APIError(503, f"no replica is available, retry later (request id {request_id})")
    if isinstance(e, REPLICA_GONE):
        logger.warning("request %s: its replica went away: %r", request_id, e)
        return ReplicaGone(503, replica_gone(request_id))
    logger.error("request %s: replica call failed", request_id, exc_info=e)
    return APIError(500, opaque_internal(request_id))


class _Prepared(Protocol):  # service.Prepared, without the import cycle
    prompt_ids: list[int]
    sampling: dict[str, Any]
    request_id: str
    pool: Any
    cached_tokens: int
    deadline: float | None


async def _next(gen: Any, prep: _Prepared) -> dict[str, Any] | list[dict[str, Any]]:
    """The call's next item, by the request's deadline. On timeout the item's wait is
    cancelled; the caller cancels the call, which aborts the engine request. (A timeout scope,
    not ``wait_for``: that wraps every item's wait in a task of its own.)"""
    if prep.deadline is None:
        return await gen.__anext__()
    try:
        async with asyncio.timeout(max(prep.deadline - time.monotonic(), 0)):
            return await gen.__anext__()
    except TimeoutError:
        raise APIError(504, f"the request timed out (request_timeout_s; request id "
                       f"{prep.request_id})") from None  # fmt: skip


class ReplicaStream:
    """The items of one replica call, one delta each; ``close()`` (idempotent) releases it.

    The replica sends the deltas that were ready together as one list (replica.coalesce): they
    are handed out one by one from ``_ready``."""

    def __init__(self, gen: Any, first: dict[str, Any] | list[dict[str, Any]],
                 prep: _Prepared) -> None:  # fmt: skip
        self._gen = gen
        self._ready = deque(first if isinstance(first, list) else [first])
        self.prep = prep
        self._closed = False

    def __aiter__(self) -> ReplicaStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self._closed:
            raise StopAsyncIteration
        if not self._ready:
            try:
                item = await _next(self._gen, self.prep)
            except StopAsyncIteration:
                self._release(cancel=False)
                raise
            except BaseException as e:
                self.close()
                if isinstance(e, Exception):
                    raise replica_error(e, self.prep.request_id) from e
                raise
            if isinstance(item, list):
                self._ready.extend(item)
            elif "error" in item:
                self.close()
                raise APIError.from_dict(item["error"])
            else:
                self._ready.append(item)
        item = self._ready.popleft()
        self.prep.cached_tokens = item.get("num_cached_tokens", self.prep.cached_tokens)
        return item

    def _release(self, cancel: bool) -> None:
        if not self._closed:
            self._closed = True
            self.prep.pool.in_flight -= 1
            if cancel:
                self._gen.cancel()

    def close(self) -> None:
        self._release(cancel=True)


async def open_stream(handle: Any, prep: _Prepared, retries: int = 1) -> ReplicaStream:
    """Start one request on ``handle`` (its deployment) and wait for its first item. A replica
    that dies, or whose engine is broken, before the first item has streamed nothing, so the
    request is sent again (``retries`` times): the router no longer picks that replica (Serve
    drops a dead one; ours skips one marked unavailable)."""
    gen = None
    prep.pool.in_flight += 1
    try:
        # Serve may refuse at .remote() already (its handle queue is full: backpressure).
        args = (prep.prompt_ids, prep.sampling, prep.request_id)
        caller = calling_actor()  # so that the replica ends the call if this replica dies
        call = handle.options(stream=True).generate
        gen = call.remote(*args, caller) if caller is not None else call.remote(*args)
        first = await _next(gen, prep)
    except (asyncio.CancelledError, APIError):  # the client went away, or the deadline passed
        prep.pool.in_flight -= 1
        if gen is not None:
            gen.cancel()
        raise
    except Exception as e:  # the call failed: nothing left to cancel
        prep.pool.in_flight -= 1
        if retries > 0 and isinstance(e, REPLICA_GONE):
            logger.warning("request %s: replica went away before its first token, retrying: %r",
                           prep.request_id, e)  # fmt: skip
            return await open_stream(handle, prep, retries - 1)
        raise replica_error(e, prep.request_id) from e
    if isinstance(first, dict) and "error" in first:
        prep.pool.in_flight -= 1
        broken = first.get("unavailable_replica")
        if broken is not None:  # its engine cannot step: nothing was generated
            routing_view.mark_unavailable(prep.pool.deployment, broken)
            if retries > 0:
                logger.warning("request %s: its replica's engine is broken, retrying",
                               prep.request_id)  # fmt: skip
                return await open_stream(handle, prep, retries - 1)
        raise APIError.from_dict(first["error"])
    return ReplicaStream(gen, first, prep)


class MergedStream:
    """``(position in the batch, item)`` from several streams as the items arrive."""

    def __init__(self, streams: list[ReplicaStream]) -> None:
        self.streams = streams
        self._iter = self._merge() if len(streams) > 1 else self._one()

    def __aiter__(self) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        return self._iter

    async def _one(self) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        try:
            async for item in self.streams[0]:
                yield 0, item
        finally:
            self.close()

    async def _merge(self) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        queue: asyncio.Queue = asyncio.Queue()
        end = object()

        async def pump(pos: int, stream: ReplicaStream) -> None:
            try:
                async for item in stream:
                    queue.put_nowait((pos, item))
                queue.put_nowait((pos, end))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # handed to the reader, who fails the whole batch
                queue.put_nowait((pos, e))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self.streams)]
        try:
            remaining = len(tasks)
            while remaining:
                pos, item = await queue.get()
                if item is end:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield pos, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.close()

    def close(self) -> None:
        for s in self.streams:
            s.close()


async def open_streams(handles: dict[str, Any], preps: list[_Prepared]) -> MergedStream:
    """Open every prompt's stream; if any fails, close the others and raise its error."""
    opened = await asyncio.gather(
        *(open_stream(handles[p.pool.deployment], p) for p in preps), return_exceptions=True)
    failed = [r for r in opened if isinstance(r, BaseException)]
    if failed:
        for r in opened:
            if isinstance(r, ReplicaStream):
                r.close()
        raise failed[0]
    return MergedStream(opened)
