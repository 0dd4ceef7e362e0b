"""ModelRunner: one rank's model, KV pool and step execution.

It turns the scheduler's plan (which sequences, how many new tokens each) into packed tensors,
runs the model, and returns float32 logits for the sequences that sample this step. It knows the
block tables but not how they were chosen: that is the KV manager's job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from segserve.kernels import AttentionMetadata, LayerKV, get_backend, kv_storage_dtype
from segserve.kernels.quant import kv_bytes_per_token_head
from segserve.models import load_model, load_spec, resolve_dtype
from segserve.models.spec import ModelSpec

from .config import EngineConfig
from .cpu_placement import configure_cpu
from .decode_graphs import DecodeGraphs
from .sequence import Sequence, SequenceGroup

logger = logging.getLogger(__name__)


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # new tokens computed this step, starting at seq.num_computed
    # The engine's lookahead: this step's input is the token the previous step sampled, which
    # is still on the device (not yet in seq.output_ids).
    lookahead: bool = False

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the sequence, so its logits are needed."""
        return self.lookahead or self.seq.num_computed + self.num_tokens == self.seq.num_tokens


@dataclass
class PromptScores:
    """Prompt log-probs computed in one prefill chunk: for the prompt positions
    ``first .. first + len(logprobs) - 1``, the log-prob of the prompt token that follows
    each, and the ``params.prompt_logprobs`` best ``(id, logprob)`` there."""

    group: SequenceGroup
    first: int
    logprobs: list[float]
    top: list[list[tuple[int, float]]]


# Prompt log-probs: rows of full-vocab logits computed at once (bounds the memory they take).
PROMPT_LOGPROB_ROWS = 256


def _pad(rows: list[list[int]]) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0) or 1
    return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32)


def _slots(blocks: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Flat cache slots of segment positions ``[start, end)``: a python loop for a few tokens,
    tensor arithmetic for a prompt chunk."""
    if end - start <= 32:
        return [blocks[p // block_size] * block_size + p % block_size for p in range(start, end)]
    pos = torch.arange(start, end)
    table = torch.tensor(blocks[: (end - 1) // block_size + 1])
    return (table[pos // block_size] * block_size + pos % block_size).tolist()


class ModelRunner:
    def __init__(
        self, config: EngineConfig, model_path, tp_rank: int = 0, tp_size: int = 1, all_reduce=None
    ) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = resolve_dtype(config.dtype)
        self.spec: ModelSpec = load_spec(model_path)
        self.max_model_len = config.max_model_len or self.spec.max_position_embeddings
        if (
            self.spec.rope_type == "dynamic"
            and self.max_model_len > self.spec.max_position_embeddings
        ):
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds max_position_embeddings "
                f"{self.spec.max_position_embeddings}, past which dynamic RoPE would re-rotate "
                f"cached keys"
            )
        self.cpu_placement = configure_cpu(config.cpu_threads) if self.device.type == "cpu" else ""
        self.kv_dtype = kv_storage_dtype(config.kv_dtype, self.dtype)
        self.backend = self._pick_backend(config)
        self.model = load_model(
            model_path,
            self.spec,
            self.backend,
            self.dtype,
            self.device,
            tp_rank,
            tp_size,
            all_reduce,
            max_positions=self.max_model_len,
        )
        self.block_size = config.block_size
        self.num_kv_heads = self.spec.num_kv_heads // tp_size
        self.num_blocks = config.num_kv_blocks or self._blocks_from_memory()
        shape = (
            self.spec.num_layers,
            self.num_blocks,
            self.block_size,
            self.num_kv_heads,
            self.spec.head_dim,
        )
        # empty, not zeros: slots are always written before they are read, and untouched pages
        # of a large CPU pool then cost no memory.
        self.k_cache = torch.empty(shape, dtype=self.kv_dtype, device=self.device)
        self.v_cache = torch.empty(shape, dtype=self.kv_dtype, device=self.device)
        # int8 pools keep one float32 scale per (token, head) beside the blocks.
        self.k_scale = self.v_scale = None
        if self.kv_dtype == torch.int8:
            self.k_scale = torch.empty(shape[:-1], dtype=torch.float32, device=self.device)
            self.v_scale = torch.empty(shape[:-1], dtype=torch.float32, device=self.device)
        self.kv_caches = [
            LayerKV(
                self.k_cache[i],
                self.v_cache[i],
                None if self.k_scale is None else self.k_scale[i],
                None if self.v_scale is None else self.v_scale[i],
            )
            for i in range(self.spec.num_layers)
        ]
        logger.info(
            "KV pool: %d blocks x %d tokens, kv_dtype %s (%.1f MiB)",
            self.num_blocks,
            self.block_size,
            config.kv_dtype,
            self.num_blocks * self.block_bytes() / 2**20,
        )

        self.decode: DecodeGraphs | None = None
        if getattr(self.backend, "graphable", False):
            use_graphs = self.device.type == "cuda" and config.cuda_graphs
            self.decode = DecodeGraphs(
                self._forward_logits, config.max_num_seqs,
                -(-self.max_model_len // self.block_size), self.block_size, self.device,
                use_graphs=use_graphs,
            )
            if use_graphs:
                self.decode.capture()

    def _pick_backend(self, config: EngineConfig):
        """The configured backend, or the device's default. A default that cannot run this
        model's shapes falls back to ``reference`` with one warning; an explicit choice that
        cannot fails here, at start, never mid-serving."""
        backend = get_backend(config.kernel_backend, self.device.type)
        check = getattr(backend, "check_supported", None)
        spec = self.spec
        try:
            if self.kv_dtype == torch.int8 and not backend.int8_kv:
                raise ValueError("no int8 KV cache (kv_dtype=int8); use kv_dtype 'auto' or the "
                                 "'cpu'/'reference' backend")
            if check is not None:
                check(spec.head_dim, spec.num_heads, spec.num_kv_heads, self.dtype,
                      config.block_size, kv_dtype=self.kv_dtype)
        except ValueError as e:
            if config.kernel_backend is not None:
                raise ValueError(f"kernel backend {backend.name!r}: {e}") from None
            logger.warning("kernel backend %r cannot run this model (%s); using 'reference'",
                           backend.name, e)
            return get_backend("reference", self.device.type)
        return backend

    def _forward_logits(
        self, ids: torch.Tensor, pos: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Logits of every row of a decode step (each row samples)."""
        return self.model.compute_logits(self.model(ids, pos, self.kv_caches, meta))

    def kv_bytes_per_token(self) -> int:
        """KV bytes one token costs in every layer: K and V, with their scales for int8."""
        per_head = kv_bytes_per_token_head(self.spec.head_dim, self.kv_dtype)
        return 2 * self.spec.num_layers * self.num_kv_heads * per_head

    def block_bytes(self) -> int:
        return self.block_size * self.kv_bytes_per_token()

    def _blocks_from_memory(self) -> int:
        if self.device.type == "cpu":
            budget = self.config.kv_cache_memory_gb * 2**30
        else:
            free, total = (
                torch.cuda.mem_get_info(self.device)
                if self.device.type == "cuda"
                else (torch.xpu.mem_get_info(self.device))
            )
            used_elsewhere = total - free
            budget = total * self.config.gpu_memory_utilization - used_elsewhere
        blocks = int(budget // self.block_bytes())
        if blocks < 1:
            raise ValueError(
                "no memory left for the KV cache; lower the model size or raise the memory budget"
            )
        return blocks

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        if self.k_scale is None:
            self.backend.copy_blocks(self.k_cache, self.v_cache, src, dst)
        else:
            self.backend.copy_blocks(
                self.k_cache, self.v_cache, src, dst, self.k_scale, self.v_scale
            )

    def prepare(
        self, batch: list[ScheduledSeq]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        bs = self.block_size
        input_ids, positions, slots, cu = [], [], [], [0]
        prompt_tables, response_tables, plens, rlens, sample_idx = [], [], [], [], []
        for item in batch:
            seq, group = item.seq, item.seq.group
            start, end = seq.num_computed, seq.num_computed + item.num_tokens
            plen = group.prompt_len
            input_ids += seq.tokens(start, end)
            positions += range(start, end)
            slots += _slots(group.prompt_blocks, start, min(end, plen), bs)
            slots += _slots(seq.response_blocks, max(start - plen, 0), max(end - plen, 0), bs)
            cu.append(cu[-1] + item.num_tokens)
            prompt_tables.append(group.prompt_blocks)
            response_tables.append(seq.response_blocks)
            plens.append(min(end, plen))
            rlens.append(max(end - plen, 0))
            if item.samples:
                sample_idx.append(cu[-1] - 1)
        dev = self.device
        meta = AttentionMetadata(
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            prompt_block_tables=_pad(prompt_tables).to(dev),
            prompt_lens=torch.tensor(plens, dtype=torch.int32, device=dev),
            response_block_tables=_pad(response_tables).to(dev),
            response_lens=torch.tensor(rlens, dtype=torch.int32, device=dev),
            max_q_len=max(item.num_tokens for item in batch),
            cu_seqlens_q_host=cu,
            prompt_lens_host=plens,
            response_lens_host=rlens,
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        return ids, pos, meta, sample_idx

    def is_decode_step(self, batch: list[ScheduledSeq]) -> bool:
        """Whether ``batch`` runs on the fixed decode buffers (a graph replay on CUDA): every
        sequence computes one token and samples."""
        return (
            self.decode is not None
            and len(batch) <= self.decode.max_batch
            and all(item.num_tokens == 1 and item.samples for item in batch)
        )

    @torch.inference_mode()
    def execute(
        self,
        batch: list[ScheduledSeq],
        copies: list[tuple[int, int]],
        token_source: tuple[torch.Tensor, list[int]] | None = None,
        prompt_scores: list[PromptScores] | None = None,
    ) -> torch.Tensor:
        """Run one step; returns logits ``[num_sampling_seqs, vocab]`` (float32, on the device:
        the sampler runs there). ``token_source`` feeds a lookahead decode step its input ids
        from the device (see DecodeInputs.fill). Prompt log-probs the batch's requests ask for
        are appended to ``prompt_scores``."""
        self.copy_blocks(copies)
        if self.is_decode_step(batch):
            return self.decode.run(batch, token_source)
        assert token_source is None, "lookahead steps run on the decode buffers"
        ids, pos, meta, sample_idx = self.prepare(batch)
        hidden = self.model(ids, pos, self.kv_caches, meta)
        if prompt_scores is not None:
            prompt_scores += self._prompt_scores(batch, hidden, meta.cu_seqlens_q_host)
        if not sample_idx:
            return torch.empty(0, self.spec.vocab_size, device=self.device)
        return self.model.compute_logits(hidden[torch.tensor(sample_idx, device=self.device)])

    def _prompt_scores(
        self, batch: list[ScheduledSeq], hidden: torch.Tensor, cu: list[int]
    ) -> list[PromptScores]:
        """Prompt log-probs of this step's prompt chunks that ask for them. Logits are made
        only for those rows, ``PROMPT_LOGPROB_ROWS`` at a time, and reduced on the device to
        the next prompt token's log-prob and the top N; one host copy per chunk."""
        out = []
        for item, row0 in zip(batch, cu, strict=False):
            group = item.seq.group
            k = group.params.prompt_logprobs
            start = item.seq.num_computed
            # position p predicts prompt token p + 1; skip positions scored before a preemption
            first = max(start, len(group.prompt_logprobs))
            end = min(start + item.num_tokens, group.prompt_len - 1)
            if k is None or first >= end:
                continue
            targets = torch.tensor(group.prompt_ids[first + 1 : end + 1], device=self.device)
            parts = []
            for lo in range(0, end - first, PROMPT_LOGPROB_ROWS):
                hi = min(lo + PROMPT_LOGPROB_ROWS, end - first)
                rows = hidden[row0 + first - start + lo : row0 + first - start + hi]
                logprobs = torch.log_softmax(self.model.compute_logits(rows), dim=-1)
                chosen = logprobs.gather(1, targets[lo:hi, None])
                part = [chosen.double()]
                if k:
                    vals, idx = torch.topk(logprobs, k, dim=-1)
                    part += [idx.double(), vals.double()]
                parts.append(torch.cat(part, dim=1))
            host = torch.cat(parts).cpu().tolist()
            out.append(PromptScores(
                group, first, [r[0] for r in host],
                [[(int(i), v) for i, v in zip(r[1 : 1 + k], r[1 + k :], strict=True)]
                 for r in host],
            ))  # fmt: skip
        return out
