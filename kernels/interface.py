"""The fused-op interface every kernel backend implements, and the attention metadata it reads.

A sequence's KV lives in two segments of fixed-size blocks (docs/architecture.md): the prompt
segment, shared by every sequence of a request and by requests with the same prefix, and the
sequence's private response segment. Attention ops therefore take *two* block tables and two
lengths per sequence and never see a concatenated cache.

Token layout is "varlen": the new tokens of all sequences in a step are packed into one
``[num_tokens, ...]`` tensor, and ``cu_seqlens_q`` marks where each sequence starts.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch


class LayerKV(NamedTuple):
    """One layer's slice of the KV pool: ``k``/``v`` ``[num_blocks, block_size, Hkv, D]`` and, for
    an int8 pool (kernels/quant.py), their scales ``[num_blocks, block_size, Hkv]`` float32;
    the scales are None when the pool holds the model's dtype."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None


@dataclass
class AttentionMetadata:
    """What attention needs to know about one batch step.

    For sequence ``i`` its context is ``prompt_lens[i]`` tokens read through
    ``prompt_block_tables[i]`` followed by ``response_lens[i]`` tokens read through
    ``response_block_tables[i]``; its ``q_len`` new queries are the *last* ``q_len`` positions of
    that context (their K/V were already written by ``write_kv``), attended causally.

    ``prompt_group_start`` (optional, ``[B]`` int32 on the device) groups decode rows that share a
    prompt segment (beams, n samples): row ``i``'s value is the index of the first row of its
    group; the rows of a group are contiguous and have the same prompt table and length. The
    engine fills it with ``prompt_group_starts``; None lets a backend derive it on the device
    (``prompt_group_start_from_tables``). Backends that don't group ignore it.
    """

    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    slot_mapping: torch.Tensor  # [T] int64, flat cache slot of each new token's K/V
    prompt_block_tables: torch.Tensor  # [B, max_prompt_blocks] int32, padded with 0
    prompt_lens: torch.Tensor  # [B] int32
    response_block_tables: torch.Tensor  # [B, max_response_blocks] int32, padded with 0
    response_lens: torch.Tensor  # [B] int32
    max_q_len: int
    # Host copies: python loops in the reference backend and launch grids read these without a
    # device->host sync.
    cu_seqlens_q_host: list[int]
    prompt_lens_host: list[int]
    response_lens_host: list[int]
    prompt_group_start: torch.Tensor | None = None  # [B] int32, see above
    # Backends may keep per-step tensors derived from the above here (masks, indices), so every
    # layer of the step reuses them.
    scratch: dict = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.prompt_lens_host)

    @property
    def is_decode(self) -> bool:
        return self.max_q_len == 1


def prompt_group_starts(keys: Sequence[Hashable]) -> list[int]:
    """``prompt_group_start`` from one host key per batch row (e.g. the id of the row's request,
    or its prompt block ids and length): a row whose key equals the previous row's joins that
    row's group. Keep the rows of a request adjacent in the batch to share their prompt."""
    starts: list[int] = []
    for i, key in enumerate(keys):
        starts.append(starts[i - 1] if i and key == keys[i - 1] else i)
    return starts


def prompt_group_start_from_tables(
    prompt_block_tables: torch.Tensor, prompt_lens: torch.Tensor
) -> torch.Tensor:
    """``prompt_group_start`` derived on the device, without a host sync: a row joins the previous
    row's group when its prompt length and its whole prompt table row are equal (equal tables
    mean the same blocks, so grouping them is always correct)."""
    num_rows = prompt_lens.shape[0]
    rows = torch.arange(num_rows, device=prompt_lens.device)
    same = torch.zeros(num_rows, dtype=torch.bool, device=prompt_lens.device)
    if num_rows > 1:
        same[1:] = (prompt_lens[1:] == prompt_lens[:-1]) & (
            prompt_block_tables[1:] == prompt_block_tables[:-1]
        ).all(dim=1)
    return torch.where(same, 0, rows).cummax(dim=0).values.to(torch.int32)


class KernelBackend:
    """The op set. Subclasses override ops with faster versions; ``reference`` is the oracle."""

    name = "abstract"
    # True when, in decode, attention reads only device tensors (never the ``*_host`` lists),
    # does no host sync, and ``write_kv`` skips slots < 0: the engine then runs decode steps on
    # fixed buffers and, on CUDA, replays them as graphs (actors/decode_graphs.py).
    graphable = False
    # True when write_kv/rope_write_kv/attention/copy_blocks take an int8 pool with its scales
    # (``k_scale``/``v_scale``); the engine refuses ``kv_dtype=int8`` on other backends.
    int8_kv = False

    def pack_linear_weight(self, weight: torch.Tensor) -> torch.Tensor | None:
        """A re-laid-out copy of a linear weight ``[out, in]`` that this backend's ``linear``
        takes in its place, or None to keep the plain weight. Called once per weight after
        loading."""
        return None

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x @ weight.T + bias`` (weights ``[out, in]``, as nn.Linear)."""
        return torch.nn.functional.linear(x, weight, bias)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        raise NotImplementedError

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(rms_norm(x + residual), x + residual)``: the fused residual add."""
        raise NotImplementedError

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` for ``gate_up = [gate | up]`` along the last dim."""
        raise NotImplementedError

    def rope(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary embedding (HF "rotate_half") of q ``[T, H, D]`` and k ``[T, Hkv, D]``.

        ``cos``/``sin`` are ``[T, D]`` float32 rows for each token's position, looked up once
        per step by the model and shared by every layer.
        """
        raise NotImplementedError

    def write_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> None:
        """Store new K/V ``[T, Hkv, D]`` into caches ``[num_blocks, block_size, Hkv, D]``.

        With ``k_scale``/``v_scale`` (``[num_blocks, block_size, Hkv]``) the caches are int8:
        K/V are quantized (kernels/quant.py) and their scales stored beside them."""
        raise NotImplementedError

    def rope_write_kv(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``rope`` then ``write_kv`` of the rotated k; returns the rotated q. Backends fuse it.

        q/k/v may be strided views (splits of the fused QKV output). A slot < 0 marks a padding
        row (CUDA-graph batches): backends that run padded batches store nothing for it."""
        q, k = self.rope(q, k, cos, sin)
        if k_scale is None and v_scale is None:
            self.write_kv(k, v, k_cache, v_cache, slot_mapping)
        else:
            self.write_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
        return q

    def attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal attention of q ``[T, H, D]`` over both segments; returns ``[T, H, D]``.

        With ``sliding_window = w`` a query at position p sees keys at positions > p - w.
        With ``k_scale``/``v_scale`` the caches are int8 and are dequantized as they are read.
        """
        raise NotImplementedError

    def copy_blocks(
        self,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        src: torch.Tensor,
        dst: torch.Tensor,
        k_scale_pool: torch.Tensor | None = None,
        v_scale_pool: torch.Tensor | None = None,
    ) -> None:
        """Copy whole blocks ``src[i] -> dst[i]`` in every layer of the pools
        ``[layers, num_blocks, block_size, Hkv, D]`` (copy-on-write after a fork), and of the
        scale pools ``[layers, num_blocks, block_size, Hkv]`` of an int8 cache."""
        for pool in (k_pool, v_pool, k_scale_pool, v_scale_pool):
            if pool is not None:
                pool[:, dst] = pool[:, src]
