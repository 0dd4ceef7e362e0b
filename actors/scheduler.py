"""Iteration-level scheduler: FCFS, a token budget per step, chunked prefill, preemption.

Each step, running requests are served first (in arrival order), then waiting ones are admitted
while the budget, the sequence cap and the KV pool allow. A request's prompt is computed once,
by its first sequence, in chunks; its other sequences (samples, beams) then continue from the
shared prompt segment. When the pool runs dry the most recently arrived running request is
preempted: its blocks are freed and it is recomputed later (its prompt usually from the prefix
cache). Nothing is ever dropped.
"""

from __future__ import annotations

import bisect
import logging
from collections import deque
from dataclasses import dataclass, field

from .config import EngineConfig
from .kv_manager import NoFreeBlocks, SegmentKVManager
from .model_runner import ScheduledSeq
from .sequence import SequenceGroup, Status

logger = logging.getLogger(__name__)

@dataclass
class SchedulerOutput:
    batch: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[SequenceGroup] = field(default_factory=list)
    # Requests whose own planning or admission raised (logged): taken off the queues, for the
    # engine to end with an error while the rest of the batch goes on.
    failed: list[SequenceGroup] = field(default_factory=list)


class Scheduler:
    def __init__(self, config: EngineConfig, kv: SegmentKVManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[SequenceGroup] = deque()
        self.running: list[SequenceGroup] = []  # kept in arrival order

    def add(self, group: SequenceGroup) -> None:
        group.status = Status.WAITING
        self.waiting.append(group)

    def remove(self, group: SequenceGroup) -> None:
        """Drop a finished or aborted request and free its blocks."""
        if group in self.running:
            self.running.remove(group)
        elif group in self.waiting:
            self.waiting.remove(group)
        self.kv.free_group(group)
        group.status = Status.FINISHED

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @staticmethod
    def seq_slots(group: SequenceGroup) -> int:
        """Sequences the group occupies, counting the samples/beams it forks into after its
        prompt (before that it runs as one sequence)."""
        if len(group.seqs) == 1 and not group.seqs[0].output_ids:
            return group.params.num_sequences
        return len(group.live_seqs())

    def num_running_seqs(self) -> int:
        return sum(self.seq_slots(g) for g in self.running)

    def _plan(self, group: SequenceGroup, budget: int) -> list[ScheduledSeq]:
        """The new tokens each of the group's sequences computes this step, within budget."""
        if not group.prompt_done:
            # Chunks stop at the prompt's end so the prompt segment completes on its own.
            n = min(group.prompt_len - group.prompt_computed, budget)
            return [ScheduledSeq(group.seqs[0], n)] if n > 0 else []
        wants = [(s, s.num_tokens - s.num_computed) for s in group.live_seqs()]
        wants = [(s, w) for s, w in wants if w > 0]
        if group.params.use_beam_search and sum(w for _, w in wants) > budget:
            # Beams step together: catch up to one short of the end, sample in a later step.
            wants = [(s, w - 1) for s, w in wants]
        plan = []
        for seq, want in wants:
            n = min(want, budget)
            if n > 0:
                plan.append(ScheduledSeq(seq, n))
                budget -= n
        return plan

    def _reserve(self, plan: list[ScheduledSeq]) -> None:
        for item in plan:
            seq = item.seq
            end = seq.num_computed + item.num_tokens - seq.prompt_len
            if end > 0:
                self.kv.ensure_response_capacity(seq, end)

    def _preempt(self, group: SequenceGroup) -> None:
        self.running.remove(group)
        self.kv.free_group(group)
        self.kv.preemptions += 1
        group.status = Status.WAITING
        self.waiting.appendleft(group)

    def _fail(self, group: SequenceGroup, out: SchedulerOutput) -> None:
        logger.exception("scheduling request %s failed; it alone ends", group.request_id)
        for queue in (self.running, self.waiting):
            if group in queue:
                queue.remove(group)
        out.failed.append(group)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            group = self.running[i]
            try:
                plan = self._plan(group, budget)
                while True:
                    try:
                        self._reserve(plan)
                        break
                    except NoFreeBlocks:
                        victim = self.running[-1]
                        self._preempt(victim)
                        out.preempted.append(victim)
                        if victim is group:
                            plan = []
                            break
            except Exception:
                self._fail(group, out)
                continue
            if group.status is not Status.RUNNING:
                break
            out.batch += plan
            budget -= sum(item.num_tokens for item in plan)
            i += 1
        if out.preempted:
            return out  # memory is tight: admit nothing new this step
        num_seqs = self.num_running_seqs()
        while self.waiting and budget > 0:
            group = self.waiting[0]
            wanted = self.seq_slots(group)
            if num_seqs + wanted > self.config.max_num_seqs and self.running:
                break
            try:
                if not self.kv.can_admit(group):
                    break
                self.waiting.popleft()
                self.kv.admit(group)
                group.status = Status.RUNNING
                bisect.insort(self.running, group, key=lambda g: g.arrival)
                plan = self._plan(group, budget)
            except Exception:
                self._fail(group, out)
                continue
            out.batch += plan
            budget -= sum(item.num_tokens for item in plan)
            num_seqs += wanted
        return out
