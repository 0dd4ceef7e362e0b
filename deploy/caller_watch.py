"""Ending the replica calls of an ingress replica that died.

Ray does not cancel an actor call when its caller dies: a stream whose ingress was killed (or
crashed, or lost its node) would go on generating to its last token, holding its KV blocks and a
batch slot the whole time, for a client that is gone. So the ingress names itself in each call
(``calling_actor``), and the replica pings its callers every ``PERIOD_S`` while it has calls
from them (``CallerWatch``): the calls of one that no longer exists are cancelled, exactly as a
client's cancel would (the engine request is aborted and its blocks freed).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

import ray
from ray.exceptions import RayActorError

logger = logging.getLogger(__name__)

# An actor's id (hex) and its handle. (Not its name: a replica's namespace, Serve's, is not the
# one its runtime context reports, so a name lookup would find nothing.)
Caller = tuple[str, Any]


@functools.cache
def calling_actor() -> Caller | None:
    """This process's actor as a replica can reach it, or None outside an actor (a driver, a
    test, or the engine in this very process)."""
    if not ray.is_initialized():
        return None
    ctx = ray.get_runtime_context()
    actor_id = ctx.get_actor_id()
    return (actor_id, ctx.current_actor) if actor_id else None


async def _exists(handle: Any) -> bool:
    try:
        # Every actor answers __ray_ready__; a dead one's call fails at once.
        await asyncio.wait_for(handle.__ray_ready__.remote(), CallerWatch.PERIOD_S * 5)
    except RayActorError:  # it died (ActorUnavailableError, a blip, is not this)
        return False
    except Exception:  # busy, or unreachable for now: no reason to end anything
        logger.debug("caller check failed", exc_info=True)
    return True


class CallerWatch:
    """Tracks each call's task by its caller; cancels the tasks of callers that died."""

    PERIOD_S = 2.0

    def __init__(self) -> None:
        self._callers: dict[str, tuple[Any, set[asyncio.Task]]] = {}  # id: (handle, its calls)
        self._task: asyncio.Task | None = None

    def add(self, caller: Caller, task: asyncio.Task) -> None:
        actor_id, handle = caller
        self._callers.setdefault(actor_id, (handle, set()))[1].add(task)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._watch())

    def discard(self, caller: Caller, task: asyncio.Task) -> None:
        entry = self._callers.get(caller[0])
        if entry is not None:
            entry[1].discard(task)
            if not entry[1]:
                del self._callers[caller[0]]

    async def _watch(self) -> None:
        while self._callers:
            await asyncio.sleep(self.PERIOD_S)
            callers = [(actor_id, handle) for actor_id, (handle, _) in self._callers.items()]
            # pinged together: one busy caller delays none of the others
            alive = await asyncio.gather(*(_exists(handle) for _, handle in callers))
            for (actor_id, _), exists in zip(callers, alive, strict=True):
                if not exists and actor_id in self._callers:
                    _, tasks = self._callers.pop(actor_id)
                    logger.warning("caller %s is gone: cancelling its %d call(s)", actor_id,
                                   len(tasks))  # fmt: skip
                    for task in tasks:
                        task.cancel()
