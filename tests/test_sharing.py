"""Prompt KV is stored once and shared: by beams, by n samples, by later requests with the same
prefix; and preemption under memory pressure recomputes without changing any output."""

from __future__ import annotations

import random

import pytest
from conftest import hf_greedy
from segserve import LLM, SamplingParams
from segserve.actors import EngineConfig, EngineCore

BLOCK = 4


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [0] + [rng.randrange(3, 256) for _ in range(n - 1)]


def run_until(core: EngineCore, cond) -> None:
    while core.has_work() and not cond():
        core.step()


@pytest.fixture(scope="module")
def llama(tiny_models):
    return tiny_models["llama"]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=9, beam_width=4),
        SamplingParams(max_tokens=9, n=4, temperature=1.0, seed=7, ignore_eos=True),
    ],
)
def test_group_stores_prompt_once(llama, params):
    path, _ = llama
    core = EngineCore(EngineConfig(model=path, block_size=BLOCK))
    p = prompt(30, seed=1)  # 8 prompt blocks, the last one partial
    core.add_request(p, params)
    run_until(
        core,
        lambda: (
            len(core.scheduler.running[0].live_seqs()) == 4 if core.scheduler.running else False
        ),
    )
    for _ in range(4):  # a few decode steps: every sequence has its own response blocks now
        core.step()
    group = core.scheduler.running[0]
    seqs = group.live_seqs()
    assert len(seqs) == 4
    m = core.kv.metrics()
    prompt_blocks = core.kv.blocks_for(len(p))
    response_blocks = {b for s in seqs for b in s.response_blocks}
    # One prompt segment for the whole group, plus the response blocks: nothing else.
    assert len(group.prompt_blocks) == prompt_blocks
    assert m.blocks_used == prompt_blocks + len(response_blocks)
    assert all(core.kv.ref_count[b] == 1 for b in group.prompt_blocks)
    # Each of the 4 sequences sees the 30 prompt tokens; 3 of those copies are never stored.
    assert m.tokens_saved_by_sharing >= 3 * len(p)
    while core.has_work():
        core.step()
    assert core.kv.metrics().blocks_used == 0


def test_prefix_cache_reuse_computes_only_new_tokens(llama):
    path, hf = llama
    core = EngineCore(EngineConfig(model=path, block_size=BLOCK))
    shared = prompt(41, seed=2)
    first, second = shared + [5, 6, 7], shared + [9, 10]
    greedy = SamplingParams(max_tokens=6, temperature=0.0)

    def generate(p):
        rid = core.add_request(p, greedy)
        group = core.groups.get(rid) or core._inbox[-1][1]
        tokens, computed = [], []
        while core.has_work():
            if group.status.value == "running" and not computed:
                computed.append(group.prompt_computed)
            for d in core.step():
                tokens += d.token_ids
        return tokens, group

    out1, g1 = generate(first)
    assert g1.cached_prompt_tokens == 0
    out2, g2 = generate(second)
    # 41 shared tokens = 10 full blocks of 4; all 10 come from the cache.
    assert g2.cached_prompt_tokens == 40
    assert core.kv.metrics().prefix_cache_hit_tokens == 40
    assert out1 == hf_greedy(hf, first, 6)
    assert out2 == hf_greedy(hf, second, 6)


def test_prefill_skips_cached_tokens(llama, monkeypatch):
    """The model only sees the uncached suffix of a prompt whose prefix is cached."""
    path, _ = llama
    core = EngineCore(EngineConfig(model=path, block_size=BLOCK))
    p = prompt(33, seed=3)
    greedy = SamplingParams(max_tokens=2, temperature=0.0)
    core.add_request(p, greedy)
    while core.has_work():
        core.step()
    seen = []
    real = core.runner.execute

    def spy(batch, *args):
        seen.append(sum(item.num_tokens for item in batch))
        return real(batch, *args)

    monkeypatch.setattr(core.runner, "execute", spy)
    core.add_request(p + [11, 12, 13], greedy)
    while core.has_work():
        core.step()
    # 33 tokens -> 8 cached full blocks (32 tokens); 1 + 3 new prompt tokens, then 1 decode.
    assert seen == [4, 1]


def test_identical_prompt_is_fully_served_from_cache_but_last_block(llama):
    path, hf = llama
    core = EngineCore(EngineConfig(model=path, block_size=BLOCK))
    p = prompt(32, seed=4)  # exactly 8 full blocks
    greedy = SamplingParams(max_tokens=5, temperature=0.0)
    outs = []
    for _ in range(2):
        rid = core.add_request(p, greedy)
        toks = []
        while core.has_work():
            for d in core.step():
                if d.request_id == rid:
                    toks += d.token_ids
        outs.append(toks)
    assert core.kv.metrics().prefix_cache_hit_tokens == 28  # the last block is recomputed
    assert outs[0] == outs[1] == hf_greedy(hf, p, 5)


def test_preemption_completes_everything_with_unchanged_output(llama):
    path, hf = llama
    prompts = [prompt(20 + 7 * i, seed=10 + i) for i in range(6)]
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    # 40 blocks of 4 tokens: each request needs up to 16 blocks, all six need ~70.
    llm = LLM(path, block_size=BLOCK, num_kv_blocks=40)
    outs = llm.generate(prompts, greedy)
    assert llm.stats()["preemptions"] > 0
    for p, out in zip(prompts, outs, strict=True):
        assert out.outputs[0].finish_reason in ("length", "stop")
        assert out.outputs[0].token_ids == hf_greedy(hf, p, 24)
    assert llm.stats()["blocks_used"] == 0


def test_preemption_of_beams_and_samples_keeps_results(llama):
    path, _ = llama
    beam = SamplingParams(max_tokens=16, beam_width=3)
    sampled = SamplingParams(max_tokens=16, n=3, temperature=0.8, seed=3)
    p1, p2, p3 = prompt(24, 20), prompt(30, 21), prompt(18, 22)
    alone = LLM(path, block_size=BLOCK)
    want_beam = [c.token_ids for c in alone.generate([p1], beam)[0].outputs]
    want_samples = [c.token_ids for c in alone.generate([p2], sampled)[0].outputs]
    tight = LLM(path, block_size=BLOCK, num_kv_blocks=30)
    outs = tight.generate(
        [p1, p2, p3], [beam, sampled, SamplingParams(max_tokens=16, n=2, temperature=0.0)]
    )
    assert tight.stats()["preemptions"] > 0
    assert [c.token_ids for c in outs[0].outputs] == want_beam
    assert [c.token_ids for c in outs[1].outputs] == want_samples
