"""The engine's logits constraints and prompt scoring on a tiny model, against HF forward passes
of the same checkpoint: prompt log-probs (chunked prefill, prefix cache), max_tokens 0,
min_tokens, bad words, allowed ids, and grammars (xgrammar: regex, choice, JSON schema)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from conftest import make_model
from segserve import LLM, SamplingParams

EOS = 1


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("constraints-llama")
    return str(path), make_model(path, "llama")


@pytest.fixture(scope="module")
def llm(model):
    # 64-token chunks: a 150-token prompt is scored over three prefill steps
    return LLM(model[0], block_size=4, num_kv_blocks=512, max_num_batched_tokens=64)


def hf_log_softmax(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)


PROMPT = [0] + [(7 * i) % 250 + 3 for i in range(149)]


def check_prompt_logprobs(out, ref: torch.Tensor, prompt: list[int], k: int) -> None:
    entries = out.prompt_logprobs
    assert len(entries) == len(prompt) - 1  # the first token has nothing to be predicted from
    for p, e in enumerate(entries):  # position p predicts prompt token p + 1
        assert e.token_id == prompt[p + 1]
        assert e.logprob == pytest.approx(ref[p, prompt[p + 1]].item(), abs=1e-4)
        vals, ids = torch.topk(ref[p], k)
        assert [t for t, _ in e.top] == ids.tolist()
        assert [v for _, v in e.top] == pytest.approx(vals.tolist(), abs=1e-4)


def test_prompt_logprobs_equal_hf_over_chunks_and_skip_the_prefix_cache(llm, model):
    ref = hf_log_softmax(model[1], PROMPT)
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3)
    first = llm.generate([PROMPT], params)[0]
    check_prompt_logprobs(first, ref, PROMPT, 3)
    # the same prompt again: its blocks are cached now, but scoring needs the hidden states
    again = llm.generate([PROMPT], params)[0]
    assert again.num_cached_tokens == 0
    check_prompt_logprobs(again, ref, PROMPT, 3)
    # a request that does not score its prompt still takes the cache
    plain = llm.generate([PROMPT], SamplingParams(max_tokens=2, temperature=0.0))[0]
    assert plain.num_cached_tokens > 100 and plain.prompt_logprobs is None
    assert plain.outputs[0].token_ids == first.outputs[0].token_ids


def test_max_tokens_zero_scores_the_prompt_and_generates_nothing(llm, model):
    prompt = PROMPT[:40]
    ref = hf_log_softmax(model[1], prompt)
    out = llm.generate([prompt], SamplingParams(max_tokens=0, n=2, prompt_logprobs=0))[0]
    assert [(c.index, c.token_ids, c.finish_reason) for c in out.outputs] == [
        (0, [], "length"), (1, [], "length")]
    check_prompt_logprobs(out, ref, prompt, 0)
    assert llm.stats()["blocks_used"] == 0


def greedy_no(hf, prompt: list[int], n: int, banned) -> list[int]:
    """Greedy by forward passes, never choosing what ``banned(output so far)`` names."""
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1].clone()
        logits[list(banned(ids[len(prompt):]))] = float("-inf")
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def test_min_tokens_masks_eos_until_the_output_is_long_enough(llm, model):
    prompt = PROMPT[:12]
    # a bias makes EOS the greedy choice at every step: it can only come after min_tokens
    params = SamplingParams(max_tokens=10, temperature=0.0, min_tokens=4, logit_bias={EOS: 100})
    out = llm.generate([prompt], params)[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == EOS
    assert out.token_ids[:-1] == greedy_no(model[1], prompt, 4, lambda _: [EOS])


def test_bad_words_and_allowed_token_ids(llm, model):
    tok, hf = llm.tokenizer, model[1]
    prompt = PROMPT[:9]
    free = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0))[0].outputs[0]
    # ban the first word the model would say (as text, as the API takes it)
    word = tok.decode(free.token_ids[:1]).strip()
    assert word
    banned_ids = [list(tok(w, add_special_tokens=False).input_ids) for w in (word, " " + word)]
    singles = {ids[0] for ids in banned_ids if len(ids) == 1}

    def banned(out: list[int]):
        multi = [ids[-1] for ids in banned_ids
                 if len(ids) > 1 and out[len(out) - len(ids) + 1:] == ids[:-1]]
        return singles | set(multi)

    got = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0,
                                                bad_words=[word]))[0].outputs[0]
    assert got.token_ids == greedy_no(hf, prompt, 6, banned)
    assert got.token_ids != free.token_ids
    allowed = [5, 17, 200]
    got = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0,
                                                allowed_token_ids=allowed))[0].outputs[0]
    others = [t for t in range(hf.config.vocab_size) if t not in allowed]
    assert got.token_ids == greedy_no(hf, prompt, 6, lambda _: others)


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "size": {"enum": ["S", "M", "L"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "size", "n"],
    "additionalProperties": False,
}


def test_grammars_constrain_every_sample_and_leave_other_rows_alone(llm):
    prompts = [PROMPT[:5 + i] for i in range(6)]
    plain = SamplingParams(max_tokens=8, temperature=0.0)
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts[:2], plain)]
    specs = [
        ({"regex": r"[a-c]{2,4}-[0-9]"}, lambda t: re.fullmatch(r"[a-c]{2,4}-[0-9]", t)),
        ({"choice": ["yes", "no", "maybe so"]}, lambda t: t in ("yes", "no", "maybe so")),
        ({"json": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
        ({"json_object": True}, lambda t: isinstance(json.loads(t), dict)),
    ]
    params = [plain, plain] + [SamplingParams(max_tokens=60, temperature=1.0, seed=i, n=2,
                                              structured=spec) for i, (spec, _) in enumerate(specs)]
    outs = llm.generate(prompts, params)
    # unconstrained rows batched with constrained ones choose exactly as alone
    assert [o.outputs[0].token_ids for o in outs[:2]] == alone
    for out, (spec, ok) in zip(outs[2:], specs, strict=True):
        for c in out.outputs:
            if spec.get("json_object") and c.finish_reason == "length":
                continue  # an unbounded object may run out of tokens on a random model
            assert c.finish_reason == "stop" and c.token_ids[-1] == EOS, (spec, c.text)
            assert ok(c.text), (spec, c.text)


def test_a_finished_grammar_ends_the_reply_before_min_tokens(llm):
    params = SamplingParams(max_tokens=20, min_tokens=15, temperature=0.0,
                            structured={"choice": ["yes", "no"]})
    out = llm.generate([PROMPT[:6]], params)[0].outputs[0]
    assert out.text in ("yes", "no") and out.finish_reason == "stop"


def test_a_grammar_is_compiled_once_and_bad_ones_are_named(llm):
    grammars = llm.engine.grammars
    spec = {"regex": "x{1,3}"}
    before = grammars.compiles
    for _ in range(3):
        llm.generate([PROMPT[:4]], SamplingParams(max_tokens=4, structured=spec))
    assert grammars.compiles == before + 1
    for spec, words in [
        ({"json": {"type": "object", "properties": {"a": {"type": "nonsense"}}}},
         "properties/a/type"),
        ({"json": {"type": "integer", "minimum": "x"}}, "minimum"),
        ({"json": "{not json"}, "not valid JSON"),
        ({"regex": "[a-"}, "regex"),
        ({"grammar": "root ::= undefined_rule"}, "undefined_rule"),
    ]:
        with pytest.raises(ValueError, match="structured") as e:
            llm.generate([PROMPT[:4]], SamplingParams(max_tokens=4, structured=spec))
        assert words in str(e.value)
    with pytest.raises(ValueError, match="logit_bias: token id 9999"):
        llm.generate([PROMPT[:4]], SamplingParams(logit_bias={9999: 1.0}))
