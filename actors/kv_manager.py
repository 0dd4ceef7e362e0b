"""SegmentKVManager: the block pool and the two kinds of segment that live in it.

* A **prompt segment** belongs to a request (SequenceGroup). All its sequences read it; it is
  written once, during prefill, and never reordered or copied. Its full blocks are keyed by a
  sha256 chained over the prefix (and seeded with the request's ``cache_salt``), so a later
  request with the same prefix and salt takes the same blocks. A hit is also checked against
  the block's stored parent key and tokens, so even a hash collision cannot serve wrong KV.
  A block nobody references but that holds a hashed prefix stays *cached* and is evicted
  least-recently-used when the pool runs dry.
* A **response segment** is private to one sequence and grows a block at a time. A fork (beam
  search) shares the parent's response blocks; the partial last one is copied on first write.

A block's reference count is the number of segments that contain it. The manager never touches
KV tensors: copies it needs (the partial block of a fork) are queued for the model runner.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence as TokenIds
from dataclasses import dataclass

from .sequence import Sequence, SequenceGroup

# Bumped whenever the key derivation changes, so keys of two layouts can never meet.
_KEY_DOMAIN = b"segserve-prefix-v1"


def root_key(cache_salt: str | None = None) -> bytes:
    """The parent key of a prompt's first block. A salt gives its holder a cache of its own:
    no other salt (or none) can reach its blocks, nor time them to learn a prompt."""
    salt = b"" if cache_salt is None else b"\x01" + cache_salt.encode()
    return hashlib.sha256(_KEY_DOMAIN + salt).digest()


def block_key(parent: bytes, token_ids: TokenIds[int], extra_keys: bytes = b"") -> bytes:
    """sha256 over (parent key, the block's token ids, extra keys such as a LoRA id or
    multimodal input hashes). Not Python's hash(): that is 64 bits, not collision resistant,
    and shared by every tenant (CVE-2025-25183 in vLLM)."""
    h = hashlib.sha256(parent)
    h.update(array("q", token_ids).tobytes())
    h.update(len(extra_keys).to_bytes(4, "little") + extra_keys)
    return h.digest()


class NoFreeBlocks(RuntimeError):
    """The pool has no free or evictable block; the scheduler answers by preempting."""


@dataclass
class KVMetrics:
    blocks_total: int
    blocks_used: int
    blocks_free: int
    blocks_cached: int
    utilization: float
    tokens_stored: int
    tokens_logical: int
    tokens_saved_by_sharing: int
    prefix_cache_hit_tokens: int
    preemptions: int
    evictions: int
    waiting_seqs: int = 0
    running_seqs: int = 0
    # Bytes (K and V of every layer, int8 scales included): what one token costs, the pool's
    # capacity, the blocks in use, and the tokens physically stored.
    bytes_per_token: int = 0
    capacity_bytes: int = 0
    used_bytes: int = 0
    stored_bytes: int = 0

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


class SegmentKVManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        bytes_per_token: int = 0,
    ):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.bytes_per_token = bytes_per_token  # the model runner's; 0 when unknown
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))
        # hash -> block for full prompt blocks; insertion order of the ref-0 ones is the LRU.
        self.hash_to_block: dict[bytes, int] = {}
        self.block_hash: list[bytes | None] = [None] * num_blocks
        # What a cached block's key was derived from, compared on every hit.
        self.block_origin: list[tuple[bytes, tuple[int, ...]] | None] = [None] * num_blocks
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.pending_copies: list[tuple[int, int]] = []
        self.live_groups: dict[str, SequenceGroup] = {}
        self.prefix_cache_hit_tokens = 0
        self.preemptions = 0
        self.evictions = 0

    # ----- the pool -------------------------------------------------------------------------
    def num_available(self) -> int:
        return len(self.free) + len(self.evictable)

    def _allocate(self) -> int:
        if self.free:
            block = self.free.popleft()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.hash_to_block[self.block_hash[block]]
            self.block_hash[block] = None
            self.block_origin[block] = None
            self.evictions += 1
        else:
            raise NoFreeBlocks("KV cache pool exhausted")
        assert self.ref_count[block] == 0
        self.ref_count[block] = 1
        return block

    def _incref(self, block: int) -> None:
        if self.ref_count[block] == 0:
            self.evictable.pop(block)  # a cached block comes back into use
        self.ref_count[block] += 1

    def _decref(self, block: int) -> None:
        assert self.ref_count[block] > 0, f"double free of block {block}"
        self.ref_count[block] -= 1
        if self.ref_count[block] == 0:
            if self.block_hash[block] is not None:
                self.evictable[block] = None
            else:
                self.free.append(block)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ----- prompt segments ------------------------------------------------------------------
    def _block_hashes(self, group: SequenceGroup) -> list[bytes]:
        """Chained keys of the prompt's full blocks, computed once per request: the prompt
        never changes, and admission and every prefill chunk need them."""
        if group.prompt_block_hashes is None:
            parent = root_key(group.params.cache_salt)
            hashes, ids, bs = [], group.prompt_ids, self.block_size
            for i in range(len(ids) // bs):
                parent = block_key(parent, ids[i * bs : (i + 1) * bs])
                hashes.append(parent)
            group.prompt_block_hashes = hashes
        return group.prompt_block_hashes

    def _parent_key(self, group: SequenceGroup, index: int) -> bytes:
        return self._block_hashes(group)[index - 1] if index else root_key(group.params.cache_salt)

    def _prefix_hits(self, group: SequenceGroup) -> list[int]:
        if not self.enable_prefix_caching:
            return []
        if (group.params.prompt_logprobs is not None
                and len(group.prompt_logprobs) < group.prompt_len - 1):
            return []  # cached tokens have no hidden states to score: compute the whole prompt
        hits, ids, bs = [], group.prompt_ids, self.block_size
        for i, h in enumerate(self._block_hashes(group)):
            block = self.hash_to_block.get(h)
            # The key alone is not trusted: a block serves only the exact parent and tokens
            # it was computed for.
            if block is None or self.block_origin[block] != (
                self._parent_key(group, i), tuple(ids[i * bs : (i + 1) * bs])
            ):
                break
            hits.append(block)
        # Keep at least one prompt token to compute: its logits give the first output token.
        if hits and len(hits) * self.block_size >= group.prompt_len:
            hits.pop()
        return hits

    def can_admit(self, group: SequenceGroup) -> bool:
        """Room for the whole prompt segment plus one response block per sequence."""
        hits = self._prefix_hits(group)
        revived = sum(1 for b in hits if self.ref_count[b] == 0)
        need = self.blocks_for(group.prompt_len) - len(hits) + group.params.num_sequences
        return self.num_available() - revived >= need

    def admit(self, group: SequenceGroup) -> None:
        """Give the group its prompt segment, reusing cached prefix blocks."""
        assert not group.prompt_blocks
        hits = self._prefix_hits(group)
        for b in hits:
            self._incref(b)
        blocks = list(hits)
        try:
            for _ in range(self.blocks_for(group.prompt_len) - len(hits)):
                blocks.append(self._allocate())
        except NoFreeBlocks:
            for b in blocks:
                self._decref(b)
            raise
        group.prompt_blocks = blocks
        group.prompt_computed = len(hits) * self.block_size
        group.cached_prompt_tokens = group.prompt_computed
        self.prefix_cache_hit_tokens += group.prompt_computed
        self.live_groups[group.request_id] = group

    def commit_prompt(self, group: SequenceGroup) -> None:
        """Publish the group's newly computed full prompt blocks to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs, full = self.block_size, group.prompt_computed // self.block_size
        for i, h in enumerate(self._block_hashes(group)[:full]):
            block = group.prompt_blocks[i]
            if self.block_hash[block] is None and h not in self.hash_to_block:
                self.block_hash[block] = h
                self.hash_to_block[h] = block
                self.block_origin[block] = (
                    self._parent_key(group, i),
                    tuple(group.prompt_ids[i * bs : (i + 1) * bs]),
                )

    # ----- response segments ----------------------------------------------------------------
    def ensure_response_capacity(self, seq: Sequence, num_response_tokens: int) -> None:
        """Make the response segment writable up to ``num_response_tokens``: copy a shared
        partial block before the first write into it (copy-on-write after a fork), then grow.
        Raises NoFreeBlocks if the pool is dry; what was done stays done and counts next try."""
        computed = seq.response_computed
        first_written = computed // self.block_size
        last_written = -(-num_response_tokens // self.block_size)
        for i in range(first_written, min(last_written, len(seq.response_blocks))):
            shared = seq.response_blocks[i]
            if self.ref_count[shared] > 1:
                block = self._allocate()
                if i * self.block_size < computed:  # holds tokens of the shared history
                    self.pending_copies.append((shared, block))
                self._decref(shared)
                seq.response_blocks[i] = block
        while len(seq.response_blocks) * self.block_size < num_response_tokens:
            seq.response_blocks.append(self._allocate())

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Give ``child`` the parent's response KV by sharing every block. The partial last
        block is copied only when one of them first writes into it (ensure_response_capacity),
        so a fork itself never needs a free block."""
        assert not child.response_blocks
        for b in parent.response_blocks:
            self._incref(b)
        child.response_blocks = list(parent.response_blocks)
        child.response_computed = parent.response_computed

    def free_seq(self, seq: Sequence) -> None:
        for b in seq.response_blocks:
            self._decref(b)
        seq.response_blocks = []
        seq.response_computed = 0

    def free_group(self, group: SequenceGroup) -> None:
        """Release every block of the group (finish, abort or preemption)."""
        for seq in group.seqs:
            self.free_seq(seq)
        # Tail first: the LRU then evicts a cached prefix from its end, and what stays cached
        # is still reachable from the prompt's start.
        for b in reversed(group.prompt_blocks):
            self._decref(b)
        group.prompt_blocks = []
        group.prompt_computed = 0
        self.live_groups.pop(group.request_id, None)

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def requeue_copies(self, copies: list[tuple[int, int]]) -> None:
        """Copies a failed step may not have made, for its retry; those into a block freed
        since (its request ended) are dropped, or they could overwrite the block's next owner."""
        self.pending_copies[:0] = [(src, dst) for src, dst in copies if self.ref_count[dst] > 0]

    # ----- metrics --------------------------------------------------------------------------
    def metrics(self) -> KVMetrics:
        used = self.num_blocks - len(self.free) - len(self.evictable)
        # Tokens the live sequences see, against tokens physically stored (each block once).
        logical, fill = 0, {}
        for group in self.live_groups.values():
            seqs = [s for s in group.seqs if not s.finished] or group.seqs[:1]
            plen = min(group.prompt_computed, group.prompt_len)
            for i, b in enumerate(group.prompt_blocks):
                fill[b] = max(fill.get(b, 0), min(self.block_size, plen - i * self.block_size))
            for seq in seqs:
                logical += plen + seq.response_computed
                for i, b in enumerate(seq.response_blocks):
                    n = min(self.block_size, seq.response_computed - i * self.block_size)
                    fill[b] = max(fill.get(b, 0), n)
        stored = sum(max(n, 0) for n in fill.values())
        return KVMetrics(
            blocks_total=self.num_blocks,
            blocks_used=used,
            blocks_free=len(self.free),
            blocks_cached=len(self.evictable),
            utilization=used / self.num_blocks,
            tokens_stored=stored,
            tokens_logical=logical,
            tokens_saved_by_sharing=logical - stored,
            prefix_cache_hit_tokens=self.prefix_cache_hit_tokens,
            preemptions=self.preemptions,
            evictions=self.evictions,
            bytes_per_token=self.bytes_per_token,
            capacity_bytes=self.num_blocks * self.block_size * self.bytes_per_token,
            used_bytes=used * self.block_size * self.bytes_per_token,
            stored_bytes=stored * self.bytes_per_token,
        )
