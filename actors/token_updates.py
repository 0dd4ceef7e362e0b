"""What a step's chosen tokens do to their sequences: sampling the rows that were not sampled
on the device, appending tokens (detokenization, stop checks, grammar state), beam-search
selection, and the final ``RequestOutput``. A part of ``EngineCore`` (engine.py), kept apart so
that file is the request and step flow alone; it uses the core's ``kv``, ``scheduler``,
``groups``, ``tokenizer``, ``max_model_len`` and ``_new_seq``/``_end``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from .communicator import ReplicaGroupFailed
from .outputs import CompletionOutput, Delta, RequestOutput
from .sampler import beam_step, sample
from .sequence import Sequence, SequenceGroup
from .structured import accept

if TYPE_CHECKING:
    from .engine import _Step

logger = logging.getLogger(__name__)


class TokenUpdates:
    def _apply_presampled(
        self, step: _Step, groups: list[SequenceGroup]
    ) -> dict[SequenceGroup, list[Delta] | None]:
        try:
            chosen = step.presampled.to_host()
        except ReplicaGroupFailed:
            raise
        except Exception:
            logger.exception("reading sampled tokens failed")
            return dict.fromkeys(groups)
        out: dict[SequenceGroup, list[Delta] | None] = {g: [] for g in groups}
        for item, (tok, lp, entry) in zip(step.sampling, chosen, strict=True):
            seq = item.seq
            new = out.get(seq.group)
            if new is None or seq.finished:  # ended since the launch: its extra token is void
                continue
            try:
                new.append(self._append(seq, tok, lp, entry))
            except Exception:  # e.g. detokenization: fails this request only
                logger.exception("token bookkeeping failed for request %s",
                                 seq.group.request_id)
                out[seq.group] = None
        return out

    def _sampling_rows(
        self, group: SequenceGroup, rows: dict[int, int]
    ) -> tuple[list[Sequence], list[int]]:
        """The group's sequences that sample this step and their logits rows."""
        seqs = [s for s in group.live_seqs() if id(s) in rows]
        row_ids = [rows[id(s)] for s in seqs]
        leader = group.seqs[0]
        if len(group.seqs) == 1 and group.params.n > 1 and not leader.output_ids:
            # The prompt is done: the request forks into its n samples, all reading the one
            # prompt segment. Each sample draws its first token from the same logits row.
            for j in range(1, group.params.n):
                child = self._new_seq(group, j)
                self.kv.fork(leader, child)
                group.seqs.append(child)
                seqs.append(child)
                row_ids.append(rows[id(leader)])
        return seqs, row_ids

    def _sample_groups(
        self, groups: list[SequenceGroup], logits: torch.Tensor, rows: dict[int, int]
    ) -> dict[SequenceGroup, list[Delta] | None]:
        """Sample every row of ``groups`` in one batched call (one host copy per step). If the
        batch fails, each group is retried alone, so one bad request fails only itself."""
        if not groups:
            return {}
        per_group = [(g, *self._sampling_rows(g, rows)) for g in groups]
        try:
            seqs = [s for _, group_seqs, _ in per_group for s in group_seqs]
            row_ids = [r for _, _, group_rows in per_group for r in group_rows]
            picked = logits if row_ids == list(range(logits.shape[0])) else logits[row_ids]
            chosen = iter(sample(picked, seqs))
            choices = {g: [next(chosen) for _ in group_seqs] for g, group_seqs, _ in per_group}
        except ReplicaGroupFailed:  # the ranks' collectives no longer pair up: no retry helps
            raise
        except Exception:
            if len(groups) == 1:
                logger.exception("sampling failed for request %s", groups[0].request_id)
                return {groups[0]: None}
            choices = {}
            for g, group_seqs, group_rows in per_group:
                try:
                    choices[g] = sample(logits[group_rows], group_seqs)
                except ReplicaGroupFailed:
                    raise
                except Exception:
                    logger.exception("sampling failed for request %s", g.request_id)
                    choices[g] = None
        out: dict[SequenceGroup, list[Delta] | None] = {}
        for g, group_seqs, _ in per_group:
            if choices[g] is None:
                out[g] = None
                continue
            try:
                out[g] = [self._append(seq, tok, lp, entry)
                          for seq, (tok, lp, entry) in zip(group_seqs, choices[g], strict=True)]
            except Exception:  # e.g. detokenization: fails this request only
                logger.exception("token bookkeeping failed for request %s", g.request_id)
                out[g] = None
        return out

    def _append(self, seq: Sequence, token: int, logprob: float, entry) -> Delta:
        group, p = seq.group, seq.group.params
        accept(seq, token)
        seq.output_ids.append(token)
        seq.cumulative_logprob += logprob
        if entry is not None:
            seq.logprobs.append(entry)
        prev_len = len(seq.text)
        seq.text += seq.detok.add(token) if seq.detok is not None else ""
        reason = None
        if token in p.stop_token_ids or (not p.ignore_eos and token in group.eos_token_ids):
            reason = "stop"
        elif p.stop and len(seq.text) > prev_len:
            longest = max(map(len, p.stop))
            hit = self._find_stop(seq.text, p.stop, max(prev_len - longest + 1, 0))
            if hit is not None:
                pos, stop = hit
                seq.text = seq.text[: pos + len(stop) if p.include_stop_str_in_output else pos]
                reason = "stop"
        if reason is None and (
            len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len
        ):
            reason = "length"
        if reason is not None:
            if seq.detok is not None and not (
                p.stop
                and reason == "stop"
                and token not in p.stop_token_ids
                and token not in group.eos_token_ids
            ):
                seq.text += seq.detok.flush()
            seq.finish_reason = reason
            self.kv.free_seq(seq)
        # Hold back text that may be the start of a stop string, so nothing streamed is ever
        # taken back.
        holdback = max(map(len, p.stop)) - 1 if p.stop and reason is None else 0
        upto = max(len(seq.text) - holdback, seq.streamed)
        text, seq.streamed = seq.text[seq.streamed : upto], upto
        return Delta(
            group.request_id,
            seq.index,
            [token],
            text,
            reason,
            [entry] if entry is not None else None,
        )

    @staticmethod
    def _find_stop(text: str, stops: list[str], start: int) -> tuple[int, str] | None:
        best = None
        for stop in stops:
            pos = text.find(stop, start)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, stop)
        return best

    def _beam_update(
        self, group: SequenceGroup, logits: torch.Tensor, rows: dict[int, int]
    ) -> list[Delta]:
        beams = group.live_seqs()
        assert all(id(b) in rows for b in beams), "beams must step together"
        chosen = beam_step(
            group, beams, logits[[rows[id(b)] for b in beams]], group.params.max_tokens
        )
        if not chosen:
            for b in beams:
                self.kv.free_seq(b)
                b.finish_reason = "stop"
            return self._beam_final_deltas(group)
        # First pass: every selected beam gets its own sequence; a parent picked twice forks
        # (all response blocks shared; a shared partial block is copied on its first write).
        claimed: set[int] = set()
        assignments = []
        for parent, token, score in chosen:
            if parent.seq_id not in claimed:
                claimed.add(parent.seq_id)
                assignments.append((parent, parent.output_ids, token, score))
                continue
            child = self._new_seq(group, 0)
            self.kv.fork(parent, child)
            assignments.append((child, list(parent.output_ids), token, score))
        for b in beams:
            if b.seq_id not in claimed:
                self.kv.free_seq(b)
        new_seqs = []
        for i, (seq, outputs, token, score) in enumerate(assignments):
            seq.output_ids = outputs + [token]
            seq.cumulative_logprob = score
            seq.index = i
            new_seqs.append(seq)
        group.seqs = new_seqs
        return []

    def _beam_final_deltas(self, group: SequenceGroup) -> list[Delta]:
        outputs = self.build_output(group).outputs
        if not outputs:  # cannot happen with HF's rules; never leave a stream without an end
            return [Delta(group.request_id, 0, [], "", "length")]
        return [
            Delta(group.request_id, c.index, c.token_ids, c.text, c.finish_reason) for c in outputs
        ]

    # ----- results ----------------------------------------------------------------------------
    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def build_output(self, group: SequenceGroup) -> RequestOutput:
        p = group.params
        if p.use_beam_search:
            outputs = []
            for i, h in enumerate(group.finished_beams):
                ends = bool(h.output_ids) and h.output_ids[-1] in (
                    set(group.eos_token_ids) | set(p.stop_token_ids)
                )
                outputs.append(
                    CompletionOutput(
                        index=i,
                        token_ids=list(h.output_ids),
                        text=self.decode(h.output_ids, p.skip_special_tokens),
                        finish_reason=("stop" if ends else "length") if group.beam_done else None,
                        cumulative_logprob=h.cumulative_logprob,
                        score=h.score,
                    )
                )
        else:
            outputs = [
                CompletionOutput(
                    index=s.index,
                    token_ids=list(s.output_ids),
                    text=s.text,
                    finish_reason=s.finish_reason,
                    cumulative_logprob=s.cumulative_logprob,
                    logprobs=list(s.logprobs) if p.logprobs is not None else None,
                )
                for s in sorted(group.seqs, key=lambda s: s.index)
            ]
        return RequestOutput(
            group.request_id,
            list(group.prompt_ids),
            outputs,
            finished=group.is_finished,
            prompt=group.prompt_text,
            num_cached_tokens=group.cached_prompt_tokens,
            prompt_logprobs=(list(group.prompt_logprobs)
                             if group.params.prompt_logprobs is not None else None),
        )


def _mark_done(deltas: list[Delta], group: SequenceGroup) -> list[Delta]:
    if deltas:
        deltas[-1].request_done = True
        deltas[-1].num_cached_tokens = group.cached_prompt_tokens
    return deltas
