"""SamplingParams: how one request is decoded. Validated on construction, so a bad value is a
ValueError naming the field before the request ever reaches the engine loop."""

from __future__ import annotations

from dataclasses import dataclass, field


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

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        checks = [
            ("n", isinstance(self.n, int) and self.n >= 1, "must be an integer >= 1"),
            (
                "max_tokens",
                isinstance(self.max_tokens, int) and self.max_tokens >= 1,
                "must be an integer >= 1",
            ),
            ("temperature", 0.0 <= self.temperature <= 100.0, "must be in [0, 100]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "must be -1, 0 or >= 1"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 10.0, "must be in (0, 10]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("seed", self.seed is None or isinstance(self.seed, int), "must be an integer"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            (
                "stop_token_ids",
                all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
                "must be non-negative integers",
            ),
            (
                "logprobs",
                self.logprobs is None
                or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
                "must be an integer in [0, 20]",
            ),
            (
                "beam_width",
                isinstance(self.beam_width, int) and 1 <= self.beam_width <= 64,
                "must be an integer in [1, 64]",
            ),
            (
                "early_stopping",
                self.early_stopping in (True, False, "never"),
                "must be true, false or 'never'",
            ),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(
                    f"invalid sampling parameter {name}={getattr(self, name)!r}: {why}"
                )
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
