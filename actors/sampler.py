"""Token selection: penalties, temperature, top-k/top-p/min-p, seeded sampling, log-probs, and the
beam-search step (HF-compatible scoring).

Everything here works on float32 logits ``[num_seqs, vocab]`` of one step. Per-request knobs
differ row by row, so filters are applied row-wise where they are on.
"""

from __future__ import annotations

import torch

from .outputs import TokenLogprob
from .sequence import BeamHypothesis, Sequence, SequenceGroup


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    for i, seq in enumerate(seqs):
        p = seq.group.params
        if p.repetition_penalty != 1.0:
            # HF/CTRL: every token seen in prompt or output is made less likely.
            seen = torch.tensor(
                sorted(set(seq.group.prompt_ids) | set(seq.output_ids)),
                device=logits.device,
                dtype=torch.long,
            )
            row = logits[i, seen]
            logits[i, seen] = torch.where(
                row > 0, row / p.repetition_penalty, row * p.repetition_penalty
            )
        if (p.presence_penalty or p.frequency_penalty) and seq.output_ids:
            # OpenAI: only generated tokens count.
            out = torch.tensor(seq.output_ids, device=logits.device, dtype=torch.long)
            counts = torch.bincount(out, minlength=logits.shape[1]).to(logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    return logits


def _penalized(p) -> bool:
    return p.repetition_penalty != 1.0 or bool(p.presence_penalty or p.frequency_penalty)


def filter_logits(row: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Mask (with -inf) what top-k, top-p (nucleus) and min-p exclude from one row."""
    if top_k and top_k < row.numel():
        kth = torch.topk(row, top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        probs = sorted_logits.softmax(-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        row = row.clone()
        row[order[drop]] = float("-inf")
    if min_p > 0.0:
        probs = row.softmax(-1)
        row = row.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return row


def _logprob_entry(logprobs: torch.Tensor, token: int, top_n: int | None) -> TokenLogprob | None:
    if top_n is None:
        return None
    top: list[tuple[int, float]] = []
    if top_n > 0:
        vals, ids = torch.topk(logprobs, top_n)
        top = list(zip(ids.tolist(), vals.tolist(), strict=True))
    return TokenLogprob(token, float(logprobs[token]), top)


def sample(
    logits: torch.Tensor, seqs: list[Sequence]
) -> list[tuple[int, float, TokenLogprob | None]]:
    """One token per row: ``(token_id, its logprob, logprob entry or None)``.

    Reported log-probs are the model's own distribution (log-softmax of the raw logits), so they
    do not depend on the decoding knobs.
    """
    raw_logprobs = torch.log_softmax(logits, dim=-1)
    if any(_penalized(s.group.params) for s in seqs):
        logits = apply_penalties(logits.clone(), seqs)
    results = []
    for i, seq in enumerate(seqs):
        p = seq.group.params
        if p.greedy:
            token = int(torch.argmax(logits[i]))
        else:
            row = filter_logits(logits[i] / p.temperature, p.top_k, p.top_p, p.min_p)
            probs = row.softmax(-1)
            token = int(torch.multinomial(probs, 1, generator=seq.generator))
        lp = raw_logprobs[i]
        results.append((token, float(lp[token]), _logprob_entry(lp, token, p.logprobs)))
    return results


def beam_step(
    group: SequenceGroup, beams: list[Sequence], logits: torch.Tensor, max_new_tokens: int
) -> list[tuple[Sequence, int, float]]:
    """One beam-search step, scored exactly as HF transformers' ``generate(num_beams=W)``.

    ``beams`` are the running beams (one at the first step) and ``logits`` their rows. Candidates
    that end (EOS / stop id, or reach ``max_new_tokens``) and rank within the top W join
    ``group.finished_beams`` with score ``logprob_sum / generated_len ** length_penalty``; the
    best W non-ending candidates continue. Returns ``(parent, token, new cumulative logprob)`` for
    the next running beams, or ``[]`` when the search is over (``group.beam_done`` is then set).
    """
    p = group.params
    width = p.beam_width
    end_ids = set() if p.ignore_eos else set(group.eos_token_ids)
    end_ids |= set(p.stop_token_ids)
    logprobs = torch.log_softmax(logits, dim=-1)
    scores = torch.tensor([b.cumulative_logprob for b in beams], dtype=torch.float32)
    acc = (logprobs + scores[:, None]).reshape(-1)
    vocab = logits.shape[1]
    k = min(max(2, 1 + len(end_ids)) * width, acc.numel())
    top_vals, top_idx = torch.topk(acc, k)
    gen_len = len(beams[0].output_ids) + 1
    at_max = gen_len >= max_new_tokens

    candidates = []
    for rank, (val, idx) in enumerate(zip(top_vals.tolist(), top_idx.tolist(), strict=True)):
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
