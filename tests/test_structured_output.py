"""Structured output, prompt log-probs and the logits constraints through the HTTP API's shared
path (in process, without Ray), on the random demo model: random weights make every constrained
reply a test of the grammar alone. Oracles: jsonschema, the regex itself, and the engine
(segserve.LLM on the same model)."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest
from segserve import LLM, SamplingParams
from service_harness import InProcessService

pytestmark = pytest.mark.asyncio(loop_scope="module")

CONFIG = {
    "models": [{"name": "demo", "path": "demo", "dtype": "float32", "max_model_len": 512}],
    "pools": [{"name": "cpu", "device": "cpu", "num_replicas": 1, "num_kv_blocks": 512,
               "max_num_seqs": 16, "max_num_batched_tokens": 512}],
}  # fmt: skip
MESSAGES = [{"role": "user", "content": "An order, please."}]

# Nested objects, arrays, enums, numbers; every part bounded, so a reply always fits in
# max_tokens (about 220 characters at most, and a token is at least one byte).
ORDER = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 9999},
        "status": {"enum": ["new", "paid", "shipped"]},
        "total": {"type": "number", "minimum": 0, "maximum": 1000},
        "customer": {
            "type": "object",
            "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 10},
                           "vip": {"type": "boolean"}},
            "required": ["name", "vip"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array", "minItems": 1, "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {"sku": {"enum": ["A1", "B2", "C3"]},
                               "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                "required": ["sku", "qty"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["id", "status", "total", "customer", "items"],
    "additionalProperties": False,
}  # fmt: skip


@pytest.fixture(scope="module")
def svc():
    return InProcessService(CONFIG)


@pytest.fixture(scope="module")
def llm():
    return LLM(model="demo", device="cpu", dtype="float32", num_kv_blocks=256, max_model_len=512)


def _request(i: int) -> tuple[str, dict]:
    """Request i of the 50: chat with response_format, completions with guided_json or
    structured_outputs, some streamed, all sampled (seeded) so the replies differ."""
    common = {"model": "demo", "temperature": 1.0, "seed": i, "max_tokens": 320}
    if i % 3 == 0:
        return "/v1/chat/completions", {**common, "messages": MESSAGES, "response_format": {
            "type": "json_schema", "json_schema": {"name": "order", "schema": ORDER,
                                                   "strict": True}}}  # fmt: skip
    body = {**common, "prompt": f"Order {i}:", "stream": i % 2 == 0}
    if i % 3 == 1:
        return "/v1/completions", {**body, "guided_json": ORDER}
    return "/v1/completions", {**body, "structured_outputs": {"json": json.dumps(ORDER)}}


def _text(path: str, body) -> tuple[str, str]:
    if isinstance(body, list):  # streamed: the chunks' text in order
        chunks = [c for c in body[:-1] if c["choices"]]
        text = "".join(c["choices"][0].get("text", "") for c in chunks)
        return text, chunks[-1]["choices"][0]["finish_reason"]
    choice = body["choices"][0]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    return text, choice["finish_reason"]


async def test_fifty_json_schema_requests_all_parse_and_validate(svc):
    requests = [_request(i) for i in range(50)]
    results = await asyncio.gather(*(svc.post(path, body) for path, body in requests))
    replies = set()
    for (path, _), (status, body) in zip(requests, results, strict=True):
        assert status == 200, body
        text, reason = _text(path, body)
        assert reason == "stop", text  # the grammar finished: EOS was its only way out
        jsonschema.validate(json.loads(text), ORDER)  # strict JSON: no raw control characters
        replies.add(text)
    assert len(replies) > 40  # sampled: the constraint, not one memorised reply


async def test_regex_choice_and_grammar_under_vllm_names(svc):
    cases = [
        ({"guided_regex": r"\d{3}-[a-z]{2}"}, lambda t: re.fullmatch(r"\d{3}-[a-z]{2}", t)),
        ({"guided_choice": ["red", "green", "blue"]}, lambda t: t in ("red", "green", "blue")),
        ({"guided_grammar": 'root ::= "(" [0-9]+ ("+" [0-9]+)? ")"'},
         lambda t: re.fullmatch(r"\(\d+(\+\d+)?\)", t)),
        ({"response_format": {"type": "json_object"}}, lambda t: isinstance(json.loads(t), dict)),
    ]  # fmt: skip
    for fields, ok in cases:
        status, body = await svc.post("/v1/completions", {
            "model": "demo", "prompt": "Go:", "n": 4, "temperature": 1.0, "seed": 1,
            "max_tokens": 120, **fields})  # fmt: skip
        assert status == 200, body
        for c in body["choices"]:
            if c["finish_reason"] == "length" and "response_format" in fields:
                continue  # an object with no bounds may outrun max_tokens on random weights
            assert c["finish_reason"] == "stop" and ok(c["text"]), (fields, c)


async def test_echo_with_logprobs_returns_the_prompts_logprobs(svc, llm):
    ids = llm.tokenizer("The weather today").input_ids
    ref = llm.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=2))[0].prompt_logprobs
    for max_tokens in (0, 2):
        status, body = await svc.post("/v1/completions", {
            "model": "demo", "prompt": "The weather today", "echo": True, "logprobs": 2,
            "max_tokens": max_tokens, "temperature": 0})  # fmt: skip
        assert status == 200, body
        c = body["choices"][0]
        lp = c["logprobs"]
        assert c["text"].startswith("The weather today")
        assert len(lp["tokens"]) == len(ids) + max_tokens
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1:len(ids)] == pytest.approx([e.logprob for e in ref],
                                                                  abs=1e-5)  # fmt: skip
        for got, want in zip(lp["top_logprobs"][1:len(ids)], ref, strict=True):
            assert sorted(got.values(), reverse=True) == pytest.approx(
                [v for _, v in want.top], abs=1e-5)
        assert body["usage"]["completion_tokens"] == max_tokens
        assert c["finish_reason"] == "length"


async def test_prompt_logprobs_in_vllms_format(svc, llm):
    ids = llm.tokenizer("Numbers like 42").input_ids
    ref = llm.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=1))[0].prompt_logprobs
    status, body = await svc.post("/v1/completions", {
        "model": "demo", "prompt": "Numbers like 42", "prompt_logprobs": 1, "max_tokens": 1})
    assert status == 200, body
    got = body["choices"][0]["prompt_logprobs"]
    assert got[0] is None and len(got) == len(ids)
    for entry, want in zip(got[1:], ref, strict=True):
        assert entry[str(want.token_id)]["logprob"] == pytest.approx(want.logprob, abs=1e-5)
        best, best_lp = want.top[0]
        assert entry[str(best)]["rank"] == 1
        assert entry[str(best)]["logprob"] == pytest.approx(best_lp, abs=1e-5)
    # chat: at the response's top level, as vLLM puts it
    status, body = await svc.post("/v1/chat/completions", {
        "model": "demo", "messages": MESSAGES, "prompt_logprobs": 0, "max_tokens": 1})
    assert status == 200 and body["prompt_logprobs"][0] is None
    assert len(body["prompt_logprobs"]) == body["usage"]["prompt_tokens"]


async def test_logits_constraints_equal_the_engine(svc, llm):
    fields = [
        {"min_tokens": 5, "logit_bias": {"1": 100}},  # EOS is the best token after 5 tokens
        {"logit_bias": {"300": 50, "301": 49.5}},
        {"allowed_token_ids": [40, 41, 42]},
        {"bad_words": ["the", "soup"]},
    ]
    for extra in fields:
        status, body = await svc.post("/v1/completions", {
            "model": "demo", "prompt": "Hello", "max_tokens": 8, "temperature": 0, **extra})
        assert status == 200, body
        params = {**extra}
        if "logit_bias" in params:
            params["logit_bias"] = {int(k): v for k, v in params["logit_bias"].items()}
        want = llm.generate(["Hello"], SamplingParams(max_tokens=8, temperature=0.0,
                                                      **params))[0].outputs[0]  # fmt: skip
        assert body["choices"][0]["text"] == want.text, extra
        if "min_tokens" in extra:
            assert len(want.token_ids) == 6 and want.token_ids[-1] == 1  # EOS right after 5


async def test_a_grammar_compiles_off_the_replicas_event_loop(svc, monkeypatch):
    """A compile walks the vocabulary and can take seconds: on the loop it would stall every
    other stream of the replica and its health check (a 900-level array schema took 39 s)."""
    import threading
    import time

    grammars = svc.engine("demo").core.grammars
    compile_, threads = grammars.compile, []

    def slow_compile(spec):
        threads.append(threading.current_thread().name)
        time.sleep(1.0)  # a long compile (xgrammar's releases the GIL too)
        return compile_(spec)

    monkeypatch.setattr(grammars, "compile", slow_compile)
    ticks = []

    async def tick():
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    status, body = await svc.post("/v1/completions", {
        "model": "demo", "prompt": "Yes or no?", "structured_outputs": {"choice": ["yes", "no"]},
        "max_tokens": 4})  # fmt: skip
    ticker.cancel()
    assert status == 200 and body["choices"][0]["text"] in ("yes", "no"), body
    assert threads and threads[0].startswith("segserve-grammar"), threads
    assert max(b - a for a, b in zip(ticks, ticks[1:], strict=False)) < 0.5


def _nested_arrays(depth: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.mark.parametrize("schema", [
    "[" * 5000 + "]" * 5000,  # JSON text too deep for json.loads itself (gRPC sends text)
    json.dumps(_nested_arrays(500)),  # parses, but compiling it would take seconds
    _nested_arrays(100),  # an object (the HTTP body's parser allows ~200 levels)
], ids=["text-too-deep-to-parse", "text", "object"])
async def test_a_schema_nested_too_deep_is_a_400(svc, schema):
    status, body = await svc.post("/v1/completions", {
        "model": "demo", "prompt": "x", "structured_outputs": {"json": schema}, "max_tokens": 2})
    assert status == 400 and "nests deeper than 64 levels" in body["error"]["message"], body
