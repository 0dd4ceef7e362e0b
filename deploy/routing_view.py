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
