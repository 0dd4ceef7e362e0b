"""Every backend op against the ``reference`` backend on random inputs and random segment
layouts (shared prompt blocks, response blocks anywhere in the pool, sliding windows, GQA)."""

from __future__ import annotations

import random

import pytest
import torch
from segserve.kernels import AttentionMetadata, get_backend

BLOCK = 4


def random_batch(rng: random.Random, num_blocks: int, q_lens: list[int]):
    """Block tables over a shuffled pool; sequence i shares its prompt with i-1 half the time."""
    free = list(range(num_blocks))
    rng.shuffle(free)
    ptabs, rtabs, plens, rlens = [], [], [], []
    for i, q_len in enumerate(q_lens):
        if i and rng.random() < 0.5 and rlens[-1] >= 0:
            ptab, plen = ptabs[-1], plens[-1]  # same prompt segment (a sibling sample/beam)
        else:
            plen = rng.randint(1, 30)
            ptab = [free.pop() for _ in range(-(-plen // BLOCK))]
        rlen = rng.randint(0, 20)
        if plen + rlen < q_len:
            rlen = q_len - plen
        rtab = [free.pop() for _ in range(-(-rlen // BLOCK))]
        ptabs.append(ptab), rtabs.append(rtab), plens.append(plen), rlens.append(rlen)

    def pad(rows):
        width = max(max(len(r) for r in rows), 1)
        return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32)

    cu = [0]
    for q_len in q_lens:
        cu.append(cu[-1] + q_len)
    return AttentionMetadata(
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
        slot_mapping=torch.zeros(cu[-1], dtype=torch.int64),
        prompt_block_tables=pad(ptabs),
        prompt_lens=torch.tensor(plens, dtype=torch.int32),
        response_block_tables=pad(rtabs),
        response_lens=torch.tensor(rlens, dtype=torch.int32),
        max_q_len=max(q_lens),
        cu_seqlens_q_host=cu,
        prompt_lens_host=plens,
        response_lens_host=rlens,
    )


def poisoned_cache(meta: AttentionMetadata, num_blocks: int, kv_heads: int, dim: int):
    """Random K or V where a segment holds tokens, NaN everywhere else: the pool is never
    zeroed, so a kernel that lets an unwritten slot touch its result must fail."""
    cache = torch.full((num_blocks, BLOCK, kv_heads, dim), float("nan"))
    flat = cache.view(-1, kv_heads, dim)
    for i in range(meta.num_seqs):
        for tab, n in (
            (meta.prompt_block_tables[i], meta.prompt_lens_host[i]),
            (meta.response_block_tables[i], meta.response_lens_host[i]),
        ):
            for t in range(n):
                flat[int(tab[t // BLOCK]) * BLOCK + t % BLOCK] = torch.randn(kv_heads, dim)
    return cache


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("decode", [True, False])
def test_cpu_attention_matches_reference(seed, window, decode):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    heads, kv_heads, dim, num_blocks = 8, 2, 16, 200
    q_lens = [1] * rng.randint(1, 9) if decode else [rng.randint(1, 6) for _ in range(4)]
    meta = random_batch(rng, num_blocks, q_lens)
    q = torch.randn(sum(q_lens), heads, dim)
    k_cache = poisoned_cache(meta, num_blocks, kv_heads, dim)
    v_cache = poisoned_cache(meta, num_blocks, kv_heads, dim)
    ref = get_backend("reference").attention(q, k_cache, v_cache, meta, 0.25, window)
    out = get_backend("cpu").attention(q, k_cache, v_cache, meta, 0.25, window)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_reference_attention_against_dense_causal_softmax():
    """The oracle itself, against a hand-built dense computation of one sequence."""
    torch.manual_seed(0)
    rng = random.Random(0)
    meta = random_batch(rng, 64, [3])
    plen, rlen = meta.prompt_lens_host[0], meta.response_lens_host[0]
    k_cache, v_cache = torch.randn(64, BLOCK, 1, 8), torch.randn(64, BLOCK, 1, 8)

    def tokens(cache, tab, n):
        return torch.cat([cache[b] for b in tab.tolist()])[:n]

    keys = torch.cat(
        [
            tokens(k_cache, meta.prompt_block_tables[0], plen),
            tokens(k_cache, meta.response_block_tables[0], rlen),
        ]
    )[:, 0]
    values = torch.cat(
        [
            tokens(v_cache, meta.prompt_block_tables[0], plen),
            tokens(v_cache, meta.response_block_tables[0], rlen),
        ]
    )[:, 0]
    q = torch.randn(3, 2, 8)  # 2 query heads share the 1 kv head
    out = get_backend("reference").attention(q, k_cache, v_cache, meta, 0.5)
    n = plen + rlen
    for t in range(3):
        pos = n - 3 + t
        for h in range(2):
            w = torch.softmax((keys[: pos + 1] @ q[t, h]) * 0.5, dim=0)
            torch.testing.assert_close(out[t, h], w @ values[: pos + 1], rtol=1e-5, atol=1e-5)


def test_elementwise_ops_match_hand_formulas():
    torch.manual_seed(1)
    be = get_backend("cpu")
    x, r, w = torch.randn(5, 32), torch.randn(5, 32), torch.randn(32)
    normed, res = be.add_rms_norm(x, r, w, 1e-6)
    s = x + r
    torch.testing.assert_close(res, s)
    torch.testing.assert_close(normed, w * s / torch.sqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6))
    gu = torch.randn(5, 64)
    torch.testing.assert_close(be.silu_mul(gu), torch.nn.functional.silu(gu[:, :32]) * gu[:, 32:])


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda-magic'"):
        get_backend("cuda-magic")


def test_copy_blocks_copies_every_layer_and_nothing_else():
    torch.manual_seed(2)
    k, v = torch.randn(3, 10, BLOCK, 2, 8), torch.randn(3, 10, BLOCK, 2, 8)
    k0, v0 = k.clone(), v.clone()
    get_backend("cpu").copy_blocks(k, v, torch.tensor([4, 7]), torch.tensor([1, 9]))
    for pool, orig in ((k, k0), (v, v0)):
        torch.testing.assert_close(pool[:, [1, 9]], orig[:, [4, 7]], rtol=0, atol=0)
        rest = [b for b in range(10) if b not in (1, 9)]
        torch.testing.assert_close(pool[:, rest], orig[:, rest], rtol=0, atol=0)
