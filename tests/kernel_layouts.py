"""Random segment layouts for the attention kernel tests: rows in prompt groups, blocks scattered
over a shuffled pool that is NaN wherever no segment holds a token."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from segserve.kernels import AttentionMetadata

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Case:
    dim: int
    ratio: int  # query heads per KV head
    block_size: int
    dtype: torch.dtype
    window: int | None

    def __str__(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return f"d{self.dim}-gqa{self.ratio}-bs{self.block_size}-{dt}-w{self.window}"


@dataclass
class Layout:
    meta: AttentionMetadata
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    keys: list[int]  # one per row: the row's prompt group (for prompt_group_starts)
    padding_rows: int


def make_layout(
    rng: random.Random,
    case: Case,
    group_sizes: list[int],
    q_len,
    max_prompt: int,
    max_response: int,
    kv_heads: int = 2,
    padding_rows: int = 0,
) -> Layout:
    """Rows in prompt groups (a group shares one prompt table and length), response blocks
    scattered over a shuffled pool, tables wider than needed and padded with ids of other blocks
    (so reading past a length shows), and ``padding_rows`` empty rows at the end."""
    bs = case.block_size
    rows = []  # (prompt table, prompt len, response table, response len, q_len, group)
    need = sum(g * (max_prompt + max_response + 2 * bs) // bs for g in group_sizes) + 8
    free = list(range(need))
    rng.shuffle(free)
    for group, size in enumerate(group_sizes):
        plen = 0 if rng.random() < 0.15 else rng.randint(1, max_prompt)  # 0: an empty segment
        ptab = [free.pop() for _ in range(-(-plen // bs))]
        for _ in range(size):
            ql = q_len(rng)
            rlen = rng.choice([0, rng.randint(0, max_response)])
            rlen = max(rlen, ql - plen)
            rows.append((ptab, plen, [free.pop() for _ in range(-(-rlen // bs))], rlen, ql, group))
    for i in range(padding_rows):
        rows.append(([], 0, [], 0, 1, len(group_sizes) + i))

    def table(col: int) -> torch.Tensor:
        width = max(len(r[col]) for r in rows) + 1
        fill = [[rng.randrange(need) for _ in range(width - len(r[col]))] for r in rows]
        padded = [r[col] + f for r, f in zip(rows, fill, strict=True)]
        return torch.tensor(padded, dtype=torch.int32)

    cu = [0]
    for r in rows:
        cu.append(cu[-1] + r[4])
    plens, rlens = [r[1] for r in rows], [r[3] for r in rows]
    meta = AttentionMetadata(
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
        slot_mapping=torch.zeros(cu[-1], dtype=torch.int64),
        prompt_block_tables=table(0),
        prompt_lens=torch.tensor(plens, dtype=torch.int32),
        response_block_tables=table(2),
        response_lens=torch.tensor(rlens, dtype=torch.int32),
        max_q_len=max(r[4] for r in rows),
        cu_seqlens_q_host=cu,
        prompt_lens_host=plens,
        response_lens_host=rlens,
    )
    heads = (kv_heads, case.dim)
    k_cache = torch.full((need, bs, *heads), float("nan"), dtype=case.dtype)
    v_cache = torch.full((need, bs, *heads), float("nan"), dtype=case.dtype)
    for cache in (k_cache, v_cache):
        flat = cache.view(-1, *heads)
        for ptab, plen, rtab, rlen, _, _ in rows:
            for tab, n in ((ptab, plen), (rtab, rlen)):
                slots = [tab[t // bs] * bs + t % bs for t in range(n)]
                flat[slots] = torch.randn(n, *heads).to(case.dtype)
    return Layout(
        to_device(meta), k_cache.to(DEV), v_cache.to(DEV), [r[5] for r in rows], padding_rows
    )


def to_device(meta: AttentionMetadata) -> AttentionMetadata:
    for name in ("cu_seqlens_q", "slot_mapping", "prompt_block_tables", "prompt_lens"):
        setattr(meta, name, getattr(meta, name).to(DEV))
    for name in ("response_block_tables", "response_lens"):
        setattr(meta, name, getattr(meta, name).to(DEV))
    return meta


class NoHostReads(list):
    """Stands in for a ``*_host`` list: decode attention must not read one (CUDA graphs)."""

    def _refuse(self, *args):
        raise AssertionError("decode attention read a host list")

    __getitem__ = __len__ = __iter__ = _refuse
