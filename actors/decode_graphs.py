"""Decode steps on persistent device buffers, replayed as CUDA graphs.

A decode step (one new token per sequence) has the same shape every time but for the batch size,
so its whole forward pass (embedding, every layer, final norm, LM head) is captured once per
batch-size bucket and replayed: one launch per step instead of hundreds, and no host work on the
GPU's critical path. The step's metadata lives in fixed device buffers that the graphs read;
each step copies the host mirrors over in a handful of small asynchronous copies. Rows of a block
table are rewritten on the host only when that row's blocks changed (a new sequence in the row, or
a new block every ``block_size`` tokens), so preparing a step costs O(batch), not O(context).

Rows past the real batch, up to the bucket, are padding: no KV write (slot -1), empty segments.
Attention backends that run under a graph read only device tensors in decode (``graphable``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from segserve.kernels import AttentionMetadata

logger = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

Forward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


def buckets_for(max_batch: int) -> list[int]:
    """The capture sizes: powers of two up to the first one that holds ``max_batch``."""
    out = [b for b in BUCKETS if b < max_batch]
    out.append(next((b for b in BUCKETS if b >= max_batch), max_batch))
    return out


class DecodeInputs:
    """Fixed device buffers for one decode step of up to ``max_rows`` sequences, with pinned host
    mirrors that are updated incrementally."""

    def __init__(self, max_rows: int, table_width: int, block_size: int,
                 device: torch.device) -> None:
        self.max_rows, self.block_size = max_rows, block_size
        # Two host mirrors, used in turn: with a step in flight (the engine's lookahead), the
        # copy from one mirror may still be queued while the next step is written to the other.
        self._mirrors = [_HostMirror(max_rows, table_width, device.type == "cuda")
                         for _ in range(2)]
        self.host = self._mirrors[0]
        # copy=True: on the CPU .to() would alias the mirror, and the mirrors' row caches
        # would no longer describe what they hold.
        self.d_long = self.host.long.to(device, copy=True)
        self.d_int = self.host.int.to(device, copy=True)
        self.d_ptab = self.host.ptab.to(device, copy=True)
        self.d_rtab = self.host.rtab.to(device, copy=True)
        self.cu_seqlens = torch.arange(max_rows + 1, dtype=torch.int32, device=device)
        for mirror in self._mirrors:
            mirror.set_padding(0, max_rows)

    def metadata(self, rows: int) -> AttentionMetadata:
        """Views of the device buffers for a step of ``rows`` rows (what a graph captures)."""
        meta = AttentionMetadata(
            cu_seqlens_q=self.cu_seqlens[: rows + 1],
            slot_mapping=self.d_long[2, :rows],
            prompt_block_tables=self.d_ptab[:rows],
            prompt_lens=self.d_int[0, :rows],
            response_block_tables=self.d_rtab[:rows],
            response_lens=self.d_int[1, :rows],
            max_q_len=1,
            # Never read in a graphable decode; present so the dataclass is whole.
            cu_seqlens_q_host=list(range(rows + 1)),
            prompt_lens_host=[0] * rows,
            response_lens_host=[0] * rows,
        )
        meta.prompt_group_start = self.d_int[2, :rows]
        return meta

    def ids_and_positions(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.d_long[0, :rows], self.d_long[1, :rows]

    def fill(self, batch: list, rows: int,
             token_source: tuple[torch.Tensor, list[int]] | None = None) -> None:
        """Write the step of ``batch`` (ScheduledSeq, one new token each) into rows ``[0, rows)``
        and start the copies to the device. With ``token_source = (tokens, src_rows)`` row r's
        input id is ``tokens[src_rows[r]]``, a device tensor the last step sampled and the host
        has not seen yet (the engine's lookahead)."""
        self.fill_host(batch, rows, token_source is not None)
        self.upload(rows, len(batch), token_source)

    def fill_host(self, batch: list, rows: int, ids_on_device: bool = False) -> None:
        """The host half of :meth:`fill`: the next mirror holds the step."""
        bs = self.block_size
        self.host = host = self._mirrors[1] if self.host is self._mirrors[0] else self._mirrors[0]
        ids, pos, slots, plens, rlens, starts = [], [], [], [], [], []
        first_row: dict[int, int] = {}
        for r, item in enumerate(batch):
            seq = item.seq
            group = seq.group
            p = seq.num_computed  # the new token's position
            plen = group.prompt_len
            if ids_on_device:
                ids.append(0)
            else:
                ids.append(seq.output_ids[p - plen] if p >= plen else group.prompt_ids[p])
            pos.append(p)
            if p < plen:  # the last prompt token (a request whose whole prompt was cached)
                slots.append(group.prompt_blocks[p // bs] * bs + p % bs)
                plens.append(p + 1)
                rlens.append(0)
            else:
                q = p - plen
                slots.append(seq.response_blocks[q // bs] * bs + q % bs)
                plens.append(plen)
                rlens.append(q + 1)
            starts.append(first_row.setdefault(id(group), r))
            host.write_tables(r, group.prompt_blocks, seq.response_blocks)
        n = len(batch)
        host.long[:, :n] = torch.tensor([ids, pos, slots], dtype=torch.int64)
        host.int[:, :n] = torch.tensor([plens, rlens, starts], dtype=torch.int32)
        host.set_padding(n, rows)

    def snapshot(self, rows: int) -> tuple[torch.Tensor, ...]:
        """The current mirror's first ``rows`` rows: what another rank loads to run the step."""
        h = self.host
        return (h.long[:, :rows].clone(), h.int[:, :rows].clone(), h.ptab[:rows].clone(),
                h.rtab[:rows].clone())

    def load(self, snap: tuple[torch.Tensor, ...]) -> None:
        """Make ``snap`` (from :meth:`snapshot` on rank 0) the current mirror's content."""
        self.host = host = self._mirrors[1] if self.host is self._mirrors[0] else self._mirrors[0]
        long, int_, ptab, rtab = snap
        rows = long.shape[1]
        host.long[:, :rows], host.int[:, :rows] = long, int_
        host.ptab[:rows], host.rtab[:rows] = ptab, rtab
        host.set_padding(rows, self.max_rows)
        host._rows[:rows] = [None] * rows  # the row cache no longer describes these rows

    def upload(self, rows: int, n: int,
               token_source: tuple[torch.Tensor, list[int]] | None = None) -> None:
        """Start the copies of the current mirror to the device buffers (and of the lookahead's
        input ids, from ``token_source``, as in :meth:`fill`)."""
        host = self.host
        self.d_long.copy_(host.long, non_blocking=True)
        self.d_int.copy_(host.int, non_blocking=True)
        self.d_ptab[:rows].copy_(host.ptab[:rows], non_blocking=True)
        self.d_rtab[:rows].copy_(host.rtab[:rows], non_blocking=True)
        if token_source is not None:
            tokens, src = token_source
            if src != list(range(n)):
                tokens = tokens[torch.tensor(src, device=tokens.device)]
            self.d_long[0, :n].copy_(tokens[:n])


class _HostMirror:
    """Pinned host copies of the step buffers; table rows rewritten only when they change."""

    def __init__(self, max_rows: int, table_width: int, pin: bool) -> None:
        # ids, positions, slots (int64); prompt len, response len, prompt group start (int32)
        self.long = torch.zeros(3, max_rows, dtype=torch.int64, pin_memory=pin)
        self.int = torch.zeros(3, max_rows, dtype=torch.int32, pin_memory=pin)
        self.ptab = torch.zeros(max_rows, table_width, dtype=torch.int32, pin_memory=pin)
        self.rtab = torch.zeros(max_rows, table_width, dtype=torch.int32, pin_memory=pin)
        self._rows: list[tuple[list[int], list[int]] | None] = [None] * max_rows

    def set_padding(self, start: int, end: int) -> None:
        """Rows ``[start, end)`` do nothing: no KV write, empty segments, own prompt group."""
        self.long[:, start:end] = 0
        self.long[2, start:end] = -1
        self.int[:2, start:end] = 0
        self.int[2, start:end] = torch.arange(start, end, dtype=torch.int32)

    def write_tables(self, row: int, prompt: list[int], response: list[int]) -> None:
        held_prompt, held_response = self._rows[row] or (None, None)
        if held_prompt != prompt:
            self.ptab[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.int32)
            held_prompt = list(prompt)
        if held_response != response:
            if response:
                self.rtab[row, : len(response)] = torch.tensor(response, dtype=torch.int32)
            held_response = list(response)
        self._rows[row] = (held_prompt, held_response)


class DecodeGraphs:
    """One CUDA graph per batch-size bucket over :class:`DecodeInputs`; ``run`` replays the
    smallest bucket that holds the batch and returns its logits rows. With ``use_graphs`` False
    (no CUDA, or turned off) the same buffers feed an eager forward."""

    def __init__(self, forward: Forward, max_batch: int, table_width: int, block_size: int,
                 device: torch.device, use_graphs: bool = True) -> None:
        self.forward = forward
        self.use_graphs = use_graphs
        self.buckets = buckets_for(max_batch)
        self.inputs = DecodeInputs(self.buckets[-1], table_width, block_size, device)
        self.device = device
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def _step(self, rows: int) -> torch.Tensor:
        ids, pos = self.inputs.ids_and_positions(rows)
        return self.forward(ids, pos, self.inputs.metadata(rows))

    def capture(self) -> None:
        """Capture every bucket, largest first, so the smaller ones reuse its memory pool. Each
        is run once eagerly first (JIT-compiles the kernels at that shape outside capture)."""
        host = self.inputs.host
        host.set_padding(0, self.inputs.max_rows)
        self.inputs.d_long.copy_(host.long)
        self.inputs.d_int.copy_(host.int)
        pool = None
        for rows in sorted(self.buckets, reverse=True):
            self._step(rows)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA calls of other threads (NCCL's watchdog querying the events of
            # the eager warm-up's collectives) must not invalidate this thread's capture.
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                out = self._step(rows)
            pool = graph.pool()
            self.graphs[rows], self.outputs[rows] = graph, out
        torch.cuda.synchronize(self.device)
        logger.info("captured decode CUDA graphs for batch sizes %s", sorted(self.graphs))

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def run(self, batch: list,
            token_source: tuple[torch.Tensor, list[int]] | None = None) -> torch.Tensor:
        rows = self.bucket(len(batch))
        self.inputs.fill(batch, rows, token_source)
        return self.replay(rows, len(batch))

    def replay(self, rows: int, n: int) -> torch.Tensor:
        """The logits of the step the buffers hold (``n`` real rows of bucket ``rows``)."""
        if not self.use_graphs:
            return self._step(rows)[:n]
        self.graphs[rows].replay()
        return self.outputs[rows][:n]
