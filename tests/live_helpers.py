"""Small helpers of the tests that run a real Ray Serve: a free loopback port, and waiting for
state to settle."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1) -> Any:
    """Poll until pred() is truthy: a bound on waiting for state to settle, not a speed test.
    Returns the last value (falsy on timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
