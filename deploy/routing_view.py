"""Where this process's request routers publish their view of the replicas.

A Serve request router class is pickled *by value* into every process that holds a handle
(Ray 2.60 registers its module for by-value pickling), so a registry kept in router.py would be
a private copy per unpickled class. This module is imported by reference everywhere, so the
ingress's PoolRouter and the routers of its handles share this one dict.
"""

from __future__ import annotations

from typing import Any

# (app name, deployment name) -> the KVHeadroomRouter of that deployment's handle
ROUTERS: dict[tuple[str, str], Any] = {}


def mark_unavailable(deployment: str, replica_unique_id: str) -> None:
    """Tell the routers of ``deployment`` to skip a replica whose engine is broken."""
    for (_, name), router in list(ROUTERS.items()):
        if name == deployment:
            router.mark_unavailable(replica_unique_id)
