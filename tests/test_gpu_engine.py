"""The engine on a CUDA GPU, end to end: the Triton backend with and without CUDA graphs against HF
transformers on the same GPU (greedy and beams, token-identical in float32), seeded sampling
against the reference backend on the same GPU, prefix reuse. Skips cleanly without CUDA."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import FAMILIES, hf_beams, hf_greedy
from segserve import LLM, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def prompts(n: int, seed: int, lo: int = 3, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[0] + [rng.randrange(3, 256) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@pytest.fixture(scope="module")
def gpu_models(tiny_models):
    return {f: (path, hf.to("cuda")) for f, (path, hf) in tiny_models.items()}


def llm(path: str, **kw) -> LLM:
    kw.setdefault("kernel_backend", "triton")
    # A fixed pool: engines of earlier tests may still hold GPU memory.
    return LLM(path, device="cuda", dtype="float32", block_size=16, max_num_batched_tokens=256,
               num_kv_blocks=512, **kw)


@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_batch_matches_hf_on_gpu(family, graphs, gpu_models):
    path, hf = gpu_models[family]
    engine = llm(path, cuda_graphs=graphs)
    assert engine.engine.runner.backend.name == "triton"
    assert (engine.engine.runner.decode.use_graphs if graphs else True)
    batch = prompts(6, seed=1, hi=300)  # over the step budget: chunked prefill, several splits
    outs = engine.generate(batch, SamplingParams(max_tokens=24, temperature=0.0))
    for p, out in zip(batch, outs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(hf, p, 24)


def test_beams_and_prefix_reuse_match_hf_on_gpu(gpu_models):
    path, hf = gpu_models["llama"]
    engine = llm(path)
    p = prompts(1, seed=2, lo=40, hi=40)[0]
    beams = engine.generate([p], SamplingParams(max_tokens=12, beam_width=4))[0].outputs
    assert [b.token_ids for b in beams] == hf_beams(hf, p, 12, 4)
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    first = engine.generate([p], greedy)[0]
    again = engine.generate([p], greedy)[0]
    assert again.num_cached_tokens >= 32
    assert first.outputs[0].token_ids == again.outputs[0].token_ids == hf_greedy(hf, p, 12)


def test_seeded_sampling_equals_the_reference_backend_on_gpu(gpu_models):
    path, _ = gpu_models["qwen2"]
    params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.95, top_k=40, n=3, seed=5,
                            presence_penalty=0.5, logprobs=2)
    batch = prompts(3, seed=3)
    ours = llm(path).generate(batch, params)
    ref = llm(path, kernel_backend="reference").generate(batch, params)
    for a, b in zip(ours, ref, strict=True):
        assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
        for oa, ob in zip(a.outputs, b.outputs, strict=True):
            got = [e.logprob for e in oa.logprobs]
            want = [e.logprob for e in ob.logprobs]
            assert got == pytest.approx(want, abs=1e-4)
