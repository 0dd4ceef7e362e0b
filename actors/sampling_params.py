"""SamplingParams: how one request is decoded. Validated on construction, so a bad value is a
ValueError naming the field before the request ever reaches the engine loop."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _in(lo: float, hi: float, lo_open: bool = False) -> Callable[[Any], bool]:
    return lambda v: _num(v) and (lo < v if lo_open else lo <= v) and v <= hi


# (field, predicate, what a valid value is). Predicates check the type first, so a wrongly
# typed value is reported as a bad value of its field, never as a TypeError.
_CHECKS: list[tuple[str, Callable[[Any], bool], str]] = [
    ("n", lambda v: _int(v) and v >= 1, "must be an integer >= 1"),
    ("max_tokens", lambda v: _int(v) and v >= 1, "must be an integer >= 1"),
    ("temperature", _in(0.0, 100.0), "must be a number in [0, 100]"),
    ("top_k", lambda v: _int(v) and v >= 0, "must be -1, 0 or an integer >= 1"),
    ("top_p", _in(0.0, 1.0, lo_open=True), "must be a number in (0, 1]"),
    ("min_p", _in(0.0, 1.0), "must be a number in [0, 1]"),
    ("repetition_penalty", _in(0.0, 10.0, lo_open=True), "must be a number in (0, 10]"),
    ("presence_penalty", _in(-2.0, 2.0), "must be a number in [-2, 2]"),
    ("frequency_penalty", _in(-2.0, 2.0), "must be a number in [-2, 2]"),
    ("seed", lambda v: v is None or _int(v), "must be an integer"),
    (
        "stop",
        lambda v: isinstance(v, list | tuple) and all(isinstance(s, str) and s for s in v),
        "must be a string or a list of non-empty strings",
    ),
    (
        "stop_token_ids",
        lambda v: isinstance(v, list | tuple) and all(_int(t) and t >= 0 for t in v),
        "must be a list of non-negative integers",
    ),
    (
        "logprobs",
        lambda v: v is None or (_int(v) and 0 <= v <= 20),
        "must be an integer in [0, 20]",
    ),
    ("beam_width", lambda v: _int(v) and 1 <= v <= 64, "must be an integer in [1, 64]"),
    ("length_penalty", _in(-10.0, 10.0), "must be a number in [-10, 10]"),
    (
        "early_stopping",
        lambda v: v is True or v is False or v == "never",
        "must be true, false or 'never'",
    ),
    ("ignore_eos", lambda v: isinstance(v, bool), "must be a boolean"),
    ("include_stop_str_in_output", lambda v: isinstance(v, bool), "must be a boolean"),
    ("skip_special_tokens", lambda v: isinstance(v, bool), "must be a boolean"),
    (
        "cache_salt",
        lambda v: v is None or (isinstance(v, str) and 0 < len(v) <= 512),
        "must be a non-empty string of at most 512 characters",
    ),
]


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF/CTRL style, over prompt and output tokens
    presence_penalty: float = 0.0  # OpenAI style, over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: none; 0: the chosen token's; N: plus the top N
    # Beam search: beam_width > 1 switches it on (deterministic, like HF num_beams).
    beam_width: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never", as in HF
    skip_special_tokens: bool = True
    # Seeds the prefix-cache keys: only requests with the same salt share cached prefix blocks.
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is None:
            self.stop = []
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if self.top_k == -1:
            self.top_k = 0
        for name, valid, why in _CHECKS:
            value = getattr(self, name)
            try:
                ok = bool(valid(value))
            except (TypeError, ValueError):  # e.g. a string where a number belongs
                ok = False
            if not ok:
                raise ValueError(f"invalid sampling parameter {name}={value!r}: {why}")
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        if self.use_beam_search and self.n not in (1, self.beam_width):
            raise ValueError(
                f"invalid sampling parameter n={self.n}: beam search returns all "
                f"beam_width={self.beam_width} beams, best first; leave n at 1"
            )
        if self.use_beam_search and (self.stop or self.logprobs is not None):
            # Beams are re-ranked until the end, so per-token streams of text or log-probs
            # would describe hypotheses that may be dropped later.
            field_name = "stop" if self.stop else "logprobs"
            raise ValueError(
                f"invalid sampling parameter {field_name}: not supported with beam search"
            )

    @property
    def use_beam_search(self) -> bool:
        return self.beam_width > 1

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def num_sequences(self) -> int:
        """How many sequences the request runs at once: beams, or n samples."""
        return self.beam_width if self.use_beam_search else self.n
