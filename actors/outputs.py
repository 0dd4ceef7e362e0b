"""What the engine hands back: streamed deltas and final request outputs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    cumulative_logprob: float = 0.0
    logprobs: list[TokenLogprob] | None = None
    score: float | None = None  # beam search: the length-penalised score it was ranked by


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
