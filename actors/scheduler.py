"""Iteration-level scheduler: FCFS, a token budget per step, chunked prefill, preemption.

Each step, running requests are served first (in arrival order), then waiting ones are admitted
while the budget, the sequence cap and the KV pool allow. A request's prompt is computed once,
by its first sequence, in chunks; its other sequences (samples, beams) then continue from the
shared prompt segment. When the pool runs dry the most recently arrived running request is
preempted: its blocks are freed and it is recomputed later (its prompt usually from the prefix
cache). Nothing is ever dropped.

When a model step fails, its requests become suspects (``Suspects``): they are re-run apart from
the others, in halves of the failed batch, until the request at fault fails alone.
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


class Suspects:
    """Requests of a failed model step, to be re-run in smaller batches until the one at fault
    is found. A step's failure cannot be pinned on one of its requests, so failing them all
    would fail the innocent too. Instead the failed batch is split in halves (*cohorts*), each
    run alone in a later step: a batch that succeeds clears its requests, one that fails is
    halved again, and a request that fails alone is at fault. So a request takes part in at
    most log2(batch) + 1 failed steps, and a bad request costs the others a few steps' delay.
    A failed step advanced no computed count, so running it again is simply scheduling it.
    """

    def __init__(self) -> None:
        self._cohorts: deque[list[SequenceGroup]] = deque()
        self.failed_alone_in_a_row = 0  # requests that failed alone since a step last succeeded

    def __bool__(self) -> bool:
        return bool(self._cohorts)

    @property
    def device_suspect(self) -> bool:
        """Two requests in a row failed alone with no step succeeding in between: the fault is
        more likely the device's than theirs."""
        return self.failed_alone_in_a_row >= 2

    def next_cohort(self) -> list[SequenceGroup] | None:
        """The requests to run apart in the next step (None: no suspects). A request that has
        ended or was preempted since is dropped (preempted, it is recomputed as any other)."""
        while self._cohorts:
            cohort = [g for g in self._cohorts[0] if g.status is Status.RUNNING]
            if cohort:
                self._cohorts[0] = cohort
                return cohort
            self._cohorts.popleft()
        return None

    def succeeded(self, groups: list[SequenceGroup]) -> None:
        self.failed_alone_in_a_row = 0
        self._forget(groups)

    def failed(self, groups: list[SequenceGroup]) -> list[SequenceGroup]:
        """A step of ``groups`` failed: returns the request at fault when it ran alone, else
        queues the two halves to run apart first."""
        self._forget(groups)
        if len(groups) == 1:
            self.failed_alone_in_a_row += 1
            return list(groups)
        half = (len(groups) + 1) // 2
        self._cohorts.extendleft([groups[half:], groups[:half]])  # the first half runs first
        return []

    def release(self, cohort: list[SequenceGroup]) -> None:
        """Back to normal scheduling without a verdict (the cohort had nothing to compute)."""
        self._forget(cohort)

    def _forget(self, groups: list[SequenceGroup]) -> None:
        if self._cohorts:
            done = set(groups)
            cohorts = ([g for g in c if g not in done] for c in self._cohorts)
            self._cohorts = deque(c for c in cohorts if c)


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
        self.suspects = Suspects()

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
        # After a failed step its requests run apart (Suspects), one cohort a step; the others
        # wait, so no failure of theirs can be pinned on an innocent request.
        cohort = self.suspects.next_cohort()
        serve = self.running if cohort is None else [g for g in self.running if g in cohort]
        for group in list(serve):
            if budget <= 0:
                break
            if group.status is not Status.RUNNING:
                break  # preempted to make room for an earlier one, like everything after it
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
        if cohort is not None:
            if not out.batch and not out.preempted:
                self.suspects.release(cohort)  # nothing of theirs to run: no verdict to wait for
            return out  # admit nothing new while isolating a fault
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
