"""Errors the client sees: an OpenAI error body over HTTP, a status code over gRPC."""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error the client caused (or overload); rendered as an OpenAI error body."""

    GRPC_CODES = {
        400: "INVALID_ARGUMENT",
        401: "UNAUTHENTICATED",
        404: "NOT_FOUND",
        429: "RESOURCE_EXHAUSTED",
        500: "INTERNAL",
        503: "UNAVAILABLE",
        504: "DEADLINE_EXCEEDED",
    }
    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        413: "invalid_request_error",
        415: "invalid_request_error",
        429: "rate_limit_error",
        500: "internal_error",
        503: "service_unavailable",
        504: "timeout_error",
    }

    # Messages quote what the client sent; a long value is cut. Over gRPC the message is the
    # status details, a header: past 16 KiB the client drops the call and reports
    # RESOURCE_EXHAUSTED ("metadata size exceeds hard limit") instead of this error.
    MAX_MESSAGE_CHARS = 1000

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        if len(message) > self.MAX_MESSAGE_CHARS:
            message = message[: self.MAX_MESSAGE_CHARS - 30] + f" ... ({len(message)} chars)"
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def __reduce__(self) -> tuple:
        # Ray pickles exceptions across processes; the default would call APIError(message).
        return (type(self), (self.status, self.message, self.param))

    @property
    def grpc_code_name(self) -> str:
        return self.GRPC_CODES.get(self.status, "UNKNOWN")

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.status,
            }
        }

    def to_dict(self) -> dict[str, Any]:
        """Crosses the Ray boundary (replica -> ingress) as plain data."""
        return {"status": self.status, "message": self.message, "param": self.param}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> APIError:
        return cls(d["status"], d["message"], d.get("param"))


def internal_error(e: BaseException, what: str) -> APIError:
    """An unexpected exception in ``what`` as the client's 500 / INTERNAL: its traceback goes to
    the log under a fresh id, which the message names (nothing else of it reaches the client)."""
    ref = uuid.uuid4().hex
    logger.error("%s failed (error id %s)", what, ref, exc_info=e)
    return APIError(500, f"internal error (error id {ref}); the server log has the cause")


# The engine's ValueErrors (actors/engine.py make_request, SamplingParams) name the problem in
# words; these patterns name the request field, OpenAI's `param`, for the replica's 400s.
_ENGINE_PARAMS = [
    (re.compile(r"invalid sampling parameter (\w+)"), None),  # the field is the match
    (re.compile(r"prompt is empty|prompt token id|vocabulary|prompt token ids"), "prompt"),
    (re.compile(r"max length|KV blocks"), "max_tokens"),
    (re.compile(r"max_num_seqs"), "n"),
]


def engine_error_param(message: str) -> str | None:
    """The request field an engine ValueError is about, when its message says."""
    for pattern, param in _ENGINE_PARAMS:
        m = pattern.search(message)
        if m:
            return param or m.group(1)
    return None
