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


# Below this a temperature is greedy: dividing float32 logits by it overflows to inf (and
# inf - inf to NaN) long before it changes which token wins; vLLM draws the same line.
GREEDY_TEMPERATURE = 1e-5

# How long a request's lists may be. Each is read on every decoding step of the request (or,
# for bad_words, tokenized on the replica's event loop), so an unbounded one slows every other
# request in the batch: 500,000 allowed_token_ids took a concurrent stream's token gap from 4 to
# 78 ms, 45,000 bad_words blocked the replica past its health checks. OpenAI allows 4 stop
# strings; these leave room for generated lists and stay cheap per step.
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 1024  # per stop string: each is searched for in the text as it grows
MAX_TOKEN_ID_LIST = 16384  # stop_token_ids, allowed_token_ids, logit_bias entries
MAX_BAD_WORDS = 1024
# top_k past the vocabulary means "off"; past int64 it cannot reach the device at all.
MAX_TOP_K = 2**31 - 1


def _bounded(v: Any, most: int) -> bool:
    return isinstance(v, list | tuple) and len(v) <= most


# (field, predicate, what a valid value is). Predicates check the type first, so a wrongly
# typed value is reported as a bad value of its field, never as a TypeError.
_CHECKS: list[tuple[str, Callable[[Any], bool], str]] = [
    ("n", lambda v: _int(v) and v >= 1, "must be an integer >= 1"),
    # 0: prefill only (prompt scoring with prompt_logprobs): no token is generated
    ("max_tokens", lambda v: _int(v) and v >= 0, "must be an integer >= 0"),
    ("min_tokens", lambda v: _int(v) and v >= 0, "must be an integer >= 0"),
    ("temperature", _in(0.0, 100.0), "must be a number in [0, 100]"),
    ("top_k", lambda v: _int(v) and 0 <= v <= MAX_TOP_K,
     f"must be -1, 0 or an integer in [1, {MAX_TOP_K}]"),
    ("top_p", _in(0.0, 1.0, lo_open=True), "must be a number in (0, 1]"),
    ("min_p", _in(0.0, 1.0), "must be a number in [0, 1]"),
    ("repetition_penalty", _in(0.0, 10.0, lo_open=True), "must be a number in (0, 10]"),
    ("presence_penalty", _in(-2.0, 2.0), "must be a number in [-2, 2]"),
    ("frequency_penalty", _in(-2.0, 2.0), "must be a number in [-2, 2]"),
    ("seed", lambda v: v is None or _int(v), "must be an integer"),
    (
        "stop",
        lambda v: _bounded(v, MAX_STOP_STRINGS) and all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in v),
        f"must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings of at "
        f"most {MAX_STOP_CHARS} characters",
    ),
    (
        "stop_token_ids",
        lambda v: _bounded(v, MAX_TOKEN_ID_LIST) and all(_int(t) and t >= 0 for t in v),
        f"must be a list of at most {MAX_TOKEN_ID_LIST} non-negative integers",
    ),
    (
        "logprobs",
        lambda v: v is None or (_int(v) and 0 <= v <= 20),
        "must be an integer in [0, 20]",
    ),
    (
        "prompt_logprobs",
        lambda v: v is None or (_int(v) and 0 <= v <= 20),
        "must be an integer in [0, 20]",
    ),
    (
        "logit_bias",
        lambda v: v is None or (isinstance(v, dict) and len(v) <= MAX_TOKEN_ID_LIST and all(
            _int(k) and k >= 0 and _num(b) and -100 <= b <= 100 for k, b in v.items())),
        f"must map at most {MAX_TOKEN_ID_LIST} token ids to numbers in [-100, 100]",
    ),
    (
        "allowed_token_ids",
        lambda v: v is None or (isinstance(v, list | tuple) and 0 < len(v) <= MAX_TOKEN_ID_LIST
                                and all(_int(t) and t >= 0 for t in v)),
        f"must be a non-empty list of at most {MAX_TOKEN_ID_LIST} non-negative integers",
    ),
    (
        "bad_words",
        lambda v: _bounded(v, MAX_BAD_WORDS) and all(isinstance(w, str) and w for w in v),
        f"must be a list of at most {MAX_BAD_WORDS} non-empty strings",
    ),
    ("structured", lambda v: v is None or _structured_ok(v), "must be one of {json: schema "
     "(dict or JSON text), json_object: true, regex: str, choice: [str, ...], grammar: str}"),
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


# The kinds of structured-output constraint (actors/structured.py compiles them).
STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")


def _structured_ok(v: Any) -> bool:
    if not isinstance(v, dict) or len(v) != 1:
        return False
    (kind, spec), = v.items()
    if kind == "json":
        return isinstance(spec, dict | str)
    if kind == "json_object":
        return spec is True
    if kind == "choice":
        return isinstance(spec, list | tuple) and bool(spec) and all(
            isinstance(c, str) and c for c in spec)
    return kind in STRUCTURED_KINDS and isinstance(spec, str) and bool(spec)


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
    # vLLM's extensions, applied to the logits on the device (sampler.apply_constraints)
    min_tokens: int = 0  # EOS and stop_token_ids are masked while the output is shorter
    logit_bias: dict[int, float] | None = None  # added to the token's logit (OpenAI)
    allowed_token_ids: list[int] | None = None  # only these may be sampled
    bad_words: list[str] = field(default_factory=list)  # never generated (as vLLM matches them)
    # Structured output: exactly one {kind: spec} of STRUCTURED_KINDS (see actors/structured.py)
    structured: dict[str, Any] | None = None
    # Log-probs of the prompt's tokens (None: none; N: plus the top N), computed in the prefill
    prompt_logprobs: int | None = None
    # Seeds the prefix-cache keys: only requests with the same salt share cached prefix blocks.
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is None:
            self.stop = []
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if self.bad_words is None:
            self.bad_words = []
        if isinstance(self.logit_bias, dict):
            # JSON object keys are strings ("50256"); token ids are ints
            self.logit_bias = {int(k) if isinstance(k, str) and k.isascii() and k.isdigit()
                               and len(k) <= 10 else k: v
                               for k, v in self.logit_bias.items()}
        if self.top_k == -1:
            self.top_k = 0
        for name, valid, why in _CHECKS:
            value = getattr(self, name)
            try:
                ok = bool(valid(value))
            except (TypeError, ValueError):  # e.g. a string where a number belongs
                ok = False
            if not ok:
                shown = repr(value)  # a client's 100 KB value is not echoed back whole
                shown = shown if len(shown) <= 80 else shown[:80] + "..."
                raise ValueError(f"invalid sampling parameter {name}={shown}: {why}")
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self.bad_words = list(self.bad_words)
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"invalid sampling parameter min_tokens={self.min_tokens}: must not "
                             f"exceed max_tokens={self.max_tokens}")
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
        if self.use_beam_search:
            # Beam scores are the model's own log-probs; constraints would change the search.
            for name in ("min_tokens", "logit_bias", "allowed_token_ids", "bad_words",
                         "structured"):
                if getattr(self, name):
                    raise ValueError(f"invalid sampling parameter {name}: not supported with "
                                     "beam search")
            if self.max_tokens == 0:
                raise ValueError("invalid sampling parameter max_tokens=0: not supported with "
                                 "beam search")

    @property
    def use_beam_search(self) -> bool:
        return self.beam_width > 1

    @property
    def constrained(self) -> bool:
        """Whether the sampler changes this request's logits before choosing (besides
        penalties and the temperature/top-k/top-p/min-p filters)."""
        return bool(self.min_tokens or self.logit_bias or self.allowed_token_ids
                    or self.bad_words or self.structured)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def num_sequences(self) -> int:
        """How many sequences the request runs at once: beams, or n samples."""
        return self.beam_width if self.use_beam_search else self.n
