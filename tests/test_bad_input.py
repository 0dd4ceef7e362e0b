"""Bad input gets a clear ValueError naming the problem, and the engine keeps serving.

Covers invalid SamplingParams (each field), bad prompts (empty, out of vocabulary, too long),
broken model directories (missing, no config, unknown architecture, corrupt or incomplete
safetensors, unknown dtype), and aborting one request of a running batch. After each error a
valid request on the same engine must still give HF's greedy tokens.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct

import pytest
from conftest import hf_greedy_no_eos, make_model
from segserve import LLM, SamplingParams
from segserve.actors import EngineConfig, EngineCore
from segserve.models.loader import ModelLoadError

MAX_LEN = 64
GOOD_PROMPT = [0, 17, 99, 23, 54, 120]
GOOD_PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad-input") / "llama"
    path.mkdir()
    hf = make_model(path, "llama")
    return path, hf, hf_greedy_no_eos(hf, GOOD_PROMPT, 8)


@pytest.fixture(scope="module")
def llm(model):
    return LLM(str(model[0]), block_size=4, num_kv_blocks=64, max_model_len=MAX_LEN, max_num_seqs=8)


@pytest.fixture
def serves(llm, model):
    """Run after the test body: the same LLM still answers a valid request correctly, and the
    failed calls left nothing queued or allocated."""
    yield
    engine = llm.engine
    assert not engine.has_work() and not engine.groups
    assert engine.kv.metrics().blocks_used == 0
    out = llm.generate([GOOD_PROMPT], GOOD_PARAMS)[0].outputs[0]
    assert out.token_ids == model[2] and out.finish_reason == "length"


# ----- SamplingParams -------------------------------------------------------------------------

BAD_PARAMS = [
    ("n", dict(n=0)),
    ("n", dict(n=-3)),
    ("n", dict(n=2.5)),
    ("max_tokens", dict(max_tokens=-1)),
    ("max_tokens", dict(max_tokens=4.0)),
    ("min_tokens", dict(min_tokens=-1)),
    ("min_tokens", dict(min_tokens=9, max_tokens=8)),
    ("logit_bias", dict(logit_bias={1: 200})),
    ("logit_bias", dict(logit_bias={-1: 2})),
    ("allowed_token_ids", dict(allowed_token_ids=[])),
    ("bad_words", dict(bad_words=[""])),
    ("structured", dict(structured={"regex": 3})),
    ("structured", dict(structured={"json": {}, "regex": "a"})),
    ("prompt_logprobs", dict(prompt_logprobs=21)),
    ("max_tokens", dict(max_tokens=0, beam_width=2)),
    ("temperature", dict(temperature=-0.1)),
    ("temperature", dict(temperature=101.0)),
    ("temperature", dict(temperature=math.nan)),
    ("top_k", dict(top_k=-2)),
    ("top_k", dict(top_k=2.5)),
    ("top_p", dict(top_p=0.0)),
    ("top_p", dict(top_p=1.01)),
    ("top_p", dict(top_p=math.nan)),
    ("min_p", dict(min_p=-0.01)),
    ("min_p", dict(min_p=1.5)),
    ("repetition_penalty", dict(repetition_penalty=0.0)),
    ("repetition_penalty", dict(repetition_penalty=10.5)),
    ("presence_penalty", dict(presence_penalty=2.5)),
    ("presence_penalty", dict(presence_penalty=-2.01)),
    ("frequency_penalty", dict(frequency_penalty=3.0)),
    ("frequency_penalty", dict(frequency_penalty=-7.0)),
    ("seed", dict(seed=1.5)),
    ("seed", dict(seed="42")),
    ("stop", dict(stop=[""])),
    ("stop", dict(stop=["ok", 3])),
    ("stop_token_ids", dict(stop_token_ids=[-1])),
    ("stop_token_ids", dict(stop_token_ids=[2.0])),
    ("logprobs", dict(logprobs=-1)),
    ("logprobs", dict(logprobs=21)),
    ("logprobs", dict(logprobs=1.5)),
    ("beam_width", dict(beam_width=0)),
    ("beam_width", dict(beam_width=65)),
    ("early_stopping", dict(early_stopping="sometimes", beam_width=2)),
    ("n", dict(n=3, beam_width=2)),  # beam search returns beam_width beams
    ("stop", dict(stop=["x"], beam_width=2)),  # not with beam search
    ("logprobs", dict(logprobs=1, beam_width=2)),
    # Lists read on every step (bad_words: tokenized on the event loop) are bounded: past the
    # bound one request slowed every other one's steps, or blocked its replica.
    ("top_k", dict(top_k=2**63)),
    ("stop", dict(stop=[f"s{i}" for i in range(65)])),
    ("stop", dict(stop=["x" * 1025])),
    ("stop_token_ids", dict(stop_token_ids=[5] * 16385)),
    ("allowed_token_ids", dict(allowed_token_ids=[5] * 16385)),
    ("logit_bias", dict(logit_bias={i: 1.0 for i in range(16385)})),
    ("logit_bias", dict(logit_bias={"\u00b2": 1.0})),  # a digit to str.isdigit(), not int()
    ("bad_words", dict(bad_words=[f"w{i}" for i in range(1025)])),
    ("stop", dict(stop={"a": 1})),  # a mapping is no list, though its keys are strings
    ("bad_words", dict(bad_words={"w": 1})),
]


@pytest.mark.parametrize("field,kwargs", BAD_PARAMS, ids=[f"{f}={v}" for f, v in BAD_PARAMS])
def test_invalid_sampling_params_name_the_field(field, kwargs):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        SamplingParams(**kwargs)


BAD_TYPES = [
    ("temperature", dict(temperature="0.7")),
    ("temperature", dict(temperature=None)),
    ("top_p", dict(top_p="high")),
    ("stop", dict(stop=5)),
    ("stop_token_ids", dict(stop_token_ids=7)),
    ("length_penalty", dict(length_penalty="x", beam_width=2)),
]


@pytest.mark.parametrize("field,kwargs", BAD_TYPES, ids=[f"{f}={v!r}" for f, v in BAD_TYPES])
def test_wrongly_typed_sampling_params_name_the_field(field, kwargs):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        SamplingParams(**kwargs)


def test_bad_length_penalty_is_rejected_before_it_reaches_the_engine():
    for bad in ("x", float("nan"), None):
        with pytest.raises(ValueError, match="length_penalty"):
            SamplingParams(beam_width=2, max_tokens=4, length_penalty=bad)


def test_a_request_whose_sampling_fails_is_failed_alone(model, monkeypatch):
    """An unexpected error while sampling one request ends that request with finish_reason
    'error'; the engine loop survives and the other requests finish unchanged."""
    from segserve.actors import token_updates as engine_module

    core = EngineCore(EngineConfig(model=str(model[0]), block_size=4, num_kv_blocks=64))

    def broken_beam_step(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(engine_module, "beam_step", broken_beam_step)
    bad = core.add_request(GOOD_PROMPT, SamplingParams(beam_width=2, max_tokens=4))
    good = core.add_request(GOOD_PROMPT, GOOD_PARAMS)
    reasons, tokens = {}, []
    for _ in range(100):
        if not core.has_work():
            break
        for d in core.step():
            if d.request_id == good:
                tokens += d.token_ids
            if d.finish_reason:
                reasons[d.request_id] = d.finish_reason
    assert not core.has_work()
    assert reasons[bad] == "error" and reasons[good] == "length"
    assert tokens == hf_greedy_no_eos(model[1], GOOD_PROMPT, 8)
    assert core.kv.metrics().blocks_used == 0


def test_params_that_are_not_sampling_params_are_rejected(llm, serves):
    with pytest.raises(ValueError, match="SamplingParams"):
        llm.engine.add_request(GOOD_PROMPT, {"temperature": 0.0})
    with pytest.raises(ValueError, match="one SamplingParams, or one per prompt"):
        llm.generate([GOOD_PROMPT, GOOD_PROMPT], [GOOD_PARAMS])


# ----- prompts --------------------------------------------------------------------------------


def test_empty_prompts_are_rejected(llm, serves):
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate("", GOOD_PARAMS)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate([[]], GOOD_PARAMS)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.engine.add_request([], GOOD_PARAMS)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.engine.add_request("", GOOD_PARAMS)
    with pytest.raises(ValueError, match="prompts is empty"):
        llm.generate([], GOOD_PARAMS)


@pytest.mark.parametrize("bad", [256, 300, -1, 10**9])
def test_out_of_vocab_token_ids_are_rejected(llm, serves, bad):
    with pytest.raises(
        ValueError, match=rf"token id {bad} is outside the model's vocabulary \[0, 256\)"
    ):
        llm.generate([[0, 5, bad, 7]], GOOD_PARAMS)


@pytest.mark.parametrize("bad", [[0, 1.5], [0, True], [0, "7"], [0, None]])
def test_non_integer_token_ids_are_rejected(llm, serves, bad):
    with pytest.raises(ValueError, match="token ids must be integers"):
        llm.engine.add_request(bad, GOOD_PARAMS)


def test_prompts_of_other_types_are_rejected(llm, serves):
    with pytest.raises(ValueError, match="string or a list of token ids, not int"):
        llm.engine.add_request(42, GOOD_PARAMS)
    with pytest.raises(ValueError, match="not NoneType"):
        llm.engine.add_request(None, GOOD_PARAMS)


def test_text_prompt_whose_tokens_are_outside_the_model_vocab_is_rejected(llm, serves):
    assert max(llm.tokenizer("a\u00a0b").input_ids) >= 256  # the tokenizer is larger
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate("a\u00a0b", GOOD_PARAMS)


def test_list_bounds_are_inclusive():
    SamplingParams(stop=[f"s{i}" for i in range(64)], stop_token_ids=[5] * 16384,
                   allowed_token_ids=[5] * 16384, bad_words=["w"] * 1024, top_k=2**31 - 1)


def test_stop_token_ids_outside_the_vocab_are_rejected(llm, serves):
    # min_tokens masks the stop ids on the device: an id past the vocabulary was an IndexError
    # there (a 500), not a 400.
    with pytest.raises(ValueError, match="stop_token_ids: token id 1000000000 is outside"):
        llm.generate([GOOD_PROMPT], SamplingParams(max_tokens=4, min_tokens=2,
                                                   stop_token_ids=[1000000000]))


def test_bad_words_are_tokenized_once_per_distinct_sequence(llm):
    engine, tok = llm.engine, llm.tokenizer
    words = ["ab", "ab", " ab", "c d"]
    expect: list[list[int]] = []
    for w in words:  # vLLM's rule, one word at a time: the word, and the word after a space
        for text in (w.lstrip(), " " + w.lstrip()):
            ids = tok(text, add_special_tokens=False).input_ids
            if ids and ids not in expect:
                expect.append(ids)
    assert engine._bad_words_ids(words) == expect


def test_prompt_plus_max_tokens_over_max_model_len(llm, serves):
    prompt = [0] + [5] * 59  # 60 tokens
    with pytest.raises(ValueError, match=r"\(60 tokens\) \+ max_tokens \(5\) = 65 .*max length 64"):
        llm.generate([prompt], SamplingParams(max_tokens=5))
    with pytest.raises(ValueError, match="max length 64"):
        llm.generate([[0] * 70], SamplingParams(max_tokens=1))
    # exactly at the limit is fine, and the sequence stops there
    out = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4 and out[0].outputs[0].finish_reason == "length"


def test_one_bad_prompt_fails_the_whole_call_before_anything_is_queued(llm, serves):
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        llm.generate([GOOD_PROMPT, [0, 999], GOOD_PROMPT], GOOD_PARAMS)
    assert not llm.engine.has_work()


def test_more_sequences_than_allowed(llm, serves):
    with pytest.raises(ValueError, match="max_num_seqs 8"):
        llm.generate([GOOD_PROMPT], SamplingParams(n=9))
    small = EngineCore(EngineConfig(model=llm.config.model, block_size=4, num_kv_blocks=8))
    with pytest.raises(ValueError, match="KV blocks but the pool holds"):
        small.add_request(GOOD_PROMPT, SamplingParams(n=7))  # 2 prompt + 7 response blocks > 8


def test_request_that_can_never_fit_the_kv_pool_is_rejected(model):
    core = EngineCore(EngineConfig(model=str(model[0]), block_size=4, num_kv_blocks=5))
    # 6 prompt tokens (2 blocks) + 60 new tokens (15 blocks) > 5 blocks, whatever happens
    with pytest.raises(ValueError, match="KV blocks"):
        core.add_request(GOOD_PROMPT, SamplingParams(max_tokens=60, ignore_eos=True))


def test_request_that_exactly_fits_the_kv_pool_completes(model):
    core = EngineCore(EngineConfig(model=str(model[0]), block_size=4, num_kv_blocks=4))
    # 2 prompt blocks + 8 tokens in 2 response blocks: the last token's KV is never written
    rid = core.add_request(
        GOOD_PROMPT, SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
    )
    tokens = []
    for _ in range(100):
        if not core.has_work():
            break
        tokens += [t for d in core.step() if d.request_id == rid for t in d.token_ids]
    assert not core.has_work()
    assert tokens[:8] == model[2] and len(tokens) == 9


# ----- model directories ------------------------------------------------------------------------


def clone(model, tmp_path, name="m"):
    dst = tmp_path / name
    shutil.copytree(model[0], dst)
    return dst


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def load(path, **kwargs):
    return LLM(str(path), **{"num_kv_blocks": 16, **kwargs})


def test_missing_model_dir(tmp_path):
    with pytest.raises(ModelLoadError, match=r"model '.*nope' does not exist"):
        load(tmp_path / "nope")
    assert issubclass(ModelLoadError, ValueError)


def test_dir_without_config_json(model, tmp_path):
    path = clone(model, tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(ValueError, match="has no config.json"):
        load(path)


def test_unknown_architecture(model, tmp_path):
    path = clone(model, tmp_path)
    edit_config(path, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ValueError, match=r"unsupported model architecture \['GPT2LMHeadModel'\]"):
        load(path)


def test_model_type_transformers_does_not_know(model, tmp_path):
    path = clone(model, tmp_path)
    edit_config(path, architectures=["FooForCausalLM"], model_type="foo")
    with pytest.raises(ValueError, match=r"config\.json.*foo"):
        load(path)


def corrupt(path, how: str) -> None:
    file = path / "model.safetensors"
    data = file.read_bytes()
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "header_only":
        (n,) = struct.unpack("<Q", data[:8])
        data = data[: 8 + n]
    elif how == "huge_header_length":
        data = b"\xff" * 8 + data[8:]
    elif how == "garbage_header":
        (n,) = struct.unpack("<Q", data[:8])
        data = data[:8] + b"#" * n + data[8 + n :]
    elif how == "empty":
        data = b""
    file.write_bytes(data)


@pytest.mark.parametrize(
    "how", ["truncated", "header_only", "huge_header_length", "garbage_header", "empty"]
)
def test_corrupt_safetensors(model, tmp_path, how):
    path = clone(model, tmp_path)
    corrupt(path, how)
    with pytest.raises(
        ValueError, match=r"corrupt or unreadable safetensors file .*model\.safetensors"
    ):
        load(path)


def rewrite_weights(path, edit) -> None:
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "name,ours",
    [
        ("model.layers.1.mlp.down_proj.weight", "layers.1.mlp.down_proj.weight"),
        ("model.layers.0.self_attn.k_proj.weight", "layers.0.self_attn.qkv_proj.weight"),
        ("model.layers.1.mlp.up_proj.weight", "layers.1.mlp.gate_up_proj.weight"),
        ("model.norm.weight", "norm.weight"),
        ("lm_head.weight", "lm_head.weight"),
    ],
)
def test_checkpoint_missing_a_tensor(model, tmp_path, name, ours):
    path = clone(model, tmp_path)
    rewrite_weights(path, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=rf"(missing weights for:|no) .*{re.escape(ours)}"):
        load(path)


def test_checkpoint_tensor_of_the_wrong_shape(model, tmp_path):
    path = clone(model, tmp_path)

    def shrink(t):
        t["model.norm.weight"] = t["model.norm.weight"][:10].clone()

    rewrite_weights(path, shrink)
    with pytest.raises(
        ValueError, match=r"'model.norm.weight' has shape \(10,\), expected \(64,\)"
    ):
        load(path)


def test_dir_without_weights(model, tmp_path):
    path = clone(model, tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no \*\.safetensors weights"):
        load(path)


@pytest.mark.parametrize("dtype", ["float8", "int8", "fp32", None])
def test_unknown_dtype(model, dtype):
    with pytest.raises(ValueError, match=rf"unsupported dtype {dtype!r}"):
        load(model[0], dtype=dtype)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(block_size=3), "block_size"),
        (dict(num_kv_blocks=0), "num_kv_blocks"),
        (dict(max_num_seqs=0), "max_num_seqs"),
        (dict(max_num_batched_tokens=8), "max_num_batched_tokens"),
    ],
)
def test_bad_engine_config(model, kwargs, field):
    with pytest.raises(ValueError, match=field):
        load(model[0], **kwargs)


def test_a_good_model_loads_after_the_broken_ones(model):
    out = load(model[0]).generate([GOOD_PROMPT], GOOD_PARAMS)[0].outputs[0]
    assert out.token_ids == model[2]


# ----- abort --------------------------------------------------------------------------------------


def held_blocks(groups) -> set[int]:
    out = set()
    for g in groups:
        out |= set(g.prompt_blocks)
        for s in g.seqs:
            out |= set(s.response_blocks)
    return out


def submit(core, prompt, params, rid=None):
    """Queue a request and keep its group, to build its output after the engine drops it."""
    group = core.make_request(prompt, params, rid)
    core.submit(group)
    return group


def run_alone(path, prompt, params) -> list[list[int]]:
    core = EngineCore(EngineConfig(model=str(path), block_size=4, num_kv_blocks=128))
    group = submit(core, prompt, params)
    while core.has_work():
        core.step()
    return [c.token_ids for c in core.build_output(group).outputs]


def test_abort_mid_generation_frees_blocks_and_spares_the_batch(model):
    path, hf, _ = model
    core = EngineCore(EngineConfig(model=str(path), block_size=4, num_kv_blocks=128))
    idle = core.kv.metrics().blocks_used
    assert idle == 0

    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    sampled = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=10, ignore_eos=True)
    requests = {
        "a": ([0, 11, 12, 13, 14, 15, 16, 17, 18, 19], greedy),
        "victim": ([0, 30, 31, 32, 33, 34, 35, 36, 37], greedy),
        "b": ([0, 50, 51, 52], sampled),
        "c": ([0, 70, 71, 72, 73, 74, 75], greedy),
    }
    groups = {rid: submit(core, p, params, rid) for rid, (p, params) in requests.items()}
    victim = groups["victim"]
    while len(victim.seqs[0].output_ids) < 4:
        core.step()
    victim_blocks = held_blocks([victim])
    assert victim_blocks and all(core.kv.ref_count[b] == 1 for b in victim_blocks)

    core.abort("victim")
    deltas = core.step()
    aborted = [d for d in deltas if d.request_id == "victim"]
    assert [(d.index, d.finish_reason, d.token_ids) for d in aborted] == [(0, "abort", [])]
    assert all(core.kv.ref_count[b] == 0 for b in victim_blocks)
    others = list(core.groups.values())
    assert "victim" not in core.groups and others
    assert core.kv.metrics().blocks_used == len(held_blocks(others))

    core.abort("victim")  # twice, and an unknown id: no-ops
    core.abort("no-such-request")
    while core.has_work():
        assert all(d.request_id != "victim" for d in core.step())
    m = core.kv.metrics()
    assert m.blocks_used == idle and m.blocks_free + m.blocks_cached == m.blocks_total
    assert victim.seqs[0].finish_reason == "abort" and len(victim.seqs[0].output_ids) < 12

    for rid in ("a", "b", "c"):
        prompt, params = requests[rid]
        outs = core.build_output(groups[rid]).outputs
        assert all(c.finish_reason == "length" for c in outs)
        tokens = [c.token_ids for c in outs]
        assert tokens == run_alone(path, prompt, params)
        if params.temperature == 0.0:
            assert tokens == [hf_greedy_no_eos(hf, prompt, 12)]


def test_abort_of_a_waiting_request(model):
    core = EngineCore(EngineConfig(model=str(model[0]), block_size=4, num_kv_blocks=64))
    core.add_request(GOOD_PROMPT, GOOD_PARAMS, request_id="w")
    core.abort("w")
    deltas = core.step()
    assert [(d.request_id, d.finish_reason) for d in deltas] == [("w", "abort")]
    assert not core.has_work() and core.kv.metrics().blocks_used == 0
