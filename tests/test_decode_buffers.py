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
from segserve.actors.decode_graphs import buckets_for
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
    calls = {"steps": 0, "rows": [], "lookahead": 0}
    monkeypatch.setattr(model_runner_module, "get_backend", lambda *a, **k: DeviceOnlyDecode())
    real_run = model_runner_module.ModelRunner.run_decode

    def counting_run(self, copies, rows, n, token_source, ids_on_device):
        calls["steps"] += 1
        calls["rows"].append(n)
        calls["lookahead"] += token_source is not None
        return real_run(self, copies, rows, n, token_source, ids_on_device)

    monkeypatch.setattr(model_runner_module.ModelRunner, "run_decode", counting_run)
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
    assert graphable["lookahead"] > 10  # steps launched before the last one's tokens were read


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


@pytest.mark.parametrize("params", [
    # penalties read host state: sampled on the host after each step
    SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, n=3, seed=11,
                   repetition_penalty=1.2),
    # plain sampling: chosen on the device, the next step launched before the host reads it
    SamplingParams(max_tokens=12, temperature=0.9, top_k=20, min_p=0.05, n=2, seed=3,
                   logprobs=2),
    SamplingParams(max_tokens=16, temperature=0.0, stop=["a"], include_stop_str_in_output=True),
    # static constraints stay on the device; min_tokens counts the token still in flight
    SamplingParams(max_tokens=12, temperature=0.9, seed=5, min_tokens=7, logit_bias={1: 6.0},
                   allowed_token_ids=list(range(120)), bad_words=["a"]),
    # a grammar's state moves with every token: sampled after the host has it
    SamplingParams(max_tokens=12, temperature=0.9, seed=2, n=2, structured={"regex": "[a-f]+"}),
], ids=["penalties", "plain", "stop-string", "constraints", "grammar"])
def test_seeded_samples_equal_the_per_step_path(params, tiny_models, monkeypatch):
    path, _ = tiny_models["qwen2"]
    batch = prompts(3, seed=4)

    def outputs(core):
        groups = [core.make_request(p, params) for p in batch]
        for g in groups:
            core.submit(g)
        while core.has_work():
            core.step()
        return [core.build_output(g).outputs for g in groups]

    plain = outputs(EngineCore(EngineConfig(model=path, block_size=4)))
    monkeypatch.setattr(model_runner_module, "get_backend", lambda *a, **k: DeviceOnlyDecode())
    core = EngineCore(EngineConfig(model=path, block_size=4))
    assert core.runner.decode is not None
    ours = outputs(core)
    for got, want in zip(ours, plain, strict=True):
        assert [(o.token_ids, o.text, o.finish_reason) for o in got] == [
            (o.token_ids, o.text, o.finish_reason) for o in want]
        for o, w in zip(got, want, strict=True):
            if w.logprobs is not None:  # the same function, computed in another batch shape
                assert [e.token_id for e in o.logprobs] == [e.token_id for e in w.logprobs]
                assert [e.logprob for e in o.logprobs] == pytest.approx(
                    [e.logprob for e in w.logprobs], abs=1e-5)
    assert core.kv.metrics().blocks_used == 0


def test_abort_while_a_step_is_in_flight_frees_everything(tiny_models, graphable):
    path, _ = tiny_models["llama"]
    core = EngineCore(EngineConfig(model=path, block_size=4))
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    ids = [core.add_request(p, params) for p in prompts(3, seed=6)]
    for _ in range(6):
        core.step()
    assert core._inflight is not None
    core.abort(ids[1])
    reasons = {}
    while core.has_work():
        for d in core.step():
            if d.finish_reason:
                reasons[(d.request_id, d.index)] = d.finish_reason
    assert reasons == {(ids[0], 0): "length", (ids[1], 0): "abort", (ids[2], 0): "length"}
    assert core.kv.metrics().blocks_used == 0 and graphable["lookahead"] > 0


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
    assert int(inputs.host.long[1, 0]) == 6
    assert int(inputs.host.long[2, 0]) == seq.response_blocks[0] * 4 + 0
    assert int(inputs.host.int[0, 0]) == 6 and int(inputs.host.int[1, 0]) == 1
    assert int(inputs.host.long[2, 1]) == -1  # bucket 2's padding row
    assert torch.equal(inputs.d_long, inputs.host.long)


def test_a_failed_lookahead_launch_runs_its_requests_again(tiny_models, graphable,
                                                           monkeypatch):
    """The lookahead step (input ids from the device, the previous tokens not read yet) fails
    once: its requests are suspects, run again apart (EngineCore._isolate), and finish with
    the tokens of a clean run; nothing leaks."""
    path, _ = tiny_models["llama"]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    batch = prompts(2, seed=8)
    clean = run(EngineCore(EngineConfig(model=path, block_size=4)), batch, params)
    core = EngineCore(EngineConfig(model=path, block_size=4))
    real = core.runner.execute
    launches = {"lookahead": 0}

    def failing(batch, copies, token_source=None, *rest):
        if token_source is not None:
            launches["lookahead"] += 1
            if launches["lookahead"] == 1:
                raise RuntimeError("injected")
        return real(batch, copies, token_source, *rest)

    monkeypatch.setattr(core.runner, "execute", failing)
    assert run(core, batch, params) == clean
    assert launches["lookahead"] > 1  # the lookahead resumed once the suspects were cleared
    assert not core.has_work() and core.kv.metrics().blocks_used == 0
