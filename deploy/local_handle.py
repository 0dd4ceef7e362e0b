"""An LLMReplica in the ingress's own process, behind the DeploymentHandle interface the
service core calls (``ingress.engine_in_ingress``).

With one model on one pool there is nothing to route between, so the engine can run inside the
ingress replica: a request then skips the handle's routing and one Ray actor call, and every
streamed item skips one Ray object (serialization, a cross-process hop and a thread hop on each
side). The service core, streams.py and the replica's own code (metrics, error items) are the
same in both layouts; only the handle differs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from .replica import LLMReplica


class LocalCall:
    """What ``handle.options(stream=True).generate.remote(...)`` returns: an async iterator of
    the replica's items, with ``cancel()``."""

    # aclose() tasks in flight: the loop keeps only weak references to tasks
    _closing: ClassVar[set[asyncio.Task]] = set()

    def __init__(self, items: AsyncIterator[dict[str, Any]]) -> None:
        self._items = items

    def __anext__(self) -> Any:
        return self._items.__anext__()

    def cancel(self) -> None:
        """Cancel the replica's generator, as Serve does a replica call's: CancelledError is
        raised where it waits, so it counts the request aborted and its ``finally`` aborts the
        engine request. A wait for an item that is under way is cancelled by its own task (the
        client went away, or the deadline passed), which ends the generator the same way."""
        task = asyncio.get_running_loop().create_task(self._cancel())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _cancel(self) -> None:
        try:
            await self._items.athrow(asyncio.CancelledError())
        # ended already; or cancelled now; or an __anext__ is running (see above)
        except (StopAsyncIteration, asyncio.CancelledError, RuntimeError):
            pass


class LocalReplicaHandle:
    """Stands in for the DeploymentHandle of an LLMReplica deployment."""

    def __init__(self, replica: LLMReplica) -> None:
        self.replica = replica
        self.generate = self  # handle.generate.remote(...)

    def options(self, **_: Any) -> LocalReplicaHandle:
        return self

    def remote(self, prompt_ids: list[int], sampling: dict[str, Any], request_id: str,
               caller: Any = None) -> LocalCall:  # fmt: skip
        # ``caller`` is this very process: it cannot die while the call runs
        return LocalCall(self.replica.generate(prompt_ids, sampling, request_id))


class LocalRoutingView:
    """The replica's routing stats where PoolRouter looks for a handle's request router
    (routing_view.ROUTERS): the pool spill check and /metrics read this replica only."""

    def __init__(self, replica: LLMReplica, replica_id: str) -> None:
        self.replica = replica
        self.replica_id = replica_id

    def replica_stats(self) -> list[dict[str, float]]:
        return [self.replica.record_routing_stats()]

    def replica_stats_by_id(self) -> dict[str, dict[str, float]]:
        return {self.replica_id: self.replica.record_routing_stats()}
