"""Small helpers of the tests that run a real Ray Serve: starting Ray as `segserve serve`
does, a free loopback port, and waiting for state to settle."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any


def start_ray(num_cpus: int, **init_kwargs: Any) -> None:
    """A local Ray in the service's default serve mode (its EVERY_MODE_ENV too), as `segserve
    serve` starts it, so the live tests run what users run. The mode is environment that
    every Ray process reads once, so it goes in before ``ray.init``."""
    import ray
    from segserve.deploy.launch import DEFAULT_SERVE_MODE, set_serve_mode

    set_serve_mode(DEFAULT_SERVE_MODE)
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, **init_kwargs)


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
