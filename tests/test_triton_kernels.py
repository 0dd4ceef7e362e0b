"""Every op of the ``triton`` kernel backend against the ``reference`` backend, on fresh random
inputs and random segment layouts: head dims 64/128, GQA ratios 1/4/8, block sizes 16/32, ragged
lengths (empty segments, lengths off block boundaries, contexts long enough for several decode
splits), rows sharing a prompt segment in groups of 1, 3 and 4, sliding windows, bf16 and fp32.
Outputs and unwritten cache slots are NaN-poisoned, so a kernel that reads or leaves a slot it
should not fails.

The full matrix is marked ``gpu`` and runs on CUDA. Without CUDA a small subset runs on CPU under
Triton's interpreter (TRITON_INTERPRET=1 is set here, before triton is first imported).
"""

from __future__ import annotations

import itertools
import os
import random
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from kernel_layouts import DEV, Case, Layout, NoHostReads, make_layout  # noqa: E402
from segserve.kernels import (  # noqa: E402
    AttentionMetadata,
    KernelBackend,
    get_backend,
    prompt_group_start_from_tables,
    prompt_group_starts,
)
from segserve.kernels.triton import TritonBackend  # noqa: E402

REF = get_backend("reference")
TOL = {
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
GPU = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]


BF16, FP32 = torch.bfloat16, torch.float32
# Every pair of values of (head dim, GQA ratio, block size, dtype, window) and every (head dim,
# GQA ratio, dtype) triple, in 12 cases rather than the 48 of the full product: each new
# combination of constants is a kernel compile, and GPU time is scarce.
_PAIRWISE = [(64, 1, 16, BF16, None), (128, 1, 32, FP32, 37), (64, 4, 32, FP32, None),
             (128, 4, 16, BF16, 37), (64, 8, 16, FP32, 37), (128, 8, 32, BF16, None)]  # fmt: skip
FULL = [Case(*c) for c in _PAIRWISE] + [
    Case(d, r, b, FP32 if t == BF16 else BF16, 37 if w is None else None)
    for d, r, b, t, w in _PAIRWISE
]
# What CPU CI runs under the interpreter: every value of FULL's dimensions at least once.
SMALL = [Case(64, 4, 16, BF16, None), Case(128, 1, 32, FP32, 37), Case(64, 8, 16, FP32, 37)]


def cases(small: list[Case] = SMALL) -> list:
    return [pytest.param(c, id=f"cpu-{c}") for c in small] + [
        pytest.param(c, id=str(c), marks=GPU) for c in FULL
    ]


def check_attention(case: Case, layout: Layout, backend: TritonBackend, seed: int) -> None:
    torch.manual_seed(seed)
    meta = layout.meta
    num_kv_heads = layout.k_cache.shape[2]
    q = torch.randn(meta.cu_seqlens_q_host[-1], num_kv_heads * case.ratio, case.dim)
    q = q.to(case.dtype).to(DEV)
    scale = case.dim**-0.5
    expected = REF.attention(q, layout.k_cache, layout.v_cache, meta, scale, case.window)
    if meta.is_decode:  # what a captured graph replays: no host metadata at all
        meta.cu_seqlens_q_host = meta.prompt_lens_host = meta.response_lens_host = NoHostReads()
    got = backend.attention(q, layout.k_cache, layout.v_cache, meta, scale, case.window)
    real = got.shape[0] - layout.padding_rows
    torch.testing.assert_close(got[:real], expected[:real], **TOL[case.dtype])
    assert torch.equal(got[real:], torch.zeros_like(got[real:])), "padding rows must be zeros"


# ----------------------------------------------------------------------------- attention


GROUPINGS = ("derived", "explicit", "ungrouped")


@pytest.mark.parametrize(
    "case,grouping",
    [pytest.param(c, g, id=f"cpu-{c}-{g}") for c, g in zip(SMALL, GROUPINGS, strict=True)]
    + [pytest.param(c, g, id=f"{c}-{g}", marks=GPU) for c in FULL for g in GROUPINGS],
)
def test_decode_attention(case: Case, grouping: str):
    """Short and long contexts, groups of 1, 3 and 4 rows, padding rows; small splits so the
    long rows use several (the default backend is checked in the long-context test). The groups
    come from the engine's helper, from the tables on the device, or not at all."""
    seed = zlib.crc32(f"{case}-{grouping}".encode())
    rng = random.Random(seed)
    layout = make_layout(
        rng, case, [1, 3, 4, 1], lambda r: 1, max_prompt=150, max_response=80, padding_rows=2
    )
    if grouping == "explicit":
        layout.meta.prompt_group_start = torch.tensor(
            prompt_group_starts(layout.keys), dtype=torch.int32, device=DEV
        )
    elif grouping == "ungrouped":
        layout.meta.prompt_group_start = torch.arange(
            len(layout.keys), dtype=torch.int32, device=DEV
        )
    check_attention(case, layout, TritonBackend(decode_split_tokens=case.block_size), seed)


@pytest.mark.parametrize(
    "case", [pytest.param(SMALL[2], id="cpu")] + [pytest.param(c, marks=GPU) for c in FULL]
)
def test_decode_groups_read_the_prompt_once_through_the_first_row(case: Case):
    """Rows after the first of a group get prompt tables into NaN blocks: a kernel that read the
    prompt per row instead of once per group would return NaN. A group of 6 spans two tiles."""
    rng = random.Random(5)
    layout = make_layout(rng, case, [3, 1, 6, 4], lambda r: 1, max_prompt=100, max_response=30)
    starts = prompt_group_starts(layout.keys)
    meta = layout.meta
    meta.prompt_group_start = torch.tensor(starts, dtype=torch.int32, device=DEV)
    poisoned = meta.prompt_block_tables.clone()
    nan_block = int(layout.k_cache.isnan().flatten(1).all(1).nonzero()[0])  # a spare block
    for row, first in enumerate(starts):
        if row != first:
            poisoned[row] = nan_block
    expected_meta_tables = meta.prompt_block_tables
    torch.manual_seed(5)
    q = torch.randn(len(starts), 2 * case.ratio, case.dim).to(case.dtype).to(DEV)
    expected = REF.attention(q, layout.k_cache, layout.v_cache, meta, 0.2, case.window)
    meta.prompt_block_tables = poisoned
    got = TritonBackend(decode_split_tokens=32).attention(
        q, layout.k_cache, layout.v_cache, meta, 0.2, case.window
    )
    meta.prompt_block_tables = expected_meta_tables
    torch.testing.assert_close(got, expected, **TOL[case.dtype])


@pytest.mark.parametrize(
    "case", [pytest.param(SMALL[0], id="cpu")] + [pytest.param(c, marks=GPU) for c in FULL[::2]]
)
def test_decode_attention_long_context_default_splits(case: Case):
    rng = random.Random(7)
    max_prompt = 300 if not HAS_CUDA else 3000
    layout = make_layout(rng, case, [4, 1], lambda r: 1, max_prompt=max_prompt, max_response=200)
    check_attention(case, layout, TritonBackend(), 7)


@pytest.mark.parametrize("case", cases())
def test_prefill_attention(case: Case):
    """Ragged new-token counts over a cached prefix, mixed with single-token (decode) rows; some
    rows longer than one 64-query tile."""
    seed = zlib.crc32(str(case).encode())
    rng = random.Random(seed)

    def q_len(r: random.Random) -> int:
        return r.choice([1, r.randint(1, 20), r.randint(50, 80)])

    layout = make_layout(rng, case, [1, 1, 1, 3], q_len, max_prompt=90, max_response=40)
    check_attention(case, layout, TritonBackend(), seed)


def test_prompt_group_helpers_match_hand_values():
    assert prompt_group_starts(["a", "a", "b", "c", "c", "c", "a"]) == [0, 0, 2, 3, 3, 3, 6]
    assert prompt_group_starts([]) == []
    tables = torch.tensor([[5, 6], [5, 6], [5, 6], [7, 0], [7, 0], [5, 6]], dtype=torch.int32)
    lens = torch.tensor([20, 20, 19, 3, 3, 20], dtype=torch.int32)
    starts = prompt_group_start_from_tables(tables, lens)
    assert starts.dtype == torch.int32
    assert starts.tolist() == [0, 0, 2, 3, 3, 5]
    assert prompt_group_start_from_tables(tables[:0], lens[:0]).tolist() == []


# ----------------------------------------------------------------------------- element-wise


@pytest.mark.parametrize(
    "dtype,hidden",
    [(torch.bfloat16, 96), (torch.float32, 64)]
    + [pytest.param(d, h, marks=GPU) for d in TOL for h in (4096, 5120)],
)
def test_norms_and_silu_mul(dtype, hidden):
    torch.manual_seed(hidden)
    be = TritonBackend()
    x, r = torch.randn(2, 7, hidden, device=DEV).to(dtype), torch.randn(2, 7, hidden, device=DEV)
    r, w = r.to(dtype), (1 + 0.1 * torch.randn(hidden, device=DEV)).to(dtype)
    torch.testing.assert_close(be.rms_norm(x, w, 1e-6), REF.rms_norm(x, w, 1e-6), **TOL[dtype])
    normed, res = be.add_rms_norm(x, r, w, 1e-5)
    ref_normed, ref_res = REF.add_rms_norm(x, r, w, 1e-5)
    torch.testing.assert_close(res, ref_res, rtol=0, atol=0)  # same single rounding
    torch.testing.assert_close(normed, ref_normed, **TOL[dtype])
    gate_up = torch.randn(5, 2 * (hidden + 8), device=DEV).to(dtype)
    torch.testing.assert_close(be.silu_mul(gate_up), REF.silu_mul(gate_up), **TOL[dtype])


@pytest.mark.parametrize(
    "dtype,dim,ratio,block_size",
    [(torch.bfloat16, 64, 4, 16), (torch.float32, 128, 1, 32)]
    + [
        pytest.param(t, d, r, 32 if r == 4 else 16, marks=GPU)
        for t, d, r in itertools.product(TOL, (64, 128), (1, 4, 8))
    ],
)
def test_rope_write_kv(dtype, dim, ratio, block_size):
    """q/k/v are strided splits of one fused QKV output; slots < 0 (padding) store nothing; every
    slot not written stays NaN."""
    torch.manual_seed(dim + ratio)
    tokens, kv_heads, num_blocks = 9, 2, 6
    heads = kv_heads * ratio
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, device=DEV).to(dtype)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k, v = (x.view(tokens, -1, dim) for x in (q, k, v))
    angles = torch.rand(tokens, dim // 2, device=DEV) * 100
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    slots = torch.randperm(num_blocks * block_size)[:tokens]
    slots[[2, 5]] = -1
    slots = slots.to(DEV)

    def empty_caches():
        shape = (num_blocks, block_size, kv_heads, dim)
        return torch.full(shape, float("nan"), dtype=dtype, device=DEV), torch.full(
            shape, float("nan"), dtype=dtype, device=DEV
        )

    be = TritonBackend()
    k_cache, v_cache = empty_caches()
    q_rot = be.rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots)
    ref_q, ref_k = REF.rope(q, k, cos, sin)
    ref_kc, ref_vc = empty_caches()
    keep = slots >= 0
    REF.write_kv(ref_k[keep], v[keep], ref_kc, ref_vc, slots[keep])
    torch.testing.assert_close(q_rot, ref_q, **TOL[dtype])
    for got, want in ((k_cache, ref_kc), (v_cache, ref_vc)):
        assert torch.equal(got.isnan(), want.isnan()), "wrote a slot it should not have"
        torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), **TOL[dtype])

    # The separate ops of the interface, and the interface's default composition of them.
    got_q, got_k = be.rope(q, k, cos, sin)
    torch.testing.assert_close(got_q, ref_q, **TOL[dtype])
    torch.testing.assert_close(got_k, ref_k, **TOL[dtype])
    k_cache2, v_cache2 = empty_caches()
    be.write_kv(ref_k[keep], v[keep], k_cache2, v_cache2, slots[keep])
    assert torch.equal(k_cache2.nan_to_num(), ref_kc.nan_to_num())
    assert torch.equal(v_cache2.nan_to_num(), ref_vc.nan_to_num())
    k_cache3, v_cache3 = empty_caches()
    q3 = KernelBackend.rope_write_kv(REF, q[keep], k[keep], v[keep], cos[keep], sin[keep],
                                     k_cache3, v_cache3, slots[keep])  # fmt: skip
    assert torch.equal(q3, ref_q[keep])
    assert torch.equal(k_cache3.nan_to_num(), ref_kc.nan_to_num())


# ----------------------------------------------------------------------------- cache, checks


def test_copy_blocks_copies_every_layer_and_nothing_else():
    torch.manual_seed(3)
    k, v = torch.randn(3, 10, 16, 2, 64, device=DEV), torch.randn(3, 10, 16, 2, 64, device=DEV)
    k0, v0 = k.clone(), v.clone()
    be = TritonBackend()
    be.copy_blocks(k, v, torch.tensor([4, 7], device=DEV), torch.tensor([1, 9], device=DEV))
    for pool, orig in ((k, k0), (v, v0)):
        torch.testing.assert_close(pool[:, [1, 9]], orig[:, [4, 7]], rtol=0, atol=0)
        rest = [b for b in range(10) if b not in (1, 9)]
        torch.testing.assert_close(pool[:, rest], orig[:, rest], rtol=0, atol=0)
    none = torch.tensor([], dtype=torch.long, device=DEV)
    be.copy_blocks(k, v, none, none)  # no copies: no launch


@pytest.mark.parametrize(
    "shape,message",
    [
        ((65, 8, 8, torch.bfloat16, 16), "rope_write_kv: head_dim must be even"),
        ((512, 8, 8, torch.bfloat16, 16), "attention: head_dim must be in"),
        ((128, 8, 3, torch.bfloat16, 16), "num_heads must be a multiple of num_kv_heads"),
        ((128, 8, 8, torch.float8_e4m3fn, 16), "no kernels for dtype torch.float8_e4m3fn"),
        ((128, 8, 8, torch.float16, 24), "block_size must be a power of 2"),
    ],
)
def test_check_supported_names_the_op_and_shape(shape, message):
    with pytest.raises(ValueError, match=message) as err:
        TritonBackend.check_supported(*shape)
    assert f"head_dim={shape[0]}" in str(err.value)
    TritonBackend.check_supported(128, 32, 8, torch.bfloat16, 16)


def test_get_backend_returns_triton():
    backend = get_backend("triton")
    assert isinstance(backend, TritonBackend) and backend.name == "triton"


# ----------------------------------------------------------------------------- CUDA graphs


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_decode_attention_replays_in_a_cuda_graph_with_new_lengths():
    """Captured once, replayed on other lengths, tables and groups of the same shapes: what the
    engine's graph runner does. Capture itself fails on any host sync."""
    case = Case(128, 4, 16, torch.bfloat16, None)
    rng = random.Random(11)
    layouts = [
        make_layout(rng, case, [3, 1, 4], lambda r: 1, max_prompt=120, max_response=60)
        for _ in range(3)
    ]
    width_p = max(lay.meta.prompt_block_tables.shape[1] for lay in layouts)
    width_r = max(lay.meta.response_block_tables.shape[1] for lay in layouts)
    pool = max(lay.k_cache.shape[0] for lay in layouts)

    def padded(lay: Layout):
        def widen(t, width):
            return torch.nn.functional.pad(t, (0, width - t.shape[1]))

        k = torch.full((pool, *lay.k_cache.shape[1:]), float("nan"), dtype=case.dtype, device=DEV)
        v = k.clone()
        k[: lay.k_cache.shape[0]], v[: lay.v_cache.shape[0]] = lay.k_cache, lay.v_cache
        m = lay.meta
        groups = torch.tensor(prompt_group_starts(lay.keys), dtype=torch.int32, device=DEV)
        return (widen(m.prompt_block_tables, width_p), m.prompt_lens,
                widen(m.response_block_tables, width_r), m.response_lens, groups), k, v  # fmt: skip

    static, k_cache, v_cache = padded(layouts[0])
    static = tuple(t.clone() for t in static)
    batch = static[1].shape[0]
    q = torch.randn(batch, 8, case.dim, device=DEV).to(case.dtype)
    meta = AttentionMetadata(
        cu_seqlens_q=torch.arange(batch + 1, dtype=torch.int32, device=DEV),
        slot_mapping=torch.zeros(batch, dtype=torch.int64, device=DEV),
        prompt_block_tables=static[0], prompt_lens=static[1],
        response_block_tables=static[2], response_lens=static[3],
        max_q_len=1, cu_seqlens_q_host=NoHostReads(), prompt_lens_host=NoHostReads(),
        response_lens_host=NoHostReads(), prompt_group_start=static[4],
    )  # fmt: skip
    be = TritonBackend(decode_split_tokens=32)
    be.attention(q, k_cache, v_cache, meta, 0.1)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = be.attention(q, k_cache, v_cache, meta, 0.1)
    for lay in layouts[1:] + layouts[:1]:
        tensors, k_new, v_new = padded(lay)
        for dst, src in zip(static, tensors, strict=True):
            dst.copy_(src)
        k_cache.copy_(k_new), v_cache.copy_(v_new)
        q.copy_(torch.randn_like(q))
        graph.replay()
        expected = REF.attention(q, lay.k_cache, lay.v_cache, lay.meta, 0.1)
        torch.testing.assert_close(out, expected, **TOL[case.dtype])


# ----------------------------------------------------------------------------- end to end


@pytest.mark.skipif(HAS_CUDA, reason="the engine on CUDA is tested with the GPU engine tests")
def test_engine_on_triton_backend_matches_hf_greedy_and_beams(tmp_path):
    """The model's real call pattern under the interpreter: fused QKV views into rope_write_kv,
    chunked prefill, decode, and beam search (four rows sharing one prompt segment)."""
    from conftest import hf_beams, hf_greedy, make_model
    from segserve import LLM, SamplingParams

    hf = make_model(tmp_path, "mistral")  # sliding window 24, head_dim 32
    llm = LLM(str(tmp_path), block_size=4, max_num_batched_tokens=64, kernel_backend="triton")
    rng = random.Random(3)
    prompt = [0] + [rng.randrange(3, 256) for _ in range(70)]  # two prefill chunks
    out = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0))[0]
    assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 4)
    beams = llm.generate([prompt], SamplingParams(max_tokens=3, beam_width=4))[0]
    assert [c.token_ids for c in beams.outputs] == hf_beams(hf, prompt, 3, 4)


# ----- single-row linear (the batch-1 decode GEMMs) ---------------------------------------------
@pytest.mark.parametrize("n,k,bias", [(48, 64, False), (40, 1000, True)])
def test_gemv_matches_linear(n, k, bias):
    from segserve.kernels.triton.gemv import gemv

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(n + k)
    x = torch.randn(1, k, device=dev)
    w = torch.randn(n, k, device=dev)
    b = torch.randn(n, device=dev) if bias else None
    ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    got = gemv(x, w, b)
    assert got.shape == (1, n)
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-4)
    if dev == "cuda":  # bf16: tolerance of bf16 rounding of the output
        got16 = gemv(x.bfloat16(), w.bfloat16(), None if b is None else b.bfloat16())
        assert ((got16.double() - ref).norm() / ref.norm()) < 1e-2
