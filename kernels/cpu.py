"""CPU backend. Ops default to the reference; decode attention is batched.

SlimAttention, int8 KV and fused element-wise ops (design.md) replace further ops one by one, each
tested against ``reference`` on random inputs (tests/test_kernels.py).
"""

from __future__ import annotations

import torch

from .interface import AttentionMetadata
from .reference import ReferenceBackend


class CPUBackend(ReferenceBackend):
    name = "cpu"

    def attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        if not meta.is_decode:
            return super().attention(q, k_cache, v_cache, meta, scale, sliding_window)
        return decode_attention(q, k_cache, v_cache, meta, scale, sliding_window)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """One query per sequence, all sequences in one batched product: the per-sequence python
    loop of the reference costs more than the arithmetic at decode sizes.

    Both segments are read through their block tables into one padded ``[B, slots, Hkv, D]``
    view per step; padding slots are masked out.
    """
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    step = meta.scratch.get("decode_tables")
    if step is None:
        ptab = meta.prompt_block_tables.long()
        # One table per sequence: its prompt blocks, then its response blocks.
        tables = torch.cat([ptab, meta.response_block_tables.long()], dim=1)
        num_slots = tables.shape[1] * block_size
        step = meta.scratch["decode_tables"] = (tables, ptab.shape[1] * block_size, num_slots)
    tables, prompt_slots, num_slots = step
    mask = meta.scratch.get(("decode_mask", sliding_window))
    if mask is None:
        mask = meta.scratch[("decode_mask", sliding_window)] = _decode_mask(
            meta, prompt_slots, num_slots, sliding_window
        )
    # [B, slots, Hkv, D] -> [B, Hkv, slots, D]
    keys = k_cache[tables].view(num_seqs, num_slots, num_kv_heads, head_dim).transpose(1, 2)
    values = v_cache[tables].view(num_seqs, num_slots, num_kv_heads, head_dim).transpose(1, 2)
    group = num_heads // num_kv_heads
    qg = q.float().view(num_seqs, num_kv_heads, group, head_dim)
    scores = torch.matmul(qg, keys.float().transpose(2, 3)) * scale  # [B, Hkv, G, slots]
    scores.masked_fill_(mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    # Padding slots may hold anything (the pool is never zeroed): 0 * NaN would poison the sum.
    values = values.float().masked_fill(mask.view(num_seqs, 1, num_slots, 1), 0.0)
    out = torch.matmul(probs, values)  # [B, Hkv, G, D]
    return out.reshape(num_seqs, num_heads, head_dim).to(q.dtype)


def _decode_mask(
    meta: AttentionMetadata, prompt_slots: int, num_slots: int, sliding_window: int | None
) -> torch.Tensor:
    """``[B, 1, 1, slots]``: True where a slot is padding or outside the window."""
    slot = torch.arange(num_slots)[None, :]
    plen = meta.prompt_lens.long()[:, None]
    rlen = meta.response_lens.long()[:, None]
    in_prompt = slot < prompt_slots
    # Position of the token in each slot: prompt slots count from 0, response slots from plen.
    key_pos = torch.where(in_prompt, slot, plen + slot - prompt_slots)
    valid = torch.where(in_prompt, slot < plen, slot - prompt_slots < rlen)
    if sliding_window is not None:
        valid &= key_pos > plen + rlen - 1 - sliding_window
    return ~valid[:, None, None, :]
