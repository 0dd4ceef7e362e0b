"""The engine with ``kv_dtype=int8`` against HF transformers on the tiny models (logits within
1e-2 relative error, greedy output mostly identical), its KV bytes against bf16 through the KV
manager's metrics, and backends that have no int8 KV refusing it at start."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import FAMILIES, hf_greedy
from segserve.actors import EngineConfig, EngineCore, SamplingParams


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[0] + [rng.randrange(3, 256) for _ in range(rng.randint(5, 60))] for _ in range(n)]


def run_recording_logits(core: EngineCore, prompt: list[int], max_tokens: int):
    """Greedy tokens of one request and the logits row the engine sampled each from."""
    rows: list[torch.Tensor] = []
    model = core.runner.model
    compute = model.compute_logits

    def record(hidden: torch.Tensor) -> torch.Tensor:
        out = compute(hidden)
        rows.append(out.detach().clone())
        return out

    model.compute_logits = record
    try:
        core.add_request(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                ignore_eos=True))
        tokens: list[int] = []
        while core.has_work():
            for d in core.step():
                tokens += d.token_ids
    finally:
        model.compute_logits = compute
    return tokens, torch.cat(rows)


@pytest.fixture(scope="module")
def default_init_models(tmp_path_factory):
    """The tiny models with HF's own init (std 0.02), as test_engine_vs_hf's default-init test
    builds them: {family: (path, hf_model)}."""
    from conftest import make_model

    out = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(f"{family}-default-init")
        out[family] = (str(path), make_model(path, family, sharpen=False))
    return out


def compare_with_hf(path: str, hf, seed: int) -> tuple[float, int, int]:
    """(largest per-row relative logits error, greedy tokens before the first divergence, greedy
    tokens) over a few prompts, the engine running an int8 pool."""
    # block_size 4 and a 64-token budget: chunked prefill reads int8 blocks of earlier chunks.
    core = EngineCore(EngineConfig(model=path, kv_dtype="int8", block_size=4,
                                   max_num_batched_tokens=64))
    assert core.runner.k_cache.dtype == torch.int8
    worst, matched, total = 0.0, 0, 0
    for p in prompts(4, seed):
        tokens, logits = run_recording_logits(core, p, 16)
        with torch.no_grad():
            want = hf(torch.tensor([p + tokens])).logits[0, len(p) - 1 : -1].float()
        assert logits.shape == want.shape
        worst = max(worst, float(((logits - want).norm(dim=-1) / want.norm(dim=-1)).max()))
        greedy = hf_greedy(hf, p, 16)  # stops at EOS; ours ignores it: compare its length
        pairs = zip(tokens, greedy, strict=False)  # ours may run on past HF's EOS
        matched += next((i for i, (a, b) in enumerate(pairs) if a != b), len(greedy))
        total += len(greedy)
    return worst, matched, total


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_kv_engine_against_hf(family, default_init_models):
    """The issue's targets: logits within 1e-2 relative error of HF's (float32 model, exact
    KV) at every step, and >= 90% of greedy tokens before the first divergence."""
    path, hf = default_init_models[family]
    worst, matched, total = compare_with_hf(path, hf, seed=2)
    assert worst <= 1e-2, worst
    assert matched >= 0.9 * total, (matched, total)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_int8_kv_engine_on_sharpened_models(family, tiny_models):
    """conftest's tiny models have their weights sharpened to std 0.15 (7.5x HF's init). There
    the int8 format itself misses 1e-2: fake-quantizing a float32 pool (quantize, dequantize,
    store float32; no int8 kernel involved) gives the same logits as the int8 pool (next test),
    and 2-3.6% relative error against HF, K alone 1.7-3.5% and V alone 1.3-1.8% (llama, qwen2,
    mistral, llama3; seed 2). Sweeping the std on llama/mistral: 0.05 -> 0.7-0.8%, 0.08 ->
    0.9-1.5%, 0.1 -> 1.6-2.1%, 0.15 -> 3.4-3.6%: the score and value errors of one abs-max
    scale per (token, head) grow with the activations' magnitude, so no kernel change can meet
    1e-2 on these models. Bounded here so a real regression (a wrong scale, a misread block)
    still fails."""
    path, hf = tiny_models[family]
    worst, matched, total = compare_with_hf(path, hf, seed=2)
    assert worst <= 6e-2, worst
    assert matched >= 0.6 * total, (matched, total)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_int8_pool_equals_fake_quantized_float32_pool(family, tiny_models, monkeypatch):
    """The int8 pool's logits against a float32 pool that stores quantize-then-dequantize'd
    K/V (the int8 format's values, float32 kernels): equal to float32 rounding, so the error
    left against HF on the sharpened models is the format's, not the int8 kernels'."""
    from segserve.kernels import quant, reference

    path, _ = tiny_models[family]
    prompt = prompts(1, 3)[0]
    cfg = dict(model=path, block_size=4, max_num_batched_tokens=64)
    int8_tokens, int8_logits = run_recording_logits(
        EngineCore(EngineConfig(kv_dtype="int8", **cfg)), prompt, 12)
    store = reference.store_kv

    def fake_quantized_store(x, cache, scale, slot_mapping):
        if scale is None:
            x = quant.dequantize(*quant.quantize(x), x.dtype)
        store(x, cache, scale, slot_mapping)

    monkeypatch.setattr(reference, "store_kv", fake_quantized_store)
    core = EngineCore(EngineConfig(kv_dtype="auto", **cfg))
    assert core.runner.k_cache.dtype == torch.float32
    fake_tokens, fake_logits = run_recording_logits(core, prompt, 12)
    assert fake_tokens == int8_tokens
    torch.testing.assert_close(fake_logits, int8_logits, rtol=1e-4, atol=1e-4)


def test_int8_kv_halves_kv_bytes_in_the_kv_metrics(tmp_path):
    """Bytes per token (values + scales) from the KV manager's metrics, the bytes a request
    stores, and the pool's capacity for the same memory budget, bf16 against int8, on a tiny
    llama with TinyLlama's head_dim 64."""
    from conftest import make_model

    make_model(tmp_path, "llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    stats = {}
    for kv in ("auto", "int8"):
        core = EngineCore(EngineConfig(model=str(tmp_path), dtype="bfloat16", kv_dtype=kv,
                                       block_size=4, kv_cache_memory_gb=0.001))
        core.add_request(list(range(3, 40)), SamplingParams(max_tokens=3, temperature=0.0))
        core.step()  # the prompt's K/V are stored
        stats[kv] = core.stats()
        spec = core.spec
    assert spec.head_dim == 64
    bf16, int8 = stats["auto"], stats["int8"]
    layers_heads = 2 * spec.num_layers * spec.num_kv_heads  # K and V of every layer
    assert bf16["bytes_per_token"] == layers_heads * 64 * 2
    assert int8["bytes_per_token"] == layers_heads * (64 + 4)  # int8 values + a float32 scale
    ratio = int8["bytes_per_token"] / bf16["bytes_per_token"]
    assert ratio == pytest.approx(68 / 128) and ratio < 0.54
    assert int8["tokens_stored"] == bf16["tokens_stored"] == 37
    assert int8["stored_bytes"] == 37 * int8["bytes_per_token"]
    assert int8["stored_bytes"] / bf16["stored_bytes"] == ratio
    # The same memory budget holds 1/ratio times the blocks, so the autoscaler's KV utilization
    # is measured against the larger pool.
    assert int8["blocks_total"] == int(0.001 * 2**30 // (4 * int8["bytes_per_token"]))
    assert int8["blocks_total"] >= int(bf16["blocks_total"] / ratio) - 1
    assert int8["capacity_bytes"] <= 0.001 * 2**30
    assert int8["used_bytes"] == int8["blocks_used"] * 4 * int8["bytes_per_token"]
    assert int8["utilization"] < bf16["utilization"]


def test_backend_without_int8_kv_is_refused_at_start(tiny_models):
    pytest.importorskip("triton")
    path, _ = tiny_models["llama"]
    with pytest.raises(ValueError, match="kernel backend 'triton'.*int8 KV cache"):
        EngineCore(EngineConfig(model=path, kv_dtype="int8", kernel_backend="triton"))


def test_bad_kv_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="kv_dtype must be 'auto' or 'int8', got 'fp8'"):
        EngineConfig(kv_dtype="fp8")
