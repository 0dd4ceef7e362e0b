"""What the engine hands back: streamed deltas and final request outputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first

    def to_dict(self) -> dict[str, Any]:
        return {"token_id": self.token_id, "logprob": self.logprob,
                "top": [[tid, lp] for tid, lp in self.top]}  # fmt: skip


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    cumulative_logprob: float = 0.0
    logprobs: list[TokenLogprob] | None = None
    score: float | None = None  # beam search: the length-penalised score it was ranked by

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "token_ids": self.token_ids,
                               "text": self.text, "finish_reason": self.finish_reason,
                               "cumulative_logprob": self.cumulative_logprob}  # fmt: skip
        if self.score is not None:
            out["score"] = self.score
        if self.logprobs is not None:
            out["logprobs"] = [e.to_dict() for e in self.logprobs]
        return out


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt: str | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # params.prompt_logprobs: an entry per prompt token from the second on (the first has no
    # context to be predicted from)
    prompt_logprobs: list[TokenLogprob] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready. The first (for beam search: best) output is repeated at the top level,
        so the common n=1 case reads as {"token_ids", "text", "finish_reason"} without
        indexing into a list."""
        outputs = [c.to_dict() for c in self.outputs]
        first = outputs[0] if outputs else {"token_ids": [], "text": "", "finish_reason": None}
        return {"request_id": self.request_id, "prompt": self.prompt,
                "prompt_token_ids": self.prompt_token_ids, "token_ids": first["token_ids"],
                "text": first["text"], "finish_reason": first["finish_reason"],
                "outputs": outputs}  # fmt: skip


@dataclass
class Delta:
    """New tokens of one sequence since the last delta (streaming)."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    request_done: bool = False  # set on a request's last delta: the stream ends after it
    num_cached_tokens: int = 0  # on the last delta: prompt tokens served from the prefix cache
    # on the request's first deltas, when asked for: as RequestOutput.prompt_logprobs
    prompt_logprobs: list[TokenLogprob] | None = None
    # with finish_reason "error": the request's own fault, in words for the client (a 400);
    # None: an internal failure (a 500, its cause in the log)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"request_id": self.request_id, "index": self.index,
                               "token_ids": self.token_ids, "text": self.text,
                               "finish_reason": self.finish_reason}  # fmt: skip
        if self.logprobs is not None:
            out["logprobs"] = [e.to_dict() for e in self.logprobs]
        return out
