"""Token selection on the logits' own device: penalties, temperature, top-k/top-p/min-p, seeded
sampling, log-probs, and the beam-search step (HF-compatible scoring).

Everything works on float32 logits ``[rows, vocab]`` of one step, all rows at once: per-request
knobs become per-row tensors, so a step costs the same handful of kernels whatever the mix of
requests, and logits never leave the device. Only the chosen ids and the asked-for log-probs come
back to the host, in one copy (:meth:`DeviceSample.to_host`).

Seeded sampling draws its randomness from a counter-based hash of (sequence seed, draw number,
token id) instead of a stateful generator per sequence: a whole batch draws in one op, and a
sequence's draws do not depend on which other rows share its step or on the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .outputs import TokenLogprob
from .sequence import BeamHypothesis, Sequence, SequenceGroup
from .vocab_parallel import VocabShard

# splitmix64's constants, written as signed int64 (torch has no uint64 arithmetic).
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15
_MIX1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685  # 0x94D049BB133111EB


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic: mask off the sign copies)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer; int64 multiplication wraps, as uint64's does."""
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def uniform_noise(seeds: torch.Tensor, draws: torch.Tensor, vocab: int,
                  first: int = 0) -> torch.Tensor:
    """``[rows, vocab]`` float32 uniforms in (0, 1), a pure function of (seed, draw, token id),
    for token ids ``first .. first + vocab - 1`` (a rank's slice of a sharded vocabulary)."""
    base = _mix(seeds * _GOLDEN + draws)
    token = torch.arange(first, first + vocab, device=seeds.device, dtype=torch.int64) * _GOLDEN
    bits = _shr(_mix(base[:, None] + token[None, :]), 40)  # the top 24 bits
    return (bits.float() + 0.5) * (1.0 / (1 << 24))


def _penalized(p) -> bool:
    return p.repetition_penalty != 1.0 or bool(p.presence_penalty or p.frequency_penalty)


def _prompt_tensor(group: SequenceGroup, device: torch.device) -> torch.Tensor:
    """The prompt's ids on ``device``, made once per request (repetition penalty reads it every
    step)."""
    cached = getattr(group, "_prompt_ids_dev", None)
    if cached is None or cached.device != device:
        cached = torch.tensor(group.prompt_ids, dtype=torch.long, device=device)
        group._prompt_ids_dev = cached
    return cached


# ----- host side: what each row asks for, as plain lists (a "plan") --------------------------
# The plans are what rank 0 of a tensor-parallel group sends its other ranks, so that every
# rank applies the same masks to its slice of the vocabulary.

@dataclass
class PenaltyPlan:
    rep: list[float]  # per row (1.0: none)
    pres: list[float]
    freq: list[float]
    rep_idx: list[int]  # rows with a repetition penalty, and their prompt ids
    rep_toks: list[torch.Tensor]
    out_rows: list[int]  # (row, generated token) pairs
    out_toks: list[int]


def penalty_plan(seqs: list[Sequence], device: torch.device) -> PenaltyPlan:
    plan = PenaltyPlan([1.0] * len(seqs), [0.0] * len(seqs), [0.0] * len(seqs), [], [], [], [])
    for i, seq in enumerate(seqs):
        p = seq.group.params
        if p.repetition_penalty != 1.0:
            plan.rep[i] = p.repetition_penalty
            plan.rep_idx.append(i)
            plan.rep_toks.append(_prompt_tensor(seq.group, device))
        if seq.output_ids and _penalized(p):
            plan.pres[i], plan.freq[i] = p.presence_penalty, p.frequency_penalty
            plan.out_toks.extend(seq.output_ids)
            plan.out_rows.extend([i] * len(seq.output_ids))
    return plan


def _local_pairs(rows: torch.Tensor, toks: torch.Tensor,
                 vs: VocabShard) -> tuple[torch.Tensor, torch.Tensor]:
    """The (row, token) pairs whose token lies in this rank's slice, in local columns."""
    if not vs.sharded:
        return rows, toks
    mine = (toks >= vs.lo) & (toks < vs.hi)
    return rows[mine], toks[mine] - vs.lo


def penalize(logits: torch.Tensor, plan: PenaltyPlan, vs: VocabShard) -> torch.Tensor:
    """Repetition (HF/CTRL: tokens seen in prompt or output), presence and frequency (OpenAI:
    generated tokens only) penalties, in place, for all rows in a few batched ops."""
    dev = logits.device
    counts = torch.zeros_like(logits)
    if plan.out_toks:
        rows, toks = _local_pairs(torch.tensor(plan.out_rows, device=dev),
                                  torch.tensor(plan.out_toks, device=dev), vs)
        counts.index_put_((rows, toks), torch.ones(len(toks), device=dev), accumulate=True)
    if plan.rep_toks:
        lens = torch.tensor([len(t) for t in plan.rep_toks])
        rows = torch.repeat_interleave(torch.tensor(plan.rep_idx), lens).to(dev)
        rows, toks = _local_pairs(rows, torch.cat([t.to(dev) for t in plan.rep_toks]), vs)
        seen = torch.zeros(logits.shape, dtype=torch.bool, device=dev)
        seen[rows, toks] = True
        # Output tokens are seen too; rows without a repetition penalty have rep == 1.
        seen |= counts > 0
        r = torch.tensor(plan.rep, dtype=logits.dtype, device=dev)[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    if plan.out_toks:
        freq = torch.tensor(plan.freq, dtype=logits.dtype, device=dev)[:, None]
        pres = torch.tensor(plan.pres, dtype=logits.dtype, device=dev)[:, None]
        logits -= freq * counts + pres * (counts > 0)
    return logits


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """:func:`penalize` with the rows' own plan, on a whole vocabulary."""
    return penalize(logits, penalty_plan(seqs, logits.device), VocabShard(logits.shape[1]))


def _banned_by_bad_words(seq: Sequence) -> list[int]:
    """Tokens the request's bad words forbid next: a one-token word always, the last token of a
    longer one when the output ends with the rest of it (vLLM's rule)."""
    out = []
    ids = seq.output_ids
    for word in seq.group.bad_words_ids:
        prefix = word[:-1]
        if not prefix or (len(ids) >= len(prefix) and ids[len(ids) - len(prefix):] == prefix):
            out.append(word[-1])
    return out


@dataclass
class ConstraintPlan:
    allow_idx: list[int] = field(default_factory=list)  # rows with allowed_token_ids
    allow_rows: list[int] = field(default_factory=list)  # (index into allow_idx, token)
    allow_toks: list[int] = field(default_factory=list)
    bias_rows: list[int] = field(default_factory=list)
    bias_toks: list[int] = field(default_factory=list)
    bias_vals: list[float] = field(default_factory=list)
    ban_rows: list[int] = field(default_factory=list)
    ban_toks: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.allow_idx or self.ban_toks or self.bias_toks)


def constraint_plan(seqs: list[Sequence], pending: list[int] | None = None) -> ConstraintPlan:
    plan = ConstraintPlan()
    for i, seq in enumerate(seqs):
        p = seq.group.params
        if not p.constrained:
            continue
        if p.allowed_token_ids:
            plan.allow_toks += p.allowed_token_ids
            plan.allow_rows += [len(plan.allow_idx)] * len(p.allowed_token_ids)
            plan.allow_idx.append(i)
        banned = _banned_by_bad_words(seq) if seq.group.bad_words_ids else []
        generated = len(seq.output_ids) + (pending[i] if pending else 0)
        # a grammar that has reached its end leaves only EOS: it decides, not min_tokens
        ended = seq.matcher is not None and seq.matcher.is_completed()
        if generated < p.min_tokens and not ended:
            banned += p.stop_token_ids
            if not p.ignore_eos:
                banned += seq.group.eos_token_ids
        plan.ban_toks += banned
        plan.ban_rows += [i] * len(banned)
        if p.logit_bias:
            plan.bias_toks += p.logit_bias.keys()
            plan.bias_vals += p.logit_bias.values()
            plan.bias_rows += [i] * len(p.logit_bias)
    return plan


def constrain(logits: torch.Tensor, plan: ConstraintPlan, vs: VocabShard) -> torch.Tensor:
    """allowed_token_ids, bad words, min_tokens and logit_bias as masks and biases; returns
    ``logits`` itself when the plan is empty, else a modified copy."""
    if not plan:
        return logits
    dev = logits.device
    logits = logits.clone()

    def pairs(rows: list[int], toks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return _local_pairs(torch.tensor(rows, dtype=torch.long, device=dev),
                            torch.tensor(toks, dtype=torch.long, device=dev), vs)

    if plan.allow_idx:
        rows = torch.tensor(plan.allow_idx, device=dev)
        local, toks = pairs(plan.allow_rows, plan.allow_toks)
        keep = torch.full((len(plan.allow_idx), logits.shape[1]), float("-inf"), device=dev)
        keep[local, toks] = 0.0
        logits[rows] += keep
    if plan.bias_toks:
        vals = torch.tensor(plan.bias_vals, dtype=logits.dtype, device=dev)
        if vs.sharded:
            mine = torch.tensor([vs.lo <= t < vs.hi for t in plan.bias_toks], device=dev)
            vals = vals[mine]
        logits.index_put_(pairs(plan.bias_rows, plan.bias_toks), vals, accumulate=True)
    if plan.ban_toks:
        logits[pairs(plan.ban_rows, plan.ban_toks)] = float("-inf")
    return logits


def apply_constraints(
    logits: torch.Tensor, seqs: list[Sequence], pending: list[int] | None = None
) -> torch.Tensor:
    """allowed_token_ids, bad words, min_tokens (EOS and stop ids masked while the output is
    shorter) and logit_bias, for all rows in a few batched ops; returns ``logits`` itself when
    no row asks for any, else a modified copy. ``pending[i]``: tokens row i has sampled that
    are not in its ``output_ids`` yet (the engine's lookahead), so min_tokens counts them."""
    return constrain(logits, constraint_plan(seqs, pending), VocabShard(logits.shape[1]))


def filter_rows(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Mask (with -inf) what top-k, then top-p (nucleus, on the top-k survivors), then min-p
    exclude, row by row. ``top_k`` 0 or >= vocab, ``top_p`` 1 and ``min_p`` 0 turn a filter off.
    Ties with the k-th value are kept."""
    neg = float("-inf")
    vocab = logits.shape[1]
    sorted_vals, order = torch.sort(logits, dim=-1, descending=True)
    k = torch.where((top_k <= 0) | (top_k > vocab), vocab, top_k)
    kth = sorted_vals.gather(1, (k - 1)[:, None])
    sorted_vals = sorted_vals.masked_fill(sorted_vals < kth, neg)
    probs = sorted_vals.softmax(-1)
    # keep the smallest best-first prefix whose mass reaches top_p (the first token always stays)
    drop_sorted = (probs.cumsum(-1) - probs >= top_p[:, None]) & (top_p < 1.0)[:, None]
    drop_sorted[:, 0] = False  # a top_p below float32's range (1e-300) reads as 0 here
    drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
    out = logits.masked_fill((logits < kth) | drop, neg)
    probs = out.softmax(-1)
    return out.masked_fill(probs < min_p[:, None] * probs.amax(-1, keepdim=True), neg)


def filter_logits(row: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """:func:`filter_rows` for one row and plain numbers."""
    def t(v, dtype):
        return torch.tensor([v], dtype=dtype, device=row.device)
    return filter_rows(row[None], t(top_k, torch.long), t(top_p, row.dtype),
                       t(min_p, row.dtype))[0]


@dataclass
class DeviceSample:
    """One step's choices, still on the device until :meth:`to_host`."""

    tokens: torch.Tensor  # [rows] int64
    logprobs: torch.Tensor  # [rows] float32, the chosen token's raw log-prob
    top_ids: torch.Tensor | None  # [rows, N]: the N best raw log-probs, best first
    top_vals: torch.Tensor | None
    top_n: list[int | None]  # per row: how many of them were asked for (None: no entry)

    _host: torch.Tensor | None = None
    _ready: torch.cuda.Event | None = None

    def start_copy(self) -> None:
        """Queue the one device->host copy (float64 holds every token id exactly) behind the
        sampling kernels, so later work queued on the device does not delay reading it."""
        parts = [self.tokens.double()[:, None], self.logprobs.double()[:, None]]
        if self.top_ids is not None:
            parts += [self.top_ids.double(), self.top_vals.double()]
        packed = torch.cat(parts, dim=1)
        if packed.device.type != "cuda":
            self._host = packed.cpu()
            return
        self._host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        self._host.copy_(packed, non_blocking=True)
        self._ready = torch.cuda.Event()
        self._ready.record()

    def to_host(self) -> list[tuple[int, float, TokenLogprob | None]]:
        if self._host is None:
            self.start_copy()
        if self._ready is not None:
            self._ready.synchronize()
        host = self._host.tolist()
        n_top = 0 if self.top_ids is None else self.top_ids.shape[1]
        out = []
        for row, n in zip(host, self.top_n, strict=True):
            token, lp = int(row[0]), row[1]
            entry = None
            if n is not None:
                ids, vals = row[2 : 2 + n_top], row[2 + n_top :]
                entry = TokenLogprob(token, lp, [(int(i), v) for i, v in
                                                 zip(ids[:n], vals[:n], strict=True)])
            out.append((token, lp, entry))
        return out


@dataclass
class SamplePlan:
    """What one step's sampling rows ask for, built on the host (rank 0) from their sequences."""

    top_n: list[int | None]  # log-probs asked for, per row
    drawn: list[int]  # rows that draw (not greedy), and their knobs
    temperature: list[float]
    top_k: list[int]
    top_p: list[float]
    min_p: list[float]
    keys: list[list[int]]  # (seed, draw number) per drawn row
    constraints: ConstraintPlan
    penalties: PenaltyPlan | None
    bitmask: torch.Tensor | None  # grammar rows' token bitmasks (xgrammar's layout), host
    bitmask_rows: list[int]


def sample_plan(seqs: list[Sequence], pending: list[int] | None, vocab: int,
                device: torch.device) -> SamplePlan:
    """Every row's knobs; counts the draws it plans (a seeded row's next draw is a new one)."""
    params = [s.group.params for s in seqs]
    drawn = [i for i, p in enumerate(params) if not (p.greedy or p.top_k == 1)]
    ps = [params[i] for i in drawn]
    keys = [[seqs[i].sample_seed, seqs[i].num_draws] for i in drawn]
    for i in drawn:
        seqs[i].num_draws += 1
    bitmask, rows = None, []
    if any(s.matcher is not None for s in seqs):
        from .structured import grammar_bitmask

        bitmask, rows = grammar_bitmask(seqs, vocab)
    return SamplePlan(
        top_n=[p.logprobs for p in params], drawn=drawn,
        temperature=[p.temperature for p in ps], top_k=[p.top_k for p in ps],
        top_p=[p.top_p for p in ps], min_p=[p.min_p for p in ps], keys=keys,
        constraints=constraint_plan(seqs, pending) if any(p.constrained for p in params)
        else ConstraintPlan(),
        penalties=penalty_plan(seqs, device) if any(_penalized(p) for p in params) else None,
        bitmask=bitmask, bitmask_rows=rows,
    )


def sample_rows(logits: torch.Tensor, plan: SamplePlan, vs: VocabShard) -> DeviceSample:
    """The device side of :func:`sample_on_device` on this rank's slice of the vocabulary."""
    dev = logits.device
    raw_logprobs = vs.log_softmax(logits)
    logits = constrain(logits, plan.constraints, vs)
    if plan.bitmask is not None:
        from .structured import apply_bitmask

        if not plan.constraints:  # the bitmask works in place: never on the caller's
            logits = logits.clone()
        apply_bitmask(logits, plan.bitmask, plan.bitmask_rows, vs)
    if plan.penalties is not None:
        logits = penalize(logits.clone(), plan.penalties, vs)
    tokens = vs.argmax(logits)
    if plan.drawn:
        rows = torch.tensor(plan.drawn, device=dev)
        temp = torch.tensor(plan.temperature, dtype=logits.dtype, device=dev)
        sub = logits[rows] / temp[:, None]
        if any(k > 0 for k in plan.top_k) or any(p < 1.0 for p in plan.top_p) \
                or any(m > 0.0 for m in plan.min_p):
            sub = vs.filter(
                sub,
                torch.tensor(plan.top_k, dtype=torch.long, device=dev),
                torch.tensor(plan.top_p, dtype=logits.dtype, device=dev),
                torch.tensor(plan.min_p, dtype=logits.dtype, device=dev),
            )
        # (seed, draw number) per drawn row, in one host->device copy
        keys = torch.tensor(plan.keys, dtype=torch.long).to(dev)
        noise = -torch.log(uniform_noise(keys[:, 0], keys[:, 1], sub.shape[1], vs.lo))
        if vs.sharded:
            tokens[rows] = vs.argmax((sub - vs.lse(sub)[:, None]).exp() / noise)
        else:
            tokens[rows] = torch.argmax(sub.softmax(-1) / noise, dim=-1)
    chosen = vs.take(raw_logprobs, tokens)
    n_max = max((n for n in plan.top_n if n), default=0)
    top_ids = top_vals = None
    if n_max:
        top_vals, top_ids = vs.topk(raw_logprobs, n_max)
    return DeviceSample(tokens, chosen, top_ids, top_vals, plan.top_n)


def beam_candidates(logits: torch.Tensor, plan: tuple[list[float], int],
                    vs: VocabShard) -> torch.Tensor:
    """The best ``k`` (cumulative log-prob, beam * vocab + token) of a beam group's rows, as
    ``[2, k]`` float64 on the host."""
    scores, k = plan
    acc = vs.log_softmax(logits) + torch.tensor(scores, device=logits.device)[:, None]
    top_vals, top_idx = vs.topk_flat(acc, k)
    return torch.stack([top_vals.double(), top_idx.double()]).cpu()


# Device-side ops by name: what a tensor-parallel worker runs when rank 0 says so.
OPS = {"sample": sample_rows, "beam": beam_candidates}


def run_op(logits, op: str, plan: object):
    """Run ``OPS[op]`` on ``logits``: a tensor on one device, or a rank-0 view of logits
    sharded over a replica group (which has every rank run it on its own slice)."""
    run = getattr(logits, "run_op", None)
    if run is not None:
        return run(op, plan)
    return OPS[op](logits, plan, VocabShard(logits.shape[1]))


def sample_on_device(
    logits: torch.Tensor, seqs: list[Sequence], pending: list[int] | None = None
) -> DeviceSample:
    """One token per row, chosen on the logits' device with no host sync (but for rows under
    a grammar, whose token bitmask is filled on the host: see actors/structured.py).

    Reported log-probs are the model's own distribution (log-softmax of the raw logits), so they
    do not depend on the decoding knobs. Greedy (temperature 0, or top_k 1) takes the argmax
    after penalties; sampling draws ``argmax(p / E)`` with ``E ~ Exp(1)`` per token, which picks
    token j with probability ``p_j`` (the exponential race). Constraints (logit_bias,
    allowed_token_ids, bad words, min_tokens, the grammar's bitmask) apply first; ``pending``
    as in :func:`apply_constraints`.
    """
    device = getattr(logits, "device", torch.device("cpu"))
    return run_op(logits, "sample", sample_plan(seqs, pending, logits.shape[1], device))


def sample(
    logits: torch.Tensor, seqs: list[Sequence]
) -> list[tuple[int, float, TokenLogprob | None]]:
    """One token per row: ``(token_id, its logprob, logprob entry or None)``."""
    return sample_on_device(logits, seqs).to_host()


def beam_step(
    group: SequenceGroup, beams: list[Sequence], logits: torch.Tensor, max_new_tokens: int
) -> list[tuple[Sequence, int, float]]:
    """One beam-search step, scored exactly as HF transformers' ``generate(num_beams=W)``.

    ``beams`` are the running beams (one at the first step) and ``logits`` their rows. Candidates
    that end (EOS / stop id, or reach ``max_new_tokens``) and rank within the top W join
    ``group.finished_beams`` with score ``logprob_sum / generated_len ** length_penalty``; the
    best W non-ending candidates continue. Returns ``(parent, token, new cumulative logprob)`` for
    the next running beams, or ``[]`` when the search is over (``group.beam_done`` is then set).
    The candidates are selected on the device; only the top ``2W`` (or more) come back.
    """
    p = group.params
    width = p.beam_width
    end_ids = set() if p.ignore_eos else set(group.eos_token_ids)
    end_ids |= set(p.stop_token_ids)
    vocab = logits.shape[1]
    k = min(max(2, 1 + len(end_ids)) * width, len(beams) * vocab)
    top = run_op(logits, "beam", ([b.cumulative_logprob for b in beams], k)).tolist()
    gen_len = len(beams[0].output_ids) + 1
    at_max = gen_len >= max_new_tokens

    candidates = []
    for rank, (val, idx) in enumerate(zip(top[0], top[1], strict=True)):
        idx = int(idx)
        parent, token = beams[idx // vocab], idx % vocab
        ends = at_max or token in end_ids
        candidates.append((rank, parent, token, val, ends))

    # Finished hypotheses: only ending candidates within the top W ranks count (as in HF).
    full = len(group.finished_beams) >= width
    if not (full and p.early_stopping is True):
        for rank, parent, token, val, ends in candidates:
            if ends and rank < width:
                group.finished_beams.append(
                    BeamHypothesis(
                        output_ids=parent.output_ids + [token],
                        score=val / (gen_len**p.length_penalty),
                        cumulative_logprob=val,
                    )
                )
        group.finished_beams.sort(key=lambda h: h.score, reverse=True)
        del group.finished_beams[width:]

    running = [(parent, token, val) for _, parent, token, val, ends in candidates if not ends]
    running = running[:width]
    if len(running) < width or _search_done(
        group, running[0][2] if running else None, gen_len, max_new_tokens
    ):
        group.beam_done = True
        return []
    return running


def _search_done(
    group: SequenceGroup, best_running: float | None, gen_len: int, max_new_tokens: int
) -> bool:
    """HF's stopping rule: stop once W hypotheses are finished and (early_stopping=True) or no
    running beam can still beat the worst of them."""
    p = group.params
    if best_running is None:
        return True
    if len(group.finished_beams) < p.beam_width:
        return False
    if p.early_stopping is True:
        return True
    if p.early_stopping == "never" and p.length_penalty > 0.0:
        length = max_new_tokens
    else:
        length = gen_len
    best_possible = best_running / (length**p.length_penalty)
    return best_possible <= group.finished_beams[-1].score
