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
        pin = device.type == "cuda"
        # ids, positions, slots (int64); prompt len, response len, prompt group start (int32)
        self.h_long = torch.zeros(3, max_rows, dtype=torch.int64, pin_memory=pin)
        self.h_int = torch.zeros(3, max_rows, dtype=torch.int32, pin_memory=pin)
        self.h_ptab = torch.zeros(max_rows, table_width, dtype=torch.int32, pin_memory=pin)
        self.h_rtab = torch.zeros(max_rows, table_width, dtype=torch.int32, pin_memory=pin)
        self.d_long = self.h_long.to(device)
        self.d_int = self.h_int.to(device)
        self.d_ptab = self.h_ptab.to(device)
        self.d_rtab = self.h_rtab.to(device)
        self.cu_seqlens = torch.arange(max_rows + 1, dtype=torch.int32, device=device)
        # What each host table row holds now, to skip rewriting unchanged rows.
        self._prompt_rows: list[list[int] | None] = [None] * max_rows
        self._response_rows: list[list[int] | None] = [None] * max_rows
        self.set_padding(0, max_rows)

    def set_padding(self, start: int, end: int) -> None:
        """Rows ``[start, end)`` do nothing: no KV write, empty segments, own prompt group."""
        self.h_long[:, start:end] = 0
        self.h_long[2, start:end] = -1
        self.h_int[:2, start:end] = 0
        self.h_int[2, start:end] = torch.arange(start, end, dtype=torch.int32)

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

    def fill(self, batch: list, rows: int) -> None:
        """Write the step of ``batch`` (ScheduledSeq, one new token each) into rows ``[0, rows)``
        and start the copies to the device."""
        bs = self.block_size
        ids, pos, slots, plens, rlens, starts = [], [], [], [], [], []
        first_row: dict[int, int] = {}
        for r, item in enumerate(batch):
            seq = item.seq
            group = seq.group
            p = seq.num_computed  # the new token's position
            plen = group.prompt_len
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
            if self._prompt_rows[r] != group.prompt_blocks:
                self._prompt_rows[r] = list(group.prompt_blocks)
                self._write_row(self.h_ptab, r, group.prompt_blocks)
            if self._response_rows[r] != seq.response_blocks:
                self._response_rows[r] = list(seq.response_blocks)
                self._write_row(self.h_rtab, r, seq.response_blocks)
        n = len(batch)
        self.h_long[:, :n] = torch.tensor([ids, pos, slots], dtype=torch.int64)
        self.h_int[:, :n] = torch.tensor([plens, rlens, starts], dtype=torch.int32)
        self.set_padding(n, rows)
        self.d_long.copy_(self.h_long, non_blocking=True)
        self.d_int.copy_(self.h_int, non_blocking=True)
        self.d_ptab[:rows].copy_(self.h_ptab[:rows], non_blocking=True)
        self.d_rtab[:rows].copy_(self.h_rtab[:rows], non_blocking=True)

    @staticmethod
    def _write_row(table: torch.Tensor, row: int, blocks: list[int]) -> None:
        if blocks:
            table[row, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)


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
        self.inputs.set_padding(0, self.inputs.max_rows)
        self.inputs.d_long.copy_(self.inputs.h_long)
        self.inputs.d_int.copy_(self.inputs.h_int)
        pool = None
        for rows in sorted(self.buckets, reverse=True):
            self._step(rows)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._step(rows)
            pool = graph.pool()
            self.graphs[rows], self.outputs[rows] = graph, out
        torch.cuda.synchronize(self.device)
        logger.info("captured decode CUDA graphs for batch sizes %s", sorted(self.graphs))

    def run(self, batch: list) -> torch.Tensor:
        rows = next(b for b in self.buckets if b >= len(batch))
        self.inputs.fill(batch, rows)
        if not self.use_graphs:
            return self._step(rows)[: len(batch)]
        self.graphs[rows].replay()
        return self.outputs[rows][: len(batch)]
