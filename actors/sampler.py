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

from dataclasses import dataclass

import torch

from .outputs import TokenLogprob
from .sequence import BeamHypothesis, Sequence, SequenceGroup

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


def uniform_noise(seeds: torch.Tensor, draws: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[rows, vocab]`` float32 uniforms in (0, 1), a pure function of (seed, draw, token id)."""
    base = _mix(seeds * _GOLDEN + draws)
    token = torch.arange(vocab, device=seeds.device, dtype=torch.int64) * _GOLDEN
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


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Repetition (HF/CTRL: tokens seen in prompt or output), presence and frequency (OpenAI:
    generated tokens only) penalties, in place, for all rows in a few batched ops."""
    dev = logits.device
    rep_idx, rep_lens, rep_toks, out_rows, out_toks = [], [], [], [], []
    rep = torch.ones(len(seqs), dtype=logits.dtype)
    pres = torch.zeros(len(seqs), dtype=logits.dtype)
    freq = torch.zeros(len(seqs), dtype=logits.dtype)
    for i, seq in enumerate(seqs):
        p = seq.group.params
        if p.repetition_penalty != 1.0:
            rep[i] = p.repetition_penalty
            rep_idx.append(i)
            rep_toks.append(_prompt_tensor(seq.group, dev))
            rep_lens.append(len(seq.group.prompt_ids))
        if seq.output_ids and (p.repetition_penalty != 1.0 or p.presence_penalty
                               or p.frequency_penalty):
            pres[i], freq[i] = p.presence_penalty, p.frequency_penalty
            out_toks.extend(seq.output_ids)
            out_rows.extend([i] * len(seq.output_ids))
    counts = torch.zeros_like(logits)
    if out_toks:
        rows = torch.tensor(out_rows, device=dev)
        toks = torch.tensor(out_toks, device=dev)
        counts.index_put_((rows, toks), torch.ones(len(out_toks), device=dev), accumulate=True)
    if rep_toks:
        rows = torch.repeat_interleave(torch.tensor(rep_idx), torch.tensor(rep_lens)).to(dev)
        seen = torch.zeros(logits.shape, dtype=torch.bool, device=dev)
        seen[rows, torch.cat(rep_toks)] = True
        # Output tokens are seen too; rows without a repetition penalty have rep == 1.
        seen |= counts > 0
        r = rep.to(dev)[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    if out_toks:
        logits -= freq.to(dev)[:, None] * counts + pres.to(dev)[:, None] * (counts > 0)
    return logits


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


def apply_constraints(
    logits: torch.Tensor, seqs: list[Sequence], pending: list[int] | None = None
) -> torch.Tensor:
    """allowed_token_ids, bad words, min_tokens (EOS and stop ids masked while the output is
    shorter) and logit_bias, for all rows in a few batched ops; returns ``logits`` itself when
    no row asks for any, else a modified copy. ``pending[i]``: tokens row i has sampled that
    are not in its ``output_ids`` yet (the engine's lookahead), so min_tokens counts them."""
    bias_rows, bias_toks, bias_vals = [], [], []
    ban_rows, ban_toks = [], []
    allow_rows, allow_toks, allow_idx = [], [], []
    for i, seq in enumerate(seqs):
        p = seq.group.params
        if not p.constrained:
            continue
        if p.allowed_token_ids:
            allow_toks += p.allowed_token_ids
            allow_rows += [len(allow_idx)] * len(p.allowed_token_ids)
            allow_idx.append(i)
        banned = _banned_by_bad_words(seq) if seq.group.bad_words_ids else []
        generated = len(seq.output_ids) + (pending[i] if pending else 0)
        # a grammar that has reached its end leaves only EOS: it decides, not min_tokens
        ended = seq.matcher is not None and seq.matcher.is_completed()
        if generated < p.min_tokens and not ended:
            banned += p.stop_token_ids
            if not p.ignore_eos:
                banned += seq.group.eos_token_ids
        ban_toks += banned
        ban_rows += [i] * len(banned)
        if p.logit_bias:
            bias_toks += p.logit_bias.keys()
            bias_vals += p.logit_bias.values()
            bias_rows += [i] * len(p.logit_bias)
    if not (allow_idx or ban_toks or bias_toks):
        return logits
    dev = logits.device
    logits = logits.clone()
    if allow_idx:
        rows = torch.tensor(allow_idx, device=dev)
        local = torch.tensor(allow_rows, device=dev)
        toks = torch.tensor(allow_toks, device=dev)
        keep = torch.full((len(allow_idx), logits.shape[1]), float("-inf"), device=dev)
        keep[local, toks] = 0.0
        logits[rows] += keep
    if bias_toks:
        logits.index_put_(
            (torch.tensor(bias_rows, device=dev), torch.tensor(bias_toks, device=dev)),
            torch.tensor(bias_vals, dtype=logits.dtype, device=dev), accumulate=True)
    if ban_toks:
        logits[torch.tensor(ban_rows, device=dev), torch.tensor(ban_toks, device=dev)] = \
            float("-inf")
    return logits


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
    dev = logits.device
    params = [s.group.params for s in seqs]
    raw_logprobs = torch.log_softmax(logits, dim=-1)
    if any(p.constrained for p in params):
        constrained = apply_constraints(logits, seqs, pending)
        if any(s.matcher is not None for s in seqs):
            from .structured import apply_grammar_bitmask

            if constrained is logits:  # the bitmask works in place: never on the caller's
                constrained = logits.clone()
            apply_grammar_bitmask(constrained, seqs)
        logits = constrained
    if any(_penalized(p) for p in params):
        logits = apply_penalties(logits.clone(), seqs)
    tokens = torch.argmax(logits, dim=-1)
    drawn = [i for i, p in enumerate(params) if not (p.greedy or p.top_k == 1)]
    if drawn:
        ps = [params[i] for i in drawn]
        rows = torch.tensor(drawn, device=dev)
        temp = torch.tensor([p.temperature for p in ps], dtype=logits.dtype, device=dev)
        sub = logits[rows] / temp[:, None]
        if any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in ps):
            sub = filter_rows(
                sub,
                torch.tensor([p.top_k for p in ps], dtype=torch.long, device=dev),
                torch.tensor([p.top_p for p in ps], dtype=logits.dtype, device=dev),
                torch.tensor([p.min_p for p in ps], dtype=logits.dtype, device=dev),
            )
        probs = sub.softmax(-1)
        # (seed, draw number) per drawn row, in one host->device copy
        keys = torch.tensor([[seqs[i].sample_seed, seqs[i].num_draws] for i in drawn],
                            dtype=torch.long).to(dev)
        for i in drawn:
            seqs[i].num_draws += 1
        noise = -torch.log(uniform_noise(keys[:, 0], keys[:, 1], logits.shape[1]))
        tokens[rows] = torch.argmax(probs / noise, dim=-1)
    chosen = raw_logprobs.gather(1, tokens[:, None])[:, 0]
    top_n = [p.logprobs for p in params]
    n_max = max((n for n in top_n if n), default=0)
    top_ids = top_vals = None
    if n_max:
        top_vals, top_ids = torch.topk(raw_logprobs, n_max, dim=-1)
    return DeviceSample(tokens, chosen, top_ids, top_vals, top_n)


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
    logprobs = torch.log_softmax(logits, dim=-1)
    scores = torch.tensor([b.cumulative_logprob for b in beams], dtype=torch.float32)
    acc = (logprobs + scores.to(logits.device)[:, None]).reshape(-1)
    vocab = logits.shape[1]
    k = min(max(2, 1 + len(end_ids)) * width, acc.numel())
    top_vals, top_idx = torch.topk(acc, k)
    top = torch.stack([top_vals.double(), top_idx.double()]).cpu().tolist()
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
