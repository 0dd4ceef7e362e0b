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

from .communicator import Communicator
from .config import EngineConfig
from .cpu_placement import configure_cpu
from .decode_graphs import DecodeGraphs
from .sequence import Sequence, SequenceGroup
from .vocab_parallel import VocabShard

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
class StepInputs:
    """A packed (prefill or mixed) step's inputs as host lists: what rank 0 sends its group."""

    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    cu: list[int]  # cumulative query lengths
    prompt_tables: list[list[int]]
    response_tables: list[list[int]]
    plens: list[int]
    rlens: list[int]
    sample_idx: list[int]  # packed rows whose logits are needed
    max_q_len: int


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
    """One rank's model, KV pool and step execution. In a replica group (``comm`` spans more
    than one rank), rank 0's runner sends each step's inputs and each sampling op over
    ``comm`` before running them itself, and the other ranks' runners run the same in
    :func:`tp_group.follow` (so the two sides' collectives always pair up)."""

    def __init__(self, config: EngineConfig, model_path, comm: Communicator | None = None) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.comm = comm or Communicator(device=self.device)
        tp_rank, tp_size = self.comm.rank, self.comm.world_size
        self.tp_size = tp_size
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
            self.comm.all_reduce if tp_size > 1 else None,
            max_positions=self.max_model_len,
        )
        start, width = self.model.vocab_start, self.model.vocab_per_rank
        self.vocab = VocabShard(self.spec.vocab_size, start, start + width, self.comm)
        self.step_id = 0
        self.logits_by_step: dict[int, torch.Tensor] = {}  # other ranks: the recent steps
        self.block_size = config.block_size
        self.num_kv_heads = self.spec.num_kv_heads // tp_size
        self.num_blocks = config.num_kv_blocks or self._blocks_from_memory()
        if tp_size > 1:  # every rank holds the same block ids: the smallest pool wins
            mine = torch.tensor([self.num_blocks], dtype=torch.int64, device=self.device)
            self.num_blocks = int(self.comm.all_gather(mine).min())
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
            # A graph captures NCCL's collectives, never gloo's (they wait on the host).
            use_graphs = (self.device.type == "cuda" and config.cuda_graphs
                          and (self.comm.world_size == 1 or self.comm.name == "nccl"))
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

    def host_inputs(self, batch: list[ScheduledSeq]) -> StepInputs:
        """A prefill (or mixed) step's packed inputs, as host lists."""
        bs = self.block_size
        x = StepInputs([], [], [], [0], [], [], [], [], [], 0)
        for item in batch:
            seq, group = item.seq, item.seq.group
            start, end = seq.num_computed, seq.num_computed + item.num_tokens
            plen = group.prompt_len
            x.input_ids += seq.tokens(start, end)
            x.positions += range(start, end)
            x.slots += _slots(group.prompt_blocks, start, min(end, plen), bs)
            x.slots += _slots(seq.response_blocks, max(start - plen, 0), max(end - plen, 0), bs)
            x.cu.append(x.cu[-1] + item.num_tokens)
            x.prompt_tables.append(group.prompt_blocks)
            x.response_tables.append(seq.response_blocks)
            x.plens.append(min(end, plen))
            x.rlens.append(max(end - plen, 0))
            if item.samples:
                x.sample_idx.append(x.cu[-1] - 1)
            x.max_q_len = max(x.max_q_len, item.num_tokens)
        return x

    def _device_inputs(
        self, x: StepInputs
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        dev = self.device
        meta = AttentionMetadata(
            cu_seqlens_q=torch.tensor(x.cu, dtype=torch.int32, device=dev),
            slot_mapping=torch.tensor(x.slots, dtype=torch.int64, device=dev),
            prompt_block_tables=_pad(x.prompt_tables).to(dev),
            prompt_lens=torch.tensor(x.plens, dtype=torch.int32, device=dev),
            response_block_tables=_pad(x.response_tables).to(dev),
            response_lens=torch.tensor(x.rlens, dtype=torch.int32, device=dev),
            max_q_len=x.max_q_len,
            cu_seqlens_q_host=x.cu,
            prompt_lens_host=x.plens,
            response_lens_host=x.rlens,
        )
        ids = torch.tensor(x.input_ids, dtype=torch.long, device=dev)
        pos = torch.tensor(x.positions, dtype=torch.long, device=dev)
        return ids, pos, meta

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
    ):
        """Run one step; returns logits ``[num_sampling_seqs, vocab]`` (float32, on the device:
        the sampler runs there; in a replica group, a :class:`ShardedLogits` view of them).
        ``token_source`` feeds a lookahead decode step its input ids from the device (see
        DecodeInputs.fill). Prompt log-probs the batch's requests ask for are appended to
        ``prompt_scores``."""
        if self.is_decode_step(batch):
            rows, n = self.decode.bucket(len(batch)), len(batch)
            self.decode.inputs.fill_host(batch, rows, token_source is not None)
            if self.tp_size > 1:
                snap = self.decode.inputs.snapshot(rows)
                self.command(("decode", copies, rows, n, snap, token_source is not None))
            return self._wrap(self.run_decode(copies, rows, n, token_source,
                                              token_source is not None))
        assert token_source is None, "lookahead steps run on the decode buffers"
        x = self.host_inputs(batch)
        plan, groups = self._prompt_plan(batch, x.cu) if prompt_scores is not None else ([], [])
        self.command(("prefill", copies, x, plan))
        logits, scores = self.run_prefill(copies, x, plan)
        if prompt_scores is not None:
            prompt_scores += [PromptScores(g, *sc) for g, sc in zip(groups, scores, strict=True)]
        return self._wrap(logits)

    def command(self, cmd: tuple) -> None:
        """Rank 0: send the other ranks what to run next (nothing to do alone)."""
        if self.tp_size > 1:
            self.comm.broadcast_object(cmd)

    def _wrap(self, logits: torch.Tensor):
        if self.tp_size == 1:
            return logits
        from .tp_group import ShardedLogits

        self.step_id += 1
        return ShardedLogits(self, self.step_id, logits)

    def keep_logits(self, logits: torch.Tensor) -> None:
        """Other ranks: hold a step's logits slice for the sampling ops that follow."""
        self.step_id += 1
        self.logits_by_step[self.step_id] = logits
        self.logits_by_step.pop(self.step_id - 4, None)  # the lookahead keeps two alive

    def run_decode(self, copies: list[tuple[int, int]], rows: int, n: int,
                   token_source: tuple[torch.Tensor, list[int]] | None,
                   ids_on_device: bool) -> torch.Tensor:
        """Every rank: a decode step whose inputs are in the host mirror. With
        ``ids_on_device`` the input ids come from ``token_source`` on rank 0 (the lookahead),
        and from rank 0 by broadcast on the others."""
        self.copy_blocks(copies)
        inputs = self.decode.inputs
        inputs.upload(rows, n, token_source)
        if ids_on_device and self.tp_size > 1:
            self.comm.broadcast(inputs.d_long[0, :n])
        return self.decode.replay(rows, n)

    def run_prefill(
        self, copies: list[tuple[int, int]], x: StepInputs, plan: list[tuple]
    ) -> tuple[torch.Tensor, list[tuple]]:
        """Every rank: a packed step from host inputs; logits of its sampling rows, and the
        prompt log-probs ``plan`` asks for."""
        self.copy_blocks(copies)
        ids, pos, meta = self._device_inputs(x)
        hidden = self.model(ids, pos, self.kv_caches, meta)
        scores = [self._prompt_scores(hidden, *p) for p in plan]
        if not x.sample_idx:
            width = self.model.vocab_per_rank
            return torch.empty(0, width, device=self.device), scores
        rows = hidden[torch.tensor(x.sample_idx, device=self.device)]
        return self.model.compute_logits(rows), scores

    def _prompt_plan(self, batch: list[ScheduledSeq], cu: list[int]) -> tuple[list, list]:
        """Which hidden rows of this step score which prompt tokens: ``(first, row, count,
        targets, k)`` per chunk that asks, and the chunks' groups."""
        plan, groups = [], []
        for item, row0 in zip(batch, cu, strict=False):
            group = item.seq.group
            k = group.params.prompt_logprobs
            start = item.seq.num_computed
            # position p predicts prompt token p + 1; skip positions scored before a preemption
            first = max(start, len(group.prompt_logprobs))
            end = min(start + item.num_tokens, group.prompt_len - 1)
            if k is None or first >= end:
                continue
            plan.append((first, row0 + first - start, end - first,
                         group.prompt_ids[first + 1 : end + 1], k))
            groups.append(group)
        return plan, groups

    def _prompt_scores(self, hidden: torch.Tensor, first: int, row: int, count: int,
                       targets: list[int], k: int) -> tuple[int, list[float], list]:
        """One chunk's prompt log-probs: the next prompt token's, and the top ``k``. Logits are
        made only for those rows, ``PROMPT_LOGPROB_ROWS`` at a time, and reduced on the device;
        one host copy per chunk."""
        vs = self.vocab
        tgt = torch.tensor(targets, device=self.device)
        parts = []
        for lo in range(0, count, PROMPT_LOGPROB_ROWS):
            hi = min(lo + PROMPT_LOGPROB_ROWS, count)
            logprobs = vs.log_softmax(self.model.compute_logits(hidden[row + lo : row + hi]))
            part = [vs.take(logprobs, tgt[lo:hi])[:, None].double()]
            if k:
                vals, idx = vs.topk(logprobs, k)
                part += [idx.double(), vals.double()]
            parts.append(torch.cat(part, dim=1))
        host = torch.cat(parts).cpu().tolist()
        return (first, [r[0] for r in host],
                [[(int(i), v) for i, v in zip(r[1 : 1 + k], r[1 + k :], strict=True)]
                 for r in host])
