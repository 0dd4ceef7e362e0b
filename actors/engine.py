"""The engine: requests in, tokens out, on one device (or as rank 0 of a replica group).

``EngineCore`` is synchronous: ``add_request`` validates and queues, ``step`` runs one scheduler
iteration (schedule -> KV copies -> model -> sample -> stop checks) and returns the deltas it
produced. ``AsyncEngine`` (async_engine.py) streams them. Neither knows anything of Ray.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
from segserve.models import load_spec, load_tokenizer, resolve_model_path

from .communicator import ReplicaGroupFailed, create_communicator
from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .kv_manager import NoFreeBlocks, SegmentKVManager
from .model_runner import ModelRunner, PromptScores, ScheduledSeq
from .outputs import Delta, TokenLogprob
from .sampler import DeviceSample, sample_on_device
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence, SequenceGroup, Status
from .structured import Grammars
from .token_updates import TokenUpdates, _mark_done
from .tp_group import stop_followers
from .tp_worker import ReplicaGroup

logger = logging.getLogger(__name__)

Prompt = str | list[int]
# After a failed collective: how long to look for the dead rank, whose peers' sockets can fail
# before Ray or the OS reports it, so that the error names it.
GROUP_DEATH_WAIT_S = 5.0


@dataclass
class _Step:
    """A launched model step: its batch, the rows that sample, their logits (on the device),
    and, for a decode step of plain sampling, the tokens already chosen on the device."""

    batch: list[ScheduledSeq]
    sampling: list[ScheduledSeq]
    logits: torch.Tensor
    on_decode_buffers: bool = False
    presampled: DeviceSample | None = None


class QueueFull(RuntimeError):
    """The engine's bounded waiting queue is full (the service answers 429)."""


class StepFailed(RuntimeError):
    """Model steps fail whatever the batch: the device, not a request, is at fault. Every
    request has been ended with an error; the AsyncEngine counts this as a failed step."""


class EngineCore(TokenUpdates):
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        path = resolve_model_path(config.model)
        self.model_path = path
        self.tokenizer = load_tokenizer(path)
        self.tp_group: ReplicaGroup | None = None
        self.runner = self._start_runner(config, path)
        self.spec = self.runner.spec
        self.max_model_len = self.runner.max_model_len
        self.kv = SegmentKVManager(
            self.runner.num_blocks, config.block_size, config.enable_prefix_caching,
            bytes_per_token=self.runner.kv_bytes_per_token(),
        )
        self.scheduler = Scheduler(config, self.kv)
        self.eos_token_ids = frozenset(self.spec.eos_token_ids) | self._generation_eos(path)
        self.grammars = Grammars(self.tokenizer, self.spec.vocab_size, list(self.eos_token_ids))
        self.groups: dict[str, SequenceGroup] = {}
        self._inbox: deque[tuple[str, Any]] = deque()  # ("add", group) | ("abort", id)
        self._rng = random.Random(config.seed)
        self.num_steps = 0
        self._inflight: _Step | None = None  # a decode step whose tokens are not read yet
        self._failed: list[Delta] = []  # what a failed launch ended (see _isolate)

    def _start_runner(self, config: EngineConfig, path) -> ModelRunner:
        """This rank's runner; with tensor_parallel_size > 1, first the other ranks, and the
        communicator between them all (the group starts together or fails with a timeout)."""
        tp = config.tensor_parallel_size
        if tp == 1:
            return ModelRunner(config, path)
        load_spec(path).check_tensor_parallel(tp)
        device = torch.device(config.device)
        if device.type == "cpu" and config.cpu_threads is None:  # the ranks share the cores
            config = dataclasses.replace(config, cpu_threads=max(1, (os.cpu_count() or 1) // tp))
        if config.tp_launcher == "processes" and device.type == "cuda" \
                and config.communicator != "gloo" \
                and (device.index or 0) + tp > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size {tp} needs {tp} GPUs; this machine has "
                             f"{torch.cuda.device_count()}")
        self.tp_group = group = ReplicaGroup(config, path)
        try:
            comm = create_communicator(config.communicator, 0, tp, group.address, device,
                                       config.collective_timeout_s, group.kvs_address)
            runner = ModelRunner(config, path, comm)
            group.follow()
        except BaseException:
            group.stop(timeout_s=1.0)
            raise
        self._group_checked = time.monotonic()
        logger.info("replica group of %d ranks over %s", tp, comm.name)
        return runner

    def check_group(self, every_s: float = 0.0) -> None:
        """Raises ReplicaGroupFailed if a tensor-parallel rank is gone (at most once per
        ``every_s`` seconds: a live check costs a system call or a Ray round trip)."""
        if self.tp_group is None:
            return
        now = time.monotonic()
        if now - self._group_checked >= every_s:
            self._group_checked = now
            self.tp_group.check()

    def shutdown(self) -> None:
        """Stop the other ranks of the replica group (nothing to do alone)."""
        if self.tp_group is not None:
            stop_followers(self.runner)
            # Close before joining the workers: each closes its communicator as it leaves its
            # loop, and NCCL's close is collective (see TorchDistCommunicator.close).
            self.runner.comm.close()
            self.tp_group.stop()
            self.tp_group = None

    @staticmethod
    def _generation_eos(path) -> frozenset[int]:
        import json

        file = path / "generation_config.json"
        if not file.is_file():
            return frozenset()
        eos = json.loads(file.read_text()).get("eos_token_id")
        return frozenset([eos] if isinstance(eos, int) else (eos or []))

    # ----- requests -------------------------------------------------------------------------
    def make_request(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> SequenceGroup:
        """Validate and tokenize; raises ValueError naming the problem. Touches no engine state,
        so it is safe to call from any thread."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError("params must be a SamplingParams")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids instead of text")
            prompt_ids = list(self.tokenizer(prompt).input_ids)
            text = prompt
        elif isinstance(prompt, list | tuple):
            prompt_ids, text = list(prompt), None
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt_ids):
                raise ValueError("prompt token ids must be integers")
        else:
            raise ValueError(
                f"prompt must be a string or a list of token ids, not {type(prompt).__name__}"
            )
        if not prompt_ids:
            raise ValueError("prompt is empty")
        # Text is checked too: a tokenizer may know more tokens than the model has embeddings.
        bad = [t for t in prompt_ids if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise ValueError(
                f"prompt token id {bad[0]} is outside the model's vocabulary "
                f"[0, {self.spec.vocab_size})"
            )
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} "
                f"exceeds the model's max length {self.max_model_len}"
            )
        # Worst case alone in the pool: the prompt segment plus a full private response segment
        # per sequence (the last token's K/V is never written). A request over this could only
        # preempt itself forever.
        need = self.kv.blocks_for(len(prompt_ids)) + params.num_sequences * max(
            self.kv.blocks_for(params.max_tokens - 1), 1
        )
        if need > self.kv.num_blocks:
            raise ValueError(
                f"the request needs up to {need} KV blocks but the pool holds "
                f"{self.kv.num_blocks}; shorten the prompt, lower max_tokens/n/beam_width or "
                f"give the KV cache more memory"
            )
        if params.num_sequences > self.config.max_num_seqs:
            raise ValueError(
                f"n/beam_width {params.num_sequences} exceeds max_num_seqs "
                f"{self.config.max_num_seqs}"
            )
        request_id = request_id or uuid.uuid4().hex
        group = SequenceGroup(
            request_id,
            prompt_ids,
            params,
            time.monotonic(),
            prompt_text=text,
            eos_token_ids=self.eos_token_ids,
        )
        self._check_constraints(group)
        group.seqs.append(self._new_seq(group, 0))
        return group

    def _check_constraints(self, group: SequenceGroup) -> None:
        """Token ids in range, bad words tokenized, the grammar compiled (ValueError naming
        the problem, e.g. an invalid JSON schema)."""
        p, vocab = group.params, self.spec.vocab_size
        for name, ids in (("logit_bias", list(p.logit_bias or ())),
                          ("allowed_token_ids", p.allowed_token_ids or []),
                          ("stop_token_ids", p.stop_token_ids)):
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise ValueError(f"invalid sampling parameter {name}: token id {bad[0]} is "
                                 f"outside the model's vocabulary [0, {vocab})")
        if p.bad_words:
            if self.tokenizer is None:
                raise ValueError("invalid sampling parameter bad_words: this model has no "
                                 "tokenizer")
            group.bad_words_ids = self._bad_words_ids(p.bad_words)
        if p.structured:
            try:
                group.grammar = self.grammars.compile(p.structured)
            except ValueError as e:
                raise ValueError(f"invalid sampling parameter structured: {e}") from None

    def _bad_words_ids(self, words: list[str]) -> list[list[int]]:
        """Each word's token ids as it would start the text and after a space (vLLM's rule),
        each distinct sequence once, tokenized in one batch call."""
        texts = [w.lstrip() for w in words] + [" " + w.lstrip() for w in words]
        encoded = self.tokenizer(texts, add_special_tokens=False).input_ids
        n = len(words)
        distinct = dict.fromkeys(tuple(ids) for pair in zip(encoded[:n], encoded[n:], strict=True)
                                 for ids in pair if ids)  # fmt: skip
        return [list(ids) for ids in distinct]

    def _new_seq(self, group: SequenceGroup, index: int) -> Sequence:
        seq = Sequence(group, index=index)
        if group.grammar is not None:
            seq.matcher = self.grammars.matcher(group.grammar)
        p = group.params
        if not p.greedy and not p.use_beam_search:
            seed = p.seed if p.seed is not None else self._rng.getrandbits(63)
            seq.sample_seed = hash((seed, index)) & (2**63 - 1)
        # Beams are decoded once, at the end (build_output): they never stream text.
        if self.tokenizer is not None and not p.use_beam_search:
            seq.detok = IncrementalDetokenizer(
                self.tokenizer, group.prompt_ids, p.skip_special_tokens
            )
        return seq

    def submit(self, group: SequenceGroup) -> None:
        """Queue a validated request; it joins the batch at the next step. Thread-safe."""
        limit = self.config.max_queue_len
        # Requests only: an abort still in the inbox is none (it used to count, so a request
        # arriving right after a client left could get a 429 from an idle engine). list() copies
        # the deque in one step, safe while the stepping thread pops from it.
        queued = sum(kind == "add" for kind, _ in list(self._inbox))
        if limit is not None and len(self.scheduler.waiting) + queued >= limit:
            raise QueueFull(f"the engine queue is full ({limit} waiting requests)")
        self._inbox.append(("add", group))

    def add_request(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        group = self.make_request(prompt, params, request_id)
        self.submit(group)
        return group.request_id

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks at the next step. Thread-safe."""
        self._inbox.append(("abort", request_id))

    def _drain_inbox(self) -> list[Delta]:
        deltas = []
        while self._inbox:
            kind, item = self._inbox.popleft()
            if kind == "add":
                if item.request_id in self.groups:
                    logger.warning("duplicate request id %s ignored", item.request_id)
                    continue
                self.groups[item.request_id] = item
                self.scheduler.add(item)
            else:
                group = self.groups.get(item)
                if group is not None:
                    deltas += self._end(group, "abort")
        return deltas

    def has_work(self) -> bool:
        return bool(self._inbox) or self.scheduler.has_work() or self._inflight is not None

    @property
    def device_suspect(self) -> bool:
        """Model steps have failed for request after request with none succeeding since."""
        return self.scheduler.suspects.device_suspect

    # ----- one iteration ----------------------------------------------------------------------
    def step(self) -> list[Delta]:
        """One iteration. A decode step whose tokens can be chosen on the device is left in
        flight: the next call first launches the step after it (its input ids taken from the
        device), then reads this one's tokens while the GPU works, so host bookkeeping
        overlaps device time. Its deltas therefore come back one call later."""
        try:
            return self._step()
        except ReplicaGroupFailed as e:
            self._raise_naming_the_rank(e)
            raise

    def _raise_naming_the_rank(self, error: ReplicaGroupFailed) -> None:
        """A failed collective usually means a rank died, and its peers' sockets can notice
        before Ray or the OS reports the death: look for the rank for a few seconds and, once
        it is found, raise the error that names it (the operator's first question)."""
        deadline = time.monotonic() + GROUP_DEATH_WAIT_S
        while True:
            try:
                self.check_group()
            except ReplicaGroupFailed as named:
                raise named from error
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)

    def _step(self) -> list[Delta]:
        self.check_group(every_s=0.05)
        deltas = self._drain_inbox()
        if self._inflight is not None:
            prev, self._inflight = self._inflight, None
            batch = self._lookahead(prev)
            if batch is not None:
                self._inflight = self._launch(batch, prev)
                if self._inflight is None:  # the launch failed: its requests are suspects
                    deltas += self._failed
            deltas += self._complete(prev)
            if self._inflight is not None:
                return deltas
        sched = self.scheduler.schedule()
        for group in sched.failed:  # its own planning raised (logged): it alone ends
            deltas += self._end(group, "error")
        if not sched.batch:
            return deltas
        step = self._launch(sched.batch)
        if step is None:
            return deltas + self._failed
        if step.presampled is not None:
            self._inflight = step
            return deltas
        return deltas + self._complete(step)

    def _launch(self, batch: list[ScheduledSeq], prev: _Step | None = None) -> _Step | None:
        """Run the model on ``batch`` and advance its computed counts; a decode step of plain
        sampling also queues its sampling and the copy of its results."""
        self.num_steps += 1
        source = None
        if prev is not None:
            rows = {id(item.seq): i for i, item in enumerate(prev.sampling)}
            source = (prev.presampled.tokens, [rows[id(item.seq)] for item in batch])
        on_decode_buffers = self.runner.is_decode_step(batch)
        scores: list[PromptScores] = []
        copies = self.kv.take_pending_copies()
        try:
            logits = self.runner.execute(batch, copies, source, scores)
            for sc in scores:
                self._add_prompt_logprobs(sc)
        except Exception as e:  # a kernel failure must not take the whole engine down
            if self.tp_group is not None:  # the ranks' collectives may no longer pair up
                self.check_group()
                raise ReplicaGroupFailed(f"a replica-group step failed: {e}") from e
            self._failed = self._isolate(batch, copies, e)
            return None
        self.scheduler.suspects.succeeded(list(dict.fromkeys(item.seq.group for item in batch)))
        step = _Step(batch, [item for item in batch if item.samples], logits, on_decode_buffers)
        for item in batch:
            seq, group = item.seq, item.seq.group
            if seq.num_computed < group.prompt_len:
                group.prompt_computed += item.num_tokens
                self.kv.commit_prompt(group)
            else:
                seq.response_computed += item.num_tokens
        if self._presamplable(step):
            # a lookahead row's previous token is sampled but not yet in its output_ids
            pending = [int(item.lookahead) for item in step.sampling]
            step.presampled = sample_on_device(logits, [item.seq for item in step.sampling],
                                               pending)
            step.presampled.start_copy()
        return step

    def _isolate(self, batch: list[ScheduledSeq], copies: list[tuple[int, int]],
                 error: Exception) -> list[Delta]:
        """A failed step's requests are not failed together: the scheduler runs them again in
        smaller batches until the request at fault fails alone (Suspects), and only that one
        ends, with an error. Nothing of the step was kept (computed counts, prefix-cache
        publication, sampling), so the retries recompute exactly what it would have. Called in
        the ``except`` block: the log gets the traceback."""
        groups = list(dict.fromkeys(item.seq.group for item in batch))
        suspects = self.scheduler.suspects
        ids = [g.request_id for g in groups]
        if not suspects and suspects.device_suspect:  # a new batch fails as well
            logger.exception("step failed for requests %s after others failed alone, one after "
                             "another: the device is at fault; failing every request", ids)
            for group in list(self.groups.values()):
                self._end(group, "error")
            raise StepFailed("the model step fails whatever the batch") from error
        at_fault = suspects.failed(groups)
        if at_fault:
            logger.exception("step failed for request %s alone; it ends with an error", ids[0])
        else:
            logger.exception("step failed for requests %s; running them again in halves", ids)
        deltas = [d for g in at_fault for d in self._end(g, "error")]
        self.kv.requeue_copies(copies)
        return deltas

    @staticmethod
    def _add_prompt_logprobs(sc: PromptScores) -> None:
        group = sc.group
        assert sc.first == len(group.prompt_logprobs), "prompt log-probs out of order"
        for j, (lp, top) in enumerate(zip(sc.logprobs, sc.top, strict=True)):
            token = group.prompt_ids[sc.first + j + 1]
            group.prompt_logprobs.append(TokenLogprob(token, lp, top))

    def _presamplable(self, step: _Step) -> bool:
        """A decode step on the fixed buffers whose rows need no host state to pick a token:
        no beams, no penalties (they read the host's output ids), no grammar or multi-token
        bad word (their state moves with every token), no fork pending. (min_tokens counts
        the pending token: see sample_on_device.)"""
        if not step.sampling or not step.on_decode_buffers:
            return False
        for item in step.sampling:
            group = item.seq.group
            p = group.params
            if p.use_beam_search or p.repetition_penalty != 1.0 or p.presence_penalty \
                    or p.frequency_penalty:
                return False
            if p.n > 1 and len(group.seqs) == 1 and not group.seqs[0].output_ids:
                return False
            if group.grammar is not None or any(len(w) > 1 for w in group.bad_words_ids):
                return False
        return True

    def _lookahead(self, prev: _Step) -> list[ScheduledSeq] | None:
        """The decode step after ``prev``, before its tokens are known: every running sequence
        continues by one token, except those ``prev`` surely ends (max_tokens, max length).
        None when that is not the next step (requests waiting, a sequence not in ``prev``, no
        free block: the scheduler decides then)."""
        if self._inbox or self.scheduler.waiting or self.scheduler.suspects:
            return None
        live = [item.seq for item in prev.sampling
                if not item.seq.finished and item.seq.group.status is Status.RUNNING]
        if len(live) != self.scheduler.num_running_seqs():
            return None
        batch = []
        for seq in live:
            if (len(seq.output_ids) + 1 >= seq.group.params.max_tokens
                    or seq.num_computed + 1 >= self.max_model_len):
                continue
            try:
                self.kv.ensure_response_capacity(seq, seq.num_computed + 1 - seq.prompt_len)
            except NoFreeBlocks:
                return None
            batch.append(ScheduledSeq(seq, 1, lookahead=True))
        if not batch or not self.runner.is_decode_step(batch):
            return None
        return batch

    def _complete(self, step: _Step) -> list[Delta]:
        """Sample (unless done on the device already), append the tokens, check stops."""
        deltas = []
        rows = {id(item.seq): i for i, item in enumerate(step.sampling)}
        groups = list(dict.fromkeys(item.seq.group for item in step.sampling))
        # A request may have ended since the launch (aborted, or finished by the step before).
        groups = [g for g in groups if g.status is Status.RUNNING]
        results: dict[SequenceGroup, list[Delta] | None] = {}
        for group in [g for g in groups if g.params.max_tokens == 0]:
            try:
                results[group] = self._end_prefill_only(group)
            except ReplicaGroupFailed:  # a collective failed: the group is done, not one request
                raise
            except Exception:  # one request's failure must not wedge the others
                logger.exception("ending prefill-only request %s failed", group.request_id)
                results[group] = None
        groups_to_sample = [g for g in groups if g.params.max_tokens > 0]
        if step.presampled is not None:
            results.update(self._apply_presampled(step, groups_to_sample))
        else:
            plain = [g for g in groups_to_sample if not g.params.use_beam_search]
            results.update(self._sample_groups(plain, step.logits, rows))
        for group in groups:
            if group.params.use_beam_search:
                try:
                    results[group] = self._beam_update(group, step.logits, rows)
                except ReplicaGroupFailed:
                    raise
                except Exception:  # one request's failure must not wedge the others
                    logger.exception("beam step failed for request %s", group.request_id)
                    results[group] = None
        done_groups = set()
        for group in groups:
            new = results.get(group)
            if new is None:
                deltas += self._end(group, "error")
                continue
            if group.params.prompt_logprobs is not None and not group.prompt_logprobs_sent:
                group.prompt_logprobs_sent = True  # with the request's first deltas
                for d in new:
                    d.prompt_logprobs = group.prompt_logprobs
            if group.is_finished:
                done_groups.add(group)
                _mark_done(new, group)
            deltas += new
        for group in done_groups:
            self.scheduler.remove(group)
            self.groups.pop(group.request_id, None)
        return deltas

    def _end_prefill_only(self, group: SequenceGroup) -> list[Delta]:
        """max_tokens 0: the prompt is computed (for its log-probs) and nothing is generated;
        each of the n choices ends at once."""
        for j in range(len(group.seqs), group.params.n):
            group.seqs.append(self._new_seq(group, j))
        deltas = []
        for seq in group.seqs:
            seq.finish_reason = "length"
            self.kv.free_seq(seq)
            deltas.append(Delta(group.request_id, seq.index, [], "", "length"))
        return deltas

    def _end(self, group: SequenceGroup, reason: str) -> list[Delta]:
        """End a request early ("abort" or "error"): free its blocks, end its live sequences."""
        self.scheduler.remove(group)
        self.groups.pop(group.request_id, None)
        deltas = []
        for s in group.live_seqs():
            s.finish_reason = reason
            deltas.append(Delta(group.request_id, s.index, [], "", reason, error=group.error))
        return _mark_done(deltas, group)

    def stats(self) -> dict[str, float]:
        m = self.kv.metrics()
        m.waiting_seqs = sum(self.scheduler.seq_slots(g) for g in self.scheduler.waiting)
        m.running_seqs = self.scheduler.num_running_seqs()
        out = m.as_dict()
        out["waiting_requests"] = len(self.scheduler.waiting) + sum(
            1 for k, _ in self._inbox if k == "add"
        )
        out["running_requests"] = len(self.scheduler.running)
        out["steps"] = self.num_steps
        return out

