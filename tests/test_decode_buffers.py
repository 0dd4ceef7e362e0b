"""Decode steps on fixed, incrementally updated buffers (actors/decode_graphs.py), the path that
CUDA graphs replay, checked on the CPU against HF and against the ordinary per-step path.

A graphable test backend (the CPU ops, reading only device tensors in decode) drives the buffers
eagerly, with padded buckets exactly as a graph would see them, so the row bookkeeping (table
rows rewritten only on change, new blocks, sequences joining and leaving, padding rows, shared
prompt groups) is exercised here; the GPU tests replay the same path as graphs.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import hf_beams, hf_greedy
from segserve import SamplingParams
from segserve.actors import EngineConfig, EngineCore
from segserve.actors import model_runner as model_runner_module
from segserve.actors.decode_graphs import DecodeGraphs, buckets_for
from segserve.kernels.cpu import CPUBackend


class DeviceOnlyDecode(CPUBackend):
    """The CPU ops under the graphable contract: padding slots (< 0) are never written."""

    name = "cpu-graphable"
    graphable = True

    def write_kv(self, k, v, k_cache, v_cache, slot_mapping):
        keep = slot_mapping >= 0
        super().write_kv(k[keep], v[keep], k_cache, v_cache, slot_mapping[keep])


@pytest.fixture
def graphable(monkeypatch):
    """Engines built in the test use DeviceOnlyDecode; returns a counter of decode-path steps."""
    calls = {"steps": 0, "rows": []}
    monkeypatch.setattr(model_runner_module, "get_backend", lambda *a, **k: DeviceOnlyDecode())
    real_run = DecodeGraphs.run

    def counting_run(self, batch):
        calls["steps"] += 1
        calls["rows"].append(len(batch))
        return real_run(self, batch)

    monkeypatch.setattr(DecodeGraphs, "run", counting_run)
    return calls


def prompts(n: int, seed: int, lo: int = 3, hi: int = 30) -> list[list[int]]:
    rng = random.Random(seed)
    return [[0] + [rng.randrange(3, 256) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def run(core: EngineCore, batch, params, stagger: int = 0) -> dict[str, list[int]]:
    """Requests join every ``stagger`` steps; returns token ids by request id."""
    ids, out = [], {}
    for p in batch:
        ids.append(core.add_request(p, params))
        for _ in range(stagger):
            for d in core.step():
                out.setdefault(d.request_id, []).extend(d.token_ids)
    while core.has_work():
        for d in core.step():
            out.setdefault(d.request_id, []).extend(d.token_ids)
    return [out[i] for i in ids]


def test_buckets_cover_the_batch_cap():
    assert buckets_for(1) == [1]
    assert buckets_for(6) == [1, 2, 4, 8]
    assert buckets_for(128) == [1, 2, 4, 8, 16, 32, 64, 128]


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_greedy_through_the_decode_buffers_matches_hf(family, tiny_models, graphable):
    path, hf = tiny_models[family]
    # block 4: a new response block every 4 tokens; 7 requests pad into the bucket of 8;
    # mistral's window of 24 is crossed.
    core = EngineCore(EngineConfig(model=path, block_size=4, max_num_batched_tokens=64,
                                   max_num_seqs=7))
    batch = prompts(7, seed=5)
    got = run(core, batch, SamplingParams(max_tokens=20, temperature=0.0), stagger=2)
    for p, ours in zip(batch, got, strict=True):
        assert ours == hf_greedy(hf, p, 20)
    assert graphable["steps"] > 20 and len(set(graphable["rows"])) > 3  # the batch changed


def test_cached_prompt_first_token_and_shared_prompt_groups(tiny_models, graphable):
    path, hf = tiny_models["llama"]
    core = EngineCore(EngineConfig(model=path, block_size=4, max_num_batched_tokens=64))
    p = prompts(1, seed=9, lo=16, hi=16)[0]
    greedy = SamplingParams(max_tokens=10, temperature=0.0)
    first = run(core, [p], greedy)[0]
    # The prompt is now cached but for its last token: the repeat's first step is one token
    # (a prompt position) through the decode buffers.
    again = run(core, [p], greedy)[0]
    assert first == again == hf_greedy(hf, p, 10)
    assert core.kv.prefix_cache_hit_tokens >= 12
    steps = graphable["steps"]
    # Beams: three rows share one prompt segment (one prompt group in the decode inputs).
    from segserve import LLM

    llm = LLM(path, block_size=4, max_num_batched_tokens=64)
    beams = llm.generate([p], SamplingParams(max_tokens=8, beam_width=3))[0].outputs
    assert [b.token_ids for b in beams] == hf_beams(hf, p, 8, 3)
    assert graphable["steps"] > steps and 3 in graphable["rows"]


def test_seeded_samples_equal_the_per_step_path(tiny_models, monkeypatch):
    path, _ = tiny_models["qwen2"]
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, n=3, seed=11,
                            repetition_penalty=1.2)
    batch = prompts(3, seed=4)
    plain = run(EngineCore(EngineConfig(model=path, block_size=4)), batch, params)
    monkeypatch.setattr(model_runner_module, "get_backend", lambda *a, **k: DeviceOnlyDecode())
    core = EngineCore(EngineConfig(model=path, block_size=4))
    assert core.runner.decode is not None
    assert run(core, batch, params) == plain


def test_padding_rows_never_touch_the_pool(tiny_models, graphable):
    path, _ = tiny_models["llama"]
    core = EngineCore(EngineConfig(model=path, block_size=4, max_num_seqs=8))
    core.runner.k_cache.fill_(7.0)  # finite, so != finds exactly the written slots
    k_before = core.runner.k_cache.clone()
    core.add_request([0, 5, 6], SamplingParams(max_tokens=3, temperature=0.0))
    while core.has_work():
        core.step()
    # Only the request's own slots changed: prompt (3) + 2 response tokens written, 5 slots.
    changed = (core.runner.k_cache != k_before).flatten(3).any(-1)  # [layers, blocks, slots]
    assert int(changed[0].sum()) == 5
    assert graphable["rows"] == [1, 1]


def test_slot_of_last_token_matches_the_kv_manager(tiny_models, graphable):
    # Hand-checked slot arithmetic: the decode inputs for one running sequence.
    path, _ = tiny_models["llama"]
    core = EngineCore(EngineConfig(model=path, block_size=4, max_num_seqs=2))
    core.add_request([0, 7, 8, 9, 10, 11], SamplingParams(max_tokens=4, temperature=0.0))
    core.step()  # prefill: 6 prompt tokens, first output sampled
    core.step()  # first decode step: position 6 = response slot 0
    inputs = core.runner.decode.inputs
    seq = next(iter(core.groups.values())).seqs[0]
    assert int(inputs.h_long[1, 0]) == 6
    assert int(inputs.h_long[2, 0]) == seq.response_blocks[0] * 4 + 0
    assert int(inputs.h_int[0, 0]) == 6 and int(inputs.h_int[1, 0]) == 1
    assert int(inputs.h_long[2, 1]) == -1  # bucket 2's padding row
    assert torch.equal(inputs.d_long, inputs.h_long)
