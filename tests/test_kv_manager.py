"""SegmentKVManager: a hypothesis state machine drives random admit / prefill / grow / fork /
free / preempt sequences against an independent model of the pool, plus unit tests of prefix
hits, LRU eviction and fork (copy-on-write of the shared partial block).

The model tracks, for every block slot, *what* KV it holds: the whole token prefix up to and
including that position (the KV of a position depends on every token before it). That makes
the oracle independent of the manager's hashing: a prefix-cache hit is correct only if the hit
block holds exactly the prompt's prefix, and a block shared while still in use shows up as a
slot whose content some live sequence did not write.
"""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from segserve.actors.kv_manager import NoFreeBlocks, SegmentKVManager, block_key, root_key
from segserve.actors.sampling_params import SamplingParams
from segserve.actors.sequence import Sequence, SequenceGroup

# ----- helpers ------------------------------------------------------------------------------


def make_group(
    rid: str, prompt: list[int], n: int = 1, cache_salt: str | None = None
) -> SequenceGroup:
    group = SequenceGroup(rid, list(prompt), SamplingParams(n=n, cache_salt=cache_salt), 0.0)
    group.seqs.append(Sequence(group))
    return group


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def prefill(kv: SegmentKVManager, group: SequenceGroup, upto: int | None = None) -> None:
    group.prompt_computed = group.prompt_len if upto is None else upto
    kv.commit_prompt(group)


# ----- the state machine ----------------------------------------------------------------------


class KVMachine(RuleBasedStateMachine):
    """Each rule mirrors what the scheduler / engine does with the manager; the invariants
    recount everything from the live segments."""

    @initialize(
        block_size=st.sampled_from([1, 2, 4]),
        num_blocks=st.integers(4, 24),
        caching=st.sampled_from([True, True, False]),
    )
    def setup(self, block_size, num_blocks, caching):
        self.bs = block_size
        self.kv = SegmentKVManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.caching = caching
        self.live: list[SequenceGroup] = []  # admitted groups
        self.parked: list[SequenceGroup] = []  # preempted groups that may come back
        self.prompts: list[list[int]] = [[7, 7, 7, 7, 7, 7, 7, 7, 7]]
        self.content: dict[int, list[tuple | None]] = {}  # block -> per-slot token prefix
        self.lru: list[int] = []  # our own model of the cached (ref 0, hashed) blocks, LRU first
        self.hit_tokens = 0
        self.evictions = 0
        self.counter = 0

    # ----- model helpers ------------------------------------------------------------------
    def segment_refs(self) -> list[int]:
        refs = [0] * self.kv.num_blocks
        for g in self.live:
            assert len(set(g.prompt_blocks)) == len(g.prompt_blocks), "block twice in a segment"
            for b in g.prompt_blocks:
                refs[b] += 1
            for s in g.seqs:
                assert len(set(s.response_blocks)) == len(s.response_blocks)
                for b in s.response_blocks:
                    refs[b] += 1
        return refs

    def write(self, block: int, slot: int, value: tuple) -> None:
        self.content.setdefault(block, [None] * self.bs)[slot] = value

    def apply_copies(self) -> None:
        """What the model runner does first thing in a step: run the queued block copies."""
        for src, dst in self.kv.take_pending_copies():
            assert self.kv.ref_count[src] > 0 and self.kv.ref_count[dst] > 0
            self.content[dst] = list(self.content.get(src, [None] * self.bs))

    def cached_prefixes(self) -> set[tuple]:
        """Full-block prefixes the cache holds (ref-0 or in use), by our content model."""
        out = set()
        for b, h in enumerate(self.kv.block_hash):
            if h is not None:
                out.add(self.content[b][-1])
        return out

    def expected_hit_blocks(self, prompt: list[int]) -> list[int]:
        """The cached blocks an admission of ``prompt`` must reuse, found by content."""
        if not self.caching:
            return []
        by_prefix = {
            self.content[b][-1]: b for b, h in enumerate(self.kv.block_hash) if h is not None
        }
        hits = []
        while (len(hits) + 1) * self.bs <= len(prompt):
            b = by_prefix.get(tuple(prompt[: (len(hits) + 1) * self.bs]))
            if b is None:
                break
            hits.append(b)
        if hits and len(hits) * self.bs >= len(prompt):
            hits.pop()  # one prompt token must be left to compute
        return hits

    def release_hashed(self, blocks: list[int], before: list[int]) -> None:
        """Append to our LRU the hashed blocks that this operation took to ref 0, in order."""
        for b in blocks:
            if before[b] > 0 and self.kv.ref_count[b] == 0 and self.kv.block_hash[b] is not None:
                if b not in self.lru:
                    self.lru.append(b)

    def check_allocation(
        self, new_blocks: list[int], free_before: list[int], lru_before: list[int]
    ) -> None:
        """Fresh blocks come from the free list first, then evict cached blocks LRU-first."""
        evicted = [b for b in new_blocks if b in lru_before]
        from_free = [b for b in new_blocks if b not in lru_before]
        assert set(from_free) <= set(free_before)
        if evicted:
            assert len(from_free) == len(free_before), "evicted while free blocks remained"
        assert sorted(evicted, key=lru_before.index) == lru_before[: len(evicted)]
        if evicted:
            event("evicted")
        for b in evicted:
            self.lru.remove(b)
            self.evictions += 1

    def pick_prompt(self, data) -> list[int]:
        base = data.draw(st.sampled_from(self.prompts))
        keep = data.draw(st.integers(0, len(base)))
        suffix = data.draw(st.lists(st.integers(0, 4), max_size=3 * self.bs + 2))
        prompt = (base[:keep] + suffix) or [data.draw(st.integers(0, 4))]
        return prompt[: 5 * self.bs + 3]

    # ----- rules ----------------------------------------------------------------------------
    @rule(data=st.data(), n=st.integers(1, 3), force=st.booleans())
    def admit(self, data, n, force):
        if self.parked and data.draw(st.booleans()):
            group = self.parked.pop(data.draw(st.integers(0, len(self.parked) - 1)))
            group.seqs = [Sequence(group)]  # recomputed from scratch after a preemption
        else:
            self.counter += 1
            group = make_group(f"r{self.counter}", self.pick_prompt(data), n)
            self.prompts.append(group.prompt_ids)
        kv, plen = self.kv, group.prompt_len
        hits = self.expected_hit_blocks(group.prompt_ids)
        h = len(hits)
        refs_before = list(kv.ref_count)
        free_before = list(kv.free)
        revived = [b for b in hits if refs_before[b] == 0]
        need = ceil_div(plen, self.bs) - h + group.params.num_sequences
        can = kv.can_admit(group)
        assert can == (refs_before.count(0) - len(revived) >= need)
        if not (can or force):
            return
        lru_rest = [b for b in self.lru if b not in revived]
        try:
            kv.admit(group)
        except NoFreeBlocks:
            assert not can
            assert group.request_id not in kv.live_groups and not group.prompt_blocks
            # It took every free block and evicted every other cached block before giving up;
            # the rollback frees those (unhashed) and puts the revived hits back in the cache,
            # as the most recently used.
            assert all(kv.block_hash[b] is None for b in lru_rest)
            assert set(kv.free) == set(free_before) | set(lru_rest)
            self.evictions += len(lru_rest)
            event("admit failed")
            self.lru = revived
            return
        # The hits: exactly the cached blocks holding this prompt's full-block prefix.
        assert group.prompt_blocks[:h] == hits
        assert group.prompt_computed == h * self.bs == group.cached_prompt_tokens
        assert group.prompt_computed < plen
        assert len(group.prompt_blocks) == ceil_div(plen, self.bs)
        for i, b in enumerate(hits):
            assert self.content[b] == [
                tuple(group.prompt_ids[: i * self.bs + s + 1]) for s in range(self.bs)
            ]
        self.lru = lru_rest
        self.check_allocation(group.prompt_blocks[h:], free_before, list(lru_rest))
        self.hit_tokens += h * self.bs
        event(f"admitted, hits={min(h, 2)}")
        if can:
            assert kv.num_available() >= group.params.num_sequences  # room for first tokens
        self.live.append(group)
        if data.draw(st.booleans()):  # the whole prompt in one step, as short prompts go
            self.compute_prompt(group, plen)

    @precondition(lambda self: any(not g.prompt_done for g in self.live))
    @rule(data=st.data())
    def prefill(self, data):
        """A chunk of prefill: compute up to some prompt position, then publish full blocks."""
        group = data.draw(st.sampled_from([g for g in self.live if not g.prompt_done]))
        self.compute_prompt(
            group, data.draw(st.integers(group.prompt_computed + 1, group.prompt_len))
        )

    def compute_prompt(self, group: SequenceGroup, new: int) -> None:
        self.apply_copies()
        for pos in range(group.prompt_computed, new):
            self.write(
                group.prompt_blocks[pos // self.bs],
                pos % self.bs,
                tuple(group.prompt_ids[: pos + 1]),
            )
        prefill(self.kv, group, new)
        if self.caching:
            # every full computed block of this prompt is now findable in the cache
            have = self.cached_prefixes()
            for i in range(new // self.bs):
                assert tuple(group.prompt_ids[: (i + 1) * self.bs]) in have
        else:
            assert not self.kv.hash_to_block

    def running_seqs(self) -> list[Sequence]:
        return [s for g in self.live if g.prompt_done for s in g.seqs if not s.finished]

    @precondition(lambda self: self.running_seqs())
    @rule(data=st.data(), k=st.integers(1, 6))
    def grow(self, data, k):
        """A decode / chunk step of one sequence: make room (copy-on-write), then write."""
        self.grow_seq(data.draw(st.sampled_from(self.running_seqs())), k, data)

    def grow_seq(self, seq: Sequence, k: int, data) -> None:
        self.apply_copies()
        kv, bs = self.kv, self.bs
        before, refs_before = list(seq.response_blocks), list(kv.ref_count)
        free_before, lru_before = list(kv.free), list(self.lru)
        computed, target = seq.response_computed, seq.response_computed + k
        try:
            kv.ensure_response_capacity(seq, target)
        except NoFreeBlocks:
            # The pool ran dry; what it did get stays with the sequence.
            assert kv.num_available() == 0
            event("grow: pool dry")
            fresh = [b for b in seq.response_blocks if b not in before]
            self.check_allocation(fresh, free_before, lru_before)
            return
        # Blocks this write touches that are shared with a fork are replaced by fresh blocks
        # (copy-on-write); one that already holds computed tokens is queued for a copy.
        first, last = computed // bs, ceil_div(target, bs)
        blocks = seq.response_blocks
        assert len(blocks) == max(len(before), last)
        assert blocks[:first] == before[:first]
        fresh, copies = [], []
        for i in range(first, len(before)):
            shared = refs_before[before[i]] > 1
            if i < last and shared:
                assert refs_before[blocks[i]] == 0, "copy-on-write into a used block"
                fresh.append(blocks[i])
                if i * bs < computed:
                    copies.append((before[i], blocks[i]))
            else:
                assert blocks[i] == before[i]
        fresh += blocks[len(before) :]
        assert kv.pending_copies == copies
        event(f"grow: cow={len(fresh) > len(blocks) - len(before)} copies={len(copies)}")
        self.check_allocation(fresh, free_before, lru_before)
        new_tokens = data.draw(st.lists(st.integers(0, 4), min_size=k, max_size=k))
        seq.output_ids += new_tokens
        prompt = seq.group.prompt_ids
        self.apply_copies()  # the runner copies first, then writes the step's tokens
        for r in range(computed, target):
            self.write(blocks[r // bs], r % bs, tuple(prompt + seq.output_ids[: r + 1]))
        seq.response_computed = target

    @precondition(lambda self: self.running_seqs())
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self.running_seqs()))
        group = parent.group
        child = Sequence(group)
        child.output_ids = list(parent.output_ids)
        refs_before, free_before = list(self.kv.ref_count), list(self.kv.free)
        pending_before = list(self.kv.pending_copies)
        self.kv.fork(parent, child)  # never needs a block: it shares everything
        group.seqs.append(child)
        assert child.response_computed == parent.response_computed
        assert child.response_blocks == parent.response_blocks
        for b in parent.response_blocks:
            assert self.kv.ref_count[b] == refs_before[b] + 1
        assert list(self.kv.free) == free_before
        assert self.kv.pending_copies == pending_before
        if data.draw(st.booleans()):  # a beam step: one of the two writes its next token
            self.grow_seq(data.draw(st.sampled_from([parent, child])), 1, data)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free_seq(self, data):
        seqs = [s for g in self.live for s in g.seqs if not s.finished]
        if not seqs:
            return
        seq = data.draw(st.sampled_from(seqs))
        self.apply_copies()
        before = list(self.kv.ref_count)
        self.kv.free_seq(seq)
        seq.finish_reason = "stop"
        assert seq.response_blocks == [] and seq.response_computed == 0
        self.release_hashed(list(range(self.kv.num_blocks)), before)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), park=st.booleans())
    def free_group(self, data, park):
        group = data.draw(st.sampled_from(self.live))
        self.apply_copies()
        before = list(self.kv.ref_count)
        blocks = list(group.prompt_blocks)
        self.kv.free_group(group)
        self.live.remove(group)
        assert group.request_id not in self.kv.live_groups
        assert group.prompt_blocks == [] and group.prompt_computed == 0
        self.release_hashed(blocks[::-1], before)  # prompt blocks: tail released first
        if park:
            self.parked.append(group)

    @rule()
    def take_copies(self):
        self.apply_copies()

    # ----- invariants ---------------------------------------------------------------------
    @invariant()
    def pool_is_consistent(self):
        if not hasattr(self, "kv"):
            return
        kv = self.kv
        free, evictable = list(kv.free), list(kv.evictable)
        assert len(free) == len(set(free)), "duplicate in free list"
        refs = self.segment_refs()
        assert kv.ref_count == refs
        assert set(kv.live_groups) == {g.request_id for g in self.live}
        for b in range(kv.num_blocks):
            in_free, in_evict = b in free, b in kv.evictable
            if refs[b] > 0:
                assert not in_free and not in_evict, f"used block {b} also free/cached"
            elif kv.block_hash[b] is not None:
                assert in_evict and not in_free, f"cached block {b} misplaced"
            else:
                assert in_free and not in_evict, f"free block {b} misplaced"
        assert evictable == self.lru, "cached blocks not in LRU (release) order"
        for h, b in kv.hash_to_block.items():
            assert kv.block_hash[b] == h
        assert sum(h is not None for h in kv.block_hash) == len(kv.hash_to_block)
        if not self.caching:
            assert not kv.hash_to_block and not evictable
        # a hashed block holds one full prompt prefix, and no two hold the same one
        prefixes = [self.content[b][-1] for b in kv.hash_to_block.values()]
        assert len(prefixes) == len(set(prefixes))
        for b in kv.hash_to_block.values():
            slots = self.content[b]
            assert all(s is not None for s in slots)
            assert len(slots[-1]) % self.bs == 0
            assert all(
                slots[i] == slots[-1][: len(slots[-1]) - self.bs + i + 1] for i in range(self.bs)
            )
        for src, dst in kv.pending_copies:
            assert refs[src] > 0 and refs[dst] > 0
        m = kv.metrics()
        used = sum(r > 0 for r in refs)
        cached = sum(
            1 for b in range(kv.num_blocks) if refs[b] == 0 and kv.block_hash[b] is not None
        )
        assert (m.blocks_total, m.blocks_used, m.blocks_cached, m.blocks_free) == (
            kv.num_blocks,
            used,
            cached,
            kv.num_blocks - used - cached,
        )
        assert m.prefix_cache_hit_tokens == self.hit_tokens
        assert m.evictions == self.evictions

    @invariant()
    def live_kv_is_what_was_written(self):
        """Every computed position of every live sequence still holds its own KV (pending
        copies applied, as the runner will before anything is written)."""
        if not hasattr(self, "kv"):
            return
        content = {b: list(v) for b, v in self.content.items()}
        for src, dst in self.kv.pending_copies:
            content[dst] = list(content.get(src, [None] * self.bs))
        stored, logical = set(), 0
        for g in self.live:
            for pos in range(g.prompt_computed):
                b = g.prompt_blocks[pos // self.bs]
                assert content[b][pos % self.bs] == tuple(g.prompt_ids[: pos + 1])
                stored.add((b, pos % self.bs))
            seqs = [s for s in g.seqs if not s.finished] or g.seqs[:1]
            for s in seqs:
                logical += g.prompt_computed + s.response_computed
                for r in range(s.response_computed):
                    b = s.response_blocks[r // self.bs]
                    assert content[b][r % self.bs] == tuple(g.prompt_ids + s.output_ids[: r + 1])
                    stored.add((b, r % self.bs))
        m = self.kv.metrics()
        assert m.tokens_logical == logical
        assert m.tokens_stored == len(stored)

    def teardown(self):
        if not hasattr(self, "kv"):
            return
        kv = self.kv
        for group in list(self.live):
            kv.free_group(group)
        assert kv.ref_count == [0] * kv.num_blocks
        assert not kv.live_groups
        assert len(kv.free) + len(kv.evictable) == kv.num_blocks
        assert set(kv.free) | set(kv.evictable) == set(range(kv.num_blocks))
        m = kv.metrics()
        assert m.blocks_used == 0 and m.blocks_free + m.blocks_cached == kv.num_blocks


KVMachine.TestCase.settings = settings(
    max_examples=250,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestKVManagerStateMachine = KVMachine.TestCase


# ----- unit tests -------------------------------------------------------------------------------


def test_prefix_hit_reuses_exactly_the_full_cached_blocks():
    kv = SegmentKVManager(num_blocks=16, block_size=4)
    a = make_group("a", list(range(10, 20)))  # 10 tokens: 2 full blocks + 2 tokens
    kv.admit(a)
    assert a.prompt_computed == 0
    prefill(kv, a)
    first_two = a.prompt_blocks[:2]
    kv.free_group(a)
    # the full blocks stay cached (tail first in LRU order), the partial one is freed
    assert list(kv.evictable) == first_two[::-1]

    b = make_group("b", list(range(10, 18)) + [99, 98, 97])  # shares 8 tokens = 2 blocks
    kv.admit(b)
    assert b.prompt_blocks[:2] == first_two
    assert b.prompt_computed == b.cached_prompt_tokens == 8
    assert len(b.prompt_blocks) == 3 and b.prompt_blocks[2] not in first_two
    kv.free_group(b)

    c = make_group("c", list(range(10, 16)) + [50, 51])  # shares 6 tokens: only 1 full block
    kv.admit(c)
    assert c.prompt_blocks[0] == first_two[0] and c.prompt_blocks[1] != first_two[1]
    assert c.prompt_computed == 4
    kv.free_group(c)

    # The whole prompt is cached: the last block is recomputed so one token yields logits.
    d = make_group("d", list(range(10, 18)))
    kv.admit(d)
    assert d.prompt_computed == 4 < d.prompt_len
    assert d.prompt_blocks[0] == first_two[0] and d.prompt_blocks[1] != first_two[1]
    kv.free_group(d)

    e = make_group("e", list(range(10, 14)))  # exactly one cached block: nothing reused
    kv.admit(e)
    assert e.prompt_computed == 0 and e.prompt_blocks[0] != first_two[0]
    kv.free_group(e)

    f = make_group("f", [11] + list(range(11, 20)))  # first block differs: the chain breaks
    kv.admit(f)
    assert f.prompt_computed == 0
    kv.free_group(f)
    assert kv.metrics().prefix_cache_hit_tokens == 8 + 4 + 4


def test_block_keys_are_chained_sha256_of_parent_tokens_and_extra_keys():
    # Oracle: the documented layout, spelled out with struct instead of array.
    root = hashlib.sha256(b"segserve-prefix-v1").digest()
    assert root_key() == root
    assert root_key("t1") == hashlib.sha256(b"segserve-prefix-v1\x01t1").digest()
    expect = hashlib.sha256(root + struct.pack("<3q", 5, 6, 7) + struct.pack("<I", 0)).digest()
    assert block_key(root, [5, 6, 7]) == expect
    assert block_key(root, [5, 6, 7], b"lora") != expect
    # Tokens that share a byte string under a narrower encoding stay apart.
    assert block_key(root, [1, 0]) != block_key(root, [256])
    kv = SegmentKVManager(num_blocks=8, block_size=2)
    g = make_group("g", [1, 2, 3, 4, 5])
    first = block_key(root, [1, 2])
    assert kv._block_hashes(g) == [first, block_key(first, [3, 4])]


def test_cache_salt_isolates_prefix_blocks():
    kv = SegmentKVManager(num_blocks=16, block_size=4)
    prompt = list(range(10, 19))
    a = make_group("a", prompt, cache_salt="tenant-a")
    kv.admit(a)
    prefill(kv, a)
    kv.free_group(a)
    for rid, salt, hit in [("b", None, 0), ("c", "tenant-b", 0), ("d", "tenant-a", 8)]:
        g = make_group(rid, prompt, cache_salt=salt)
        kv.admit(g)
        assert g.cached_prompt_tokens == hit, (rid, salt)
        prefill(kv, g)
        kv.free_group(g)


def test_a_key_collision_never_serves_another_prefix():
    """Forge a collision: the block cached under a key must still hold the asking prompt's
    tokens and parent, else it is a miss."""
    kv = SegmentKVManager(num_blocks=16, block_size=4)
    a = make_group("a", list(range(10, 19)))
    kv.admit(a)
    prefill(kv, a)
    kv.free_group(a)
    b = make_group("b", list(range(50, 59)))
    b.prompt_block_hashes = list(kv._block_hashes(make_group("x", list(range(10, 19)))))
    kv.admit(b)
    assert b.cached_prompt_tokens == 0
    kv.free_group(b)
    c = make_group("c", list(range(10, 19)))
    kv.admit(c)
    assert c.cached_prompt_tokens == 8


def test_no_prefix_hits_when_caching_is_off():
    kv = SegmentKVManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a = make_group("a", [1, 2, 3, 4, 5])
    kv.admit(a)
    prefill(kv, a)
    kv.free_group(a)
    assert not kv.evictable and len(kv.free) == 8
    b = make_group("b", [1, 2, 3, 4, 5])
    kv.admit(b)
    assert b.prompt_computed == 0


def test_shared_prefix_blocks_are_counted_once_per_segment():
    kv = SegmentKVManager(num_blocks=8, block_size=2)
    a = make_group("a", [1, 2, 3, 4, 5])
    kv.admit(a)
    prefill(kv, a)
    b = make_group("b", [1, 2, 3, 4, 9])
    kv.admit(b)  # a is still live: its blocks are shared, not revived
    assert b.prompt_blocks[:2] == a.prompt_blocks[:2]
    assert [kv.ref_count[x] for x in a.prompt_blocks] == [2, 2, 1]
    assert kv.metrics().blocks_used == 4
    kv.free_group(a)
    assert [kv.ref_count[x] for x in b.prompt_blocks] == [1, 1, 1]
    kv.free_group(b)
    assert kv.metrics().blocks_cached == 2 and kv.metrics().blocks_used == 0


def test_lru_eviction_evicts_least_recently_released_block_first():
    kv = SegmentKVManager(num_blocks=3, block_size=2)
    groups = {}
    for name, prompt in (("x", [1, 2]), ("y", [3, 4]), ("z", [5, 6])):
        g = make_group(name, prompt)
        kv.admit(g)
        prefill(kv, g)
        groups[name] = g
    block = {name: g.prompt_blocks[0] for name, g in groups.items()}
    for name in ("y", "x", "z"):  # release order: y first, so y is least recently used
        kv.free_group(groups[name])
    assert not kv.free and list(kv.evictable) == [block["y"], block["x"], block["z"]]

    # Reusing x's block (a prefix hit) and releasing it again makes x the most recent.
    x2 = make_group("x2", [1, 2, 9])
    assert kv.can_admit(x2)  # needs 1 hit (revived) + 1 new + 1 response block of 3
    kv.admit(x2)
    assert x2.prompt_blocks[0] == block["x"]
    assert x2.prompt_blocks[1] == block["y"]  # the new block evicted y, the LRU one
    assert kv.evictions == 1 and kv.block_hash[block["y"]] is None
    kv.free_group(x2)
    assert list(kv.evictable) == [block["z"], block["x"]]
    assert list(kv.free) == [block["y"]]

    w = make_group("w", [7, 8, 9, 10, 11])  # 3 blocks: the free one, then z, then x
    kv.admit(w)
    assert w.prompt_blocks == [block["y"], block["z"], block["x"]]
    assert kv.evictions == 3 and not kv.hash_to_block
    with pytest.raises(NoFreeBlocks):
        kv.ensure_response_capacity(w.seqs[0], 1)
    kv.free_group(w)
    assert sorted(kv.free) == [0, 1, 2] and not kv.evictable


def test_failed_admit_rolls_back():
    kv = SegmentKVManager(num_blocks=3, block_size=2)
    g = make_group("g", [1, 2, 3, 4, 5, 6, 7])  # 4 blocks > 3
    assert not kv.can_admit(g)
    with pytest.raises(NoFreeBlocks):
        kv.admit(g)
    assert g.prompt_blocks == [] and "g" not in kv.live_groups
    assert kv.ref_count == [0, 0, 0] and sorted(kv.free) == [0, 1, 2]


def test_fork_shares_blocks_and_copies_the_partial_one_on_first_write():
    kv = SegmentKVManager(num_blocks=16, block_size=4)
    g = make_group("g", [1, 2, 3])
    kv.admit(g)
    prefill(kv, g)
    parent = g.seqs[0]
    kv.ensure_response_capacity(parent, 6)
    parent.response_computed = 6  # one full block + 2 tokens
    p0, p1 = parent.response_blocks
    free_before = list(kv.free)
    child = Sequence(g)
    kv.fork(parent, child)
    g.seqs.append(child)
    assert child.response_blocks == [p0, p1] and child.response_computed == 6
    assert kv.ref_count[p0] == kv.ref_count[p1] == 2
    assert list(kv.free) == free_before and kv.pending_copies == []  # the fork took no block

    # The child writes token 7 into the shared partial block: it gets its own copy first.
    kv.ensure_response_capacity(child, 7)
    c1 = child.response_blocks[1]
    assert child.response_blocks[0] == p0 and c1 not in (p0, p1)
    assert kv.ref_count[p0] == 2 and kv.ref_count[p1] == 1 and kv.ref_count[c1] == 1
    assert kv.take_pending_copies() == [(p1, c1)]
    child.response_computed = 7

    # The parent is now the only holder of p1: it writes in place, nothing is copied.
    kv.ensure_response_capacity(parent, 7)
    assert parent.response_blocks == [p0, p1] and kv.pending_copies == []
    parent.response_computed = 7

    # At a block boundary everything is shared and the next write needs no copy.
    kv.ensure_response_capacity(parent, 8)
    parent.response_computed = 8
    child2 = Sequence(g)
    kv.fork(parent, child2)
    g.seqs.append(child2)
    assert kv.ref_count[p0] == 3 and kv.ref_count[p1] == 2
    kv.ensure_response_capacity(child2, 9)
    assert child2.response_blocks[:2] == [p0, p1] and len(child2.response_blocks) == 3
    assert kv.pending_copies == []

    # A block reserved ahead of the write and then shared is replaced without a copy.
    kv.ensure_response_capacity(parent, 12)  # p2 reserved, nothing computed in it yet
    p2 = parent.response_blocks[2]
    child3 = Sequence(g)
    kv.fork(parent, child3)
    kv.ensure_response_capacity(child3, 9)
    assert child3.response_blocks[:2] == [p0, p1] and child3.response_blocks[2] != p2
    assert kv.pending_copies == [] and kv.ref_count[p2] == 1
    g.seqs.append(child3)

    # Freeing the parent leaves the shared blocks with the children.
    kv.free_seq(parent)
    assert kv.ref_count[p0] == 3 and kv.ref_count[p1] == 2 and kv.ref_count[p2] == 0
    kv.free_group(g)
    assert kv.metrics().blocks_used == 0


def test_fork_right_after_the_prompt_shares_nothing_but_the_prompt():
    kv = SegmentKVManager(num_blocks=8, block_size=4)
    g = make_group("g", [1, 2, 3, 4, 5], n=3)
    kv.admit(g)
    prefill(kv, g)
    for _ in range(2):
        child = Sequence(g)
        kv.fork(g.seqs[0], child)
        g.seqs.append(child)
        assert child.response_blocks == [] and child.response_computed == 0
    assert kv.pending_copies == [] and kv.metrics().blocks_used == 2
    for s in g.seqs:
        kv.ensure_response_capacity(s, 1)
    assert len({s.response_blocks[0] for s in g.seqs}) == 3
    assert kv.metrics().blocks_used == 5


def test_eviction_takes_a_cached_prefix_from_its_tail():
    """Under pressure the last block of a cached prefix goes first, so the rest stays a usable
    prefix for the next request with the same start."""
    kv = SegmentKVManager(num_blocks=5, block_size=4)
    a = make_group("a", list(range(100, 112)))  # 3 full blocks, all cached once freed
    kv.admit(a)
    prefill(kv, a)
    blocks = list(a.prompt_blocks)
    kv.free_group(a)
    assert list(kv.evictable) == blocks[::-1]
    b = make_group("b", [7] * 8)  # takes the 2 free blocks
    kv.admit(b)
    c = make_group("c", [8] * 4)  # must evict a cached block: the prefix's tail
    kv.admit(c)
    assert c.prompt_blocks == [blocks[2]] and list(kv.evictable) == blocks[1::-1]
    kv.free_group(b)
    d = make_group("d", list(range(100, 108)) + [1])  # same first 2 blocks
    assert kv.can_admit(d)
    kv.admit(d)
    assert d.prompt_blocks[:2] == blocks[:2] and d.cached_prompt_tokens == 8
