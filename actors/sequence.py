"""A request (SequenceGroup) and its sequences, as the scheduler and KV manager see them.

A group owns one prompt segment, shared by all its sequences (n samples or beams). Each sequence
owns a response segment. ``num_computed`` counts the tokens whose K/V are in the cache: the group's
computed prompt tokens plus the sequence's computed response tokens.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

from .sampling_params import SamplingParams

_seq_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity semantics: sequences are mutable engine state
class Sequence:
    group: SequenceGroup
    output_ids: list[int] = field(default_factory=list)
    response_blocks: list[int] = field(default_factory=list)
    response_computed: int = 0
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    sample_seed: int = 0  # seeds this sequence's draws (sampler.uniform_noise)
    num_draws: int = 0  # draws so far: the counter of the next draw's noise
    text: str = ""
    streamed: int = 0  # characters of text already sent as deltas
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    index: int = 0  # position in the request's outputs (sample j); beams are re-sorted at the end
    detok: Any = None
    matcher: Any = None  # structured output: this sequence's grammar state (xgrammar)

    @property
    def prompt_len(self) -> int:
        return len(self.group.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.group.prompt_ids) + len(self.output_ids)

    @property
    def num_computed(self) -> int:
        return self.group.prompt_computed + self.response_computed

    def tokens(self, start: int, end: int) -> list[int]:
        plen = len(self.group.prompt_ids)
        out = self.group.prompt_ids[start : min(end, plen)] if start < plen else []
        if end > plen:
            out = out + self.output_ids[max(start - plen, 0) : end - plen]
        return out

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class BeamHypothesis:
    output_ids: list[int]
    score: float  # length-penalised, as HF ranks finished beams
    cumulative_logprob: float


@dataclass(eq=False)
class SequenceGroup:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float
    prompt_text: str | None = None
    seqs: list[Sequence] = field(default_factory=list)
    status: Status = Status.WAITING
    prompt_blocks: list[int] = field(default_factory=list)
    prompt_computed: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens found in the prefix cache at the last admission
    prompt_block_hashes: list[bytes] | None = None  # set by the KV manager, which owns hashing
    eos_token_ids: frozenset[int] = frozenset()
    bad_words_ids: list[list[int]] = field(default_factory=list)  # params.bad_words, tokenized
    grammar: Any = None  # params.structured, compiled (actors/structured.py)
    error: str | None = None  # why it failed, when the request itself is the cause (a 400)
    # Prompt log-probs (params.prompt_logprobs): one entry per prompt token from the second on,
    # filled chunk by chunk in the prefill; sent with the request's first delta.
    prompt_logprobs: list[Any] = field(default_factory=list)
    prompt_logprobs_sent: bool = False
    # Beam search: hypotheses that ended (EOS), best kept by score.
    finished_beams: list[BeamHypothesis] = field(default_factory=list)
    beam_done: bool = False

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def prompt_done(self) -> bool:
        return self.prompt_computed >= len(self.prompt_ids)

    def live_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.finished]

    @property
    def is_finished(self) -> bool:
        if self.params.use_beam_search:
            return self.beam_done
        return bool(self.seqs) and all(s.finished for s in self.seqs)
