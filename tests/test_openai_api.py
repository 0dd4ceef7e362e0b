"""The OpenAI endpoints' shared path (deploy/openai_api.py) in one process, without Ray: every
request field through parse -> prepare -> engine -> render, against the engine itself
(segserve.LLM, same demo model) and HF's apply_chat_template as oracles."""

from __future__ import annotations

import gzip
import json
import threading

import pytest
from segserve import LLM, SamplingParams
from segserve.deploy.protocol import ChatCompletionRequest, CompletionRequest
from segserve.deploy.service import OFF_LOOP_TEXT_CHARS
from service_harness import InProcessService

pytestmark = pytest.mark.asyncio(loop_scope="module")

CONFIG = {
    "models": [{"name": "demo", "path": "demo", "dtype": "float32", "max_model_len": 512}],
    "pools": [{"name": "cpu", "device": "cpu", "num_replicas": 1, "num_kv_blocks": 256,
               "max_num_seqs": 8, "max_num_batched_tokens": 256}],
}  # fmt: skip
GREEDY = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def svc():
    return InProcessService(CONFIG)


@pytest.fixture(scope="module")
def llm():
    return LLM(model="demo", device="cpu", dtype="float32", num_kv_blocks=256, max_model_len=512)


def greedy(llm, prompt, **kw) -> str:
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, **kw)
    return llm.generate([prompt], params)[0].outputs[0].text


def chat_ids(llm, messages, **template_kwargs) -> list[int]:
    tok = llm.tokenizer
    kw = {"add_generation_prompt": True, **template_kwargs}
    text = tok.apply_chat_template(messages, tokenize=False, **kw)
    return list(tok(text, add_special_tokens=False).input_ids)


async def test_completion_equals_engine(svc, llm):
    status, body = await svc.post("/v1/completions", {"model": "demo", "prompt": "Hello",
                                                      **GREEDY})  # fmt: skip
    assert status == 200
    assert body["choices"][0]["text"] == greedy(llm, "Hello")


# ----- prompt handling -------------------------------------------------------------------------
async def test_truncate_prompt_tokens_keeps_the_end(svc, llm):
    ids = list(range(3, 23))
    status, body = await svc.post("/v1/completions", {"model": "demo", "prompt": ids,
                                                      "truncate_prompt_tokens": 5, **GREEDY})
    assert status == 200 and body["usage"]["prompt_tokens"] == 5
    assert body["choices"][0]["text"] == greedy(llm, ids[-5:])
    # shorter than the limit: untouched; -1: the context length
    for k in (50, -1):
        _, body = await svc.post("/v1/completions", {"model": "demo", "prompt": ids,
                                                     "truncate_prompt_tokens": k, **GREEDY})
        assert body["usage"]["prompt_tokens"] == 20
    status, body = await svc.post("/v1/completions", {"model": "demo", "prompt": ids,
                                                      "truncate_prompt_tokens": 0})
    assert (status, body["error"]["param"]) == (400, "truncate_prompt_tokens")
    status, body = await svc.post("/v1/completions", {"model": "demo", "prompt": ids,
                                                      "truncate_prompt_tokens": 513})
    assert (status, body["error"]["param"]) == (400, "truncate_prompt_tokens")


async def test_add_special_tokens(svc, llm):
    tok = llm.tokenizer
    _, body = await svc.post("/v1/completions", {"model": "demo", "prompt": "Hello",
                                                 "add_special_tokens": False, **GREEDY})
    ids = list(tok("Hello", add_special_tokens=False).input_ids)
    assert ids[0] != tok.bos_token_id
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert body["choices"][0]["text"] == greedy(llm, ids)
    # chat: the template holds the BOS it wants; asking for special tokens adds another
    _, plain = await svc.post("/v1/chat/completions", {"model": "demo", "messages": MESSAGES,
                                                       **GREEDY})  # fmt: skip
    _, more = await svc.post("/v1/chat/completions", {"model": "demo", "messages": MESSAGES,
                                                      "add_special_tokens": True, **GREEDY})
    assert more["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"] + 1


async def test_chat_template_options_render_as_hf_does(svc, llm, monkeypatch):
    history = [*MESSAGES, {"role": "assistant", "content": "Sure, the"}]
    _, body = await svc.post("/v1/chat/completions", {
        "model": "demo", "messages": history, "add_generation_prompt": False,
        "continue_final_message": True, **GREEDY})  # fmt: skip
    ids = chat_ids(llm, history, add_generation_prompt=False, continue_final_message=True)
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert body["choices"][0]["message"]["content"] == greedy(llm, ids)

    # ... the same switches from chat_template_kwargs (vLLM's); a string there is refused
    _, body = await svc.post("/v1/chat/completions", {
        "model": "demo", "messages": history, **GREEDY, "chat_template_kwargs": {
            "add_generation_prompt": False, "continue_final_message": True}})  # fmt: skip
    assert body["usage"]["prompt_tokens"] == len(ids)
    status, body = await svc.post("/v1/chat/completions", {
        "model": "demo", "messages": history, "chat_template_kwargs": {
            "add_generation_prompt": "false"}})  # fmt: skip
    assert (status, body["error"]["param"]) == (400, "chat_template_kwargs.add_generation_prompt")

    # a template of the request's own: refused unless the config trusts them (it is code)
    template = "{% for m in messages %}{{ m['content'] }}|{% endfor %}{{ greeting }}"
    status, body = await svc.post("/v1/chat/completions", {
        "model": "demo", "messages": MESSAGES, "chat_template": template, **GREEDY})
    assert (status, body["error"]["param"]) == (400, "chat_template"), body
    monkeypatch.setattr(svc.core.config.ingress, "trust_request_chat_template", True)
    # ... with a variable from chat_template_kwargs
    _, body = await svc.post("/v1/chat/completions", {
        "model": "demo", "messages": MESSAGES, "chat_template": template,
        "chat_template_kwargs": {"greeting": "Hey there"}, **GREEDY})  # fmt: skip
    want = list(llm.tokenizer("Be brief.|Hi|Hey there", add_special_tokens=False).input_ids)
    assert body["usage"]["prompt_tokens"] == len(want)
    assert body["choices"][0]["message"]["content"] == greedy(llm, want)

    status, body = await svc.post("/v1/chat/completions", {
        "model": "demo", "messages": MESSAGES, "chat_template": "{{ raise_exception('no') }}"})
    assert (status, body["error"]["param"]) == (400, "messages")


# ----- echo, beams, log-prob tokens, usage --------------------------------------------------
async def test_completion_echo(svc, llm):
    want = greedy(llm, "Hello")
    _, body = await svc.post("/v1/completions", {"model": "demo", "prompt": "Hello",
                                                 "echo": True, **GREEDY})
    assert body["choices"][0]["text"] == "Hello" + want
    _, events = await svc.post("/v1/completions", {"model": "demo", "prompt": "Hello",
                                                   "echo": True, "stream": True, **GREEDY})
    texts = [e["choices"][0]["text"] for e in events[:-1]]
    assert texts[0].startswith("Hello") and "".join(texts) == "Hello" + want
    ids = list(llm.tokenizer("Hello").input_ids)  # token ids echo as their text
    _, body = await svc.post("/v1/completions", {"model": "demo", "prompt": ids,
                                                 "echo": True, **GREEDY})
    assert body["choices"][0]["text"] == "Hello" + want


async def test_chat_echo(svc, llm):
    history = [*MESSAGES, {"role": "assistant", "content": "Well,"}]
    _, body = await svc.post("/v1/chat/completions", {
        "model": "demo", "messages": history, "echo": True, "add_generation_prompt": False,
        "continue_final_message": True, **GREEDY})  # fmt: skip
    ids = chat_ids(llm, history, add_generation_prompt=False, continue_final_message=True)
    assert body["choices"][0]["message"]["content"] == "Well," + greedy(llm, ids)


async def test_use_beam_search_returns_the_best_n(svc, llm):
    beams = llm.generate(["Hello"], SamplingParams(max_tokens=6, beam_width=3))[0].outputs
    for stream in (False, True):
        _, out = await svc.post("/v1/completions", {
            "model": "demo", "prompt": "Hello", "max_tokens": 6, "use_beam_search": True,
            "n": 2, "best_of": 3, "stream": stream})  # fmt: skip
        if stream:
            texts = {0: "", 1: ""}
            for e in out[:-1]:
                texts[e["choices"][0]["index"]] += e["choices"][0]["text"]
            got = [texts[0], texts[1]]
        else:
            got = [c["text"] for c in out["choices"]]
            assert out["usage"]["completion_tokens"] == sum(len(b.token_ids) for b in beams[:2])
        assert got == [b.text for b in beams[:2]]
    _, out = await svc.post("/v1/chat/completions", {
        "model": "demo", "messages": MESSAGES, "max_tokens": 6, "use_beam_search": True,
        "n": 2})  # fmt: skip
    want = llm.generate([chat_ids(llm, MESSAGES)], SamplingParams(max_tokens=6, beam_width=2))
    assert [c["message"]["content"] for c in out["choices"]] == [
        o.text for o in want[0].outputs]


async def test_return_tokens_as_token_ids(svc, llm):
    ref = llm.generate(["Hello"], SamplingParams(max_tokens=4, temperature=0.0, logprobs=2,
                                                 ignore_eos=True))[0].outputs[0]  # fmt: skip
    _, body = await svc.post("/v1/completions", {"model": "demo", "prompt": "Hello",
                                                 "max_tokens": 4, "temperature": 0,
                                                 "ignore_eos": True, "logprobs": 2,
                                                 "return_tokens_as_token_ids": True})
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"] == [f"token_id:{t}" for t in ref.token_ids]
    assert [sorted(d) for d in lp["top_logprobs"]] == [
        sorted(f"token_id:{t}" for t, _ in e.top) for e in ref.logprobs]
    _, body = await svc.post("/v1/chat/completions", {
        "model": "demo", "messages": MESSAGES, "max_tokens": 2, "logprobs": True,
        "return_tokens_as_token_ids": True})  # fmt: skip
    content = body["choices"][0]["logprobs"]["content"]
    assert all(c["token"].startswith("token_id:") for c in content)


@pytest.mark.parametrize("path, prompt", [("/v1/completions", {"prompt": "Hello"}),
                                          ("/v1/chat/completions", {"messages": MESSAGES})])
async def test_continuous_usage_stats(svc, path, prompt):
    _, events = await svc.post(path, {
        "model": "demo", **prompt, **GREEDY, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    chunks, done = events[:-1], events[-1]
    assert done == "[DONE]"
    assert all("usage" in c for c in chunks)
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 8
    assert chunks[-1]["choices"] == []  # the include_usage chunk still ends the stream
    prompt_tokens = {c["usage"]["prompt_tokens"] for c in chunks}
    assert len(prompt_tokens) == 1
    # without the option, only the last chunk has usage
    _, events = await svc.post(path, {"model": "demo", **prompt, **GREEDY, "stream": True,
                                      "stream_options": {"include_usage": True}})
    assert ["usage" in c for c in events[:-1]] == [False] * (len(events) - 2) + [True]


# ----- batched prompts, best_of ----------------------------------------------------------------
BATCH = ["Hello", "The quick brown fox", "segment KV cache"]


async def test_batched_text_prompts_indexed_as_openai(svc, llm):
    sampled = {"model": "demo", "prompt": BATCH, "n": 2, "seed": 7, "max_tokens": 6,
               "temperature": 1.0}  # fmt: skip
    _, body = await svc.post("/v1/completions", sampled)
    want = llm.generate(BATCH, SamplingParams(n=2, seed=7, max_tokens=6, temperature=1.0))
    assert [c["index"] for c in body["choices"]] == list(range(6))
    assert [c["text"] for c in body["choices"]] == [o.text for r in want for o in r.outputs]
    usage = body["usage"]
    assert usage["prompt_tokens"] == sum(len(r.prompt_token_ids) for r in want)
    assert usage["completion_tokens"] == sum(len(o.token_ids) for r in want for o in r.outputs)

    _, events = await svc.post("/v1/completions", {**sampled, "stream": True,
                                                   "stream_options": {"include_usage": True}})
    texts: dict[int, str] = {}
    for e in events[:-2]:
        (c,) = e["choices"]
        texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    assert [texts[i] for i in range(6)] == [o.text for r in want for o in r.outputs]
    last = events[-2]["usage"]  # cached_tokens differ: the first request filled the cache
    assert (last["prompt_tokens"], last["completion_tokens"]) == (
        usage["prompt_tokens"], usage["completion_tokens"])


async def test_batched_token_prompts_and_echo(svc, llm):
    prompts = [[0, 17, 42], [0, 99, 100, 101]]
    _, body = await svc.post("/v1/completions", {"model": "demo", "prompt": prompts,
                                                 "echo": True, **GREEDY})
    tok = llm.tokenizer
    assert [c["text"] for c in body["choices"]] == [
        tok.decode(p, skip_special_tokens=True) + greedy(llm, p) for p in prompts]


async def test_a_bad_prompt_in_a_batch_fails_the_request_and_leaves_nothing_running(svc):
    status, body = await svc.post("/v1/completions", {"model": "demo", "prompt": [[5], [9] * 600],
                                                      "max_tokens": 1})
    assert (status, body["error"]["param"]) == (400, "prompt")
    # the replica refuses one prompt of two (n over its max_num_seqs is checked there)
    engine = svc.engine("demo")
    status, body = await svc.post("/v1/completions", {"model": "demo", "prompt": ["a", "b"],
                                                      "n": 9})
    assert (status, body["error"]["param"]) == (400, "n")
    assert engine.stats()["running_requests"] == 0 and engine.stats()["waiting_requests"] == 0



async def test_more_prompts_than_the_queue_holds_is_a_400_not_a_retryable_429(svc):
    # max_queue_len is 256 (the default): a 429 would send the client back to retry forever
    status, body = await svc.post("/v1/completions", {"model": "demo", "prompt": [[5]] * 257,
                                                      "max_tokens": 1})
    assert (status, body["error"]["param"]) == (400, "prompt")
    assert "at most 256 prompts" in body["error"]["message"]
    stats = svc.engine("demo").stats()
    assert stats["running_requests"] == 0 and stats["waiting_requests"] == 0

async def test_best_of_keeps_the_most_likely(svc, llm):
    req = {"model": "demo", "prompt": BATCH[:2], "n": 2, "best_of": 4, "seed": 3,
           "max_tokens": 6, "temperature": 1.0}  # fmt: skip
    _, body = await svc.post("/v1/completions", req)
    want = llm.generate(BATCH[:2], SamplingParams(n=4, seed=3, max_tokens=6, temperature=1.0,
                                                  logprobs=0))  # fmt: skip
    best = [sorted(r.outputs, key=lambda o: o.cumulative_logprob, reverse=True)[:2]
            for r in want]  # fmt: skip
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == [o.text for b in best for o in b]
    assert all(c["logprobs"] is None for c in body["choices"])  # ranked on, not returned
    assert body["usage"]["completion_tokens"] == sum(len(o.token_ids) for b in best for o in b)
    _, body = await svc.post("/v1/completions", {**req, "logprobs": 1})
    lps = [sum(c["logprobs"]["token_logprobs"]) for c in body["choices"]]
    assert lps == pytest.approx([o.cumulative_logprob for b in best for o in b], abs=1e-4)
    assert lps[0] >= lps[1] and lps[2] >= lps[3]


# ----- null, unknown fields, errors ---------------------------------------------------------
def _nullable(schema) -> list[str]:
    return [n for n, f in schema.model_fields.items() if not f.is_required()]


@pytest.mark.parametrize("path, schema, prompt", [
    ("/v1/completions", CompletionRequest, {"prompt": "Hello"}),
    ("/v1/chat/completions", ChatCompletionRequest, {"messages": MESSAGES}),
])  # fmt: skip
async def test_every_nullable_field_null(svc, path, schema, prompt):
    base = {"model": "demo", **prompt, "max_tokens": 4, "temperature": 0, "seed": 1}
    _, want = await svc.post(path, base)
    nulls = {n: None for n in _nullable(schema) if n not in base}
    status, got = await svc.post(path, {**base, **nulls})
    assert status == 200, got
    key = "text" if path == "/v1/completions" else "message"
    assert [c[key] for c in got["choices"]] == [c[key] for c in want["choices"]]


async def test_unknown_fields_are_ignored(svc, llm):
    status, body = await svc.post("/v1/completions", {
        "model": "demo", "prompt": "Hello", **GREEDY, "some_future_field": {"x": 1},
        "stream_options": None, "priority": 3})  # fmt: skip
    assert status == 200 and body["choices"][0]["text"] == greedy(llm, "Hello")


BAD = [
    ("/v1/completions", {"prompt": "hi", "temperature": 3}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "temperature": float("nan")}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": float("inf")}, "top_p"),
    ("/v1/completions", {"prompt": "hi", "top_k": 2.5}, "top_k"),
    ("/v1/completions", {"prompt": "hi", "stop": [1]}, "stop.0"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10_000}, "max_tokens"),
    ("/v1/completions", {"prompt": [7] * 600, "max_tokens": 1}, "prompt"),
    ("/v1/completions", {"prompt": [999_999]}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "n": 9}, "n"),  # over max_num_seqs (the engine's)
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "hi", "beam_width": 2, "stop": ["x"]}, "stop"),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 30}, "min_tokens"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"100000": 1}}, "logit_bias"),
    # digits to str.isdigit(), not to int(): were a 500
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"\u00b2": 1}}, "logit_bias.\u00b2"),
    ("/v1/chat/completions", {"messages": MESSAGES, "logit_bias": {"9" * 5000: 1}},
     "logit_bias." + "9" * 40),
    ("/v1/completions", {"prompt": "hi", "top_k": 2**63}, "top_k"),
    ("/v1/completions", {"prompt": "hi", "bad_words": ["w"] * 1025}, "bad_words"),
    ("/v1/completions", {"prompt": "hi", "allowed_token_ids": [100000]}, "allowed_token_ids"),
    ("/v1/completions", {"prompt": "hi", "guided_regex": "[a-"}, "guided_regex"),
    ("/v1/chat/completions", {"messages": MESSAGES, "response_format": {
        "type": "json_schema", "json_schema": {"schema": {"type": "integr"}}}}, "response_format"),
    ("/v1/completions", {"prompt": "hi", "structured_outputs": {"grammar": "root ::= x"}},
     "structured_outputs"),
    ("/v1/completions", {"prompt": "hi", "device": "gpu"}, "device"),
    # refused while preparing, before any replica: still the field the client sent
    ("/v1/completions", {"prompt": "hi", "guided_choice": []}, "guided_choice"),
    ("/v1/completions", {"prompt": "hi", "structured_outputs": {"regex": 1}},
     "structured_outputs"),
    ("/v1/chat/completions", {"messages": MESSAGES, "tool_choice": "required", "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "integr"}}}]},
     "tools"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]},
     "messages.0.content"),
    ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_completion_tokens": 10_000},
     "max_tokens"),
]  # fmt: skip


@pytest.mark.parametrize("path, fields, param", BAD)
async def test_every_400_names_its_param(svc, path, fields, param):
    status, body = await svc.post(path, {"model": "demo", **fields})
    assert status in (400, 404), body
    assert body["error"]["param"] == param, body


async def test_nan_and_infinity_are_named_as_such(svc):
    # Python's json (and so many clients) writes NaN and Infinity; "must be <= 2" misleads
    status, body = await svc.post("/v1/completions", {"model": "demo", "prompt": "hi",
                                                      "temperature": float("nan")})
    assert status == 400 and "finite number" in body["error"]["message"], body


# ----- models, tokenize, detokenize, version ----------------------------------------------------
def _utility(fn, *args):
    from segserve.deploy.errors import APIError

    try:
        return 200, fn(*args)
    except APIError as e:
        return e.status, e.body()


def test_model_card_and_version(svc):
    from segserve import __version__
    from segserve.deploy import utility_api

    status, card = _utility(utility_api.get_model, svc.core, "demo")
    assert status == 200 and card["id"] == "demo" and card["max_model_len"] == 512
    assert card == utility_api.list_models(svc.core)["data"][0] | {"created": card["created"]}
    status, body = _utility(utility_api.get_model, svc.core, "org/nope")
    assert (status, body["error"]["param"]) == (404, "model")
    assert utility_api.version() == {"version": __version__}


def test_tokenize_and_detokenize(svc, llm):
    import json

    from segserve.deploy import utility_api

    tok = llm.tokenizer
    raw = json.dumps({"model": "demo", "prompt": "Hello world", "return_token_strs": True})
    _, out = _utility(utility_api.tokenize, svc.core, raw.encode())
    ids = list(tok("Hello world").input_ids)
    assert out == {"count": len(ids), "max_model_len": 512, "tokens": ids,
                   "token_strs": tok.convert_ids_to_tokens(ids)}
    raw = json.dumps({"model": "demo", "prompt": "Hello world", "add_special_tokens": False})
    assert _utility(utility_api.tokenize, svc.core, raw.encode())[1]["tokens"] == ids[1:]
    # messages: the prompt a chat request gets, as HF renders it
    raw = json.dumps({"model": "demo", "messages": MESSAGES})
    _, out = _utility(utility_api.tokenize, svc.core, raw.encode())
    assert out["tokens"] == chat_ids(llm, MESSAGES) and out["token_strs"] is None
    raw = json.dumps({"model": "demo", "messages": MESSAGES, "add_generation_prompt": False})
    _, out = _utility(utility_api.tokenize, svc.core, raw.encode())
    assert out["tokens"] == chat_ids(llm, MESSAGES, add_generation_prompt=False)

    raw = json.dumps({"model": "demo", "tokens": ids})
    assert _utility(utility_api.detokenize, svc.core, raw.encode()) == (
        200, {"prompt": tok.decode(ids)})
    for body, param in [({"model": "demo", "tokens": [10**6]}, "tokens"),
                        ({"model": "demo", "tokens": ["a"]}, "tokens.0"),
                        ({"model": "demo"}, "tokens")]:  # fmt: skip
        status, err = _utility(utility_api.detokenize, svc.core, json.dumps(body).encode())
        assert (status, err["error"]["param"]) == (400, param)
    status, err = _utility(utility_api.tokenize, svc.core, b'{"model": "demo", "prompt": 5}')
    assert (status, err["error"]["param"]) == (400, "prompt")
    status, err = _utility(utility_api.tokenize, svc.core, b"{oops")
    assert status == 400


def tokenize_threads(core, monkeypatch) -> list[str]:
    """The names of the threads ``core.tokenize`` runs in from now on, in call order."""
    threads = []
    real = core.tokenize

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(core, "tokenize", spy)
    return threads


async def test_long_text_and_chats_are_prepared_off_the_event_loop(svc, llm, monkeypatch):
    """A long text prompt is tokenized, and a chat templated, in the ingress's tokenizer thread
    (the event loop serves the other streams meanwhile); short text stays on the loop. The
    answers are the engine's either way."""
    threads = tokenize_threads(svc.core, monkeypatch)
    long = "the " * (OFF_LOOP_TEXT_CHARS // 4 + 1)  # ~250 of the demo tokenizer's tokens
    status, body = await svc.post("/v1/completions", {"model": "demo", "prompt": long, **GREEDY})
    assert status == 200 and body["choices"][0]["text"] == greedy(llm, long)
    status, body = await svc.post("/v1/completions", {"model": "demo", "prompt": "Hi", **GREEDY})
    assert status == 200 and body["choices"][0]["text"] == greedy(llm, "Hi")
    status, body = await svc.post("/v1/chat/completions", {"model": "demo", "messages": MESSAGES,
                                                           **GREEDY})  # fmt: skip
    assert status == 200
    assert body["choices"][0]["message"]["content"] == greedy(llm, chat_ids(llm, MESSAGES))
    tokenizer_thread = "segserve-tokenizer"
    assert [t.startswith(tokenizer_thread) for t in threads] == [True, False, True], threads
    # a bad request found in the thread is still the client's 400
    status, body = await svc.post("/v1/completions", {"model": "demo", "prompt": long,
                                                      "max_tokens": 10_000})  # fmt: skip
    assert status == 400 and body["error"]["param"] == "max_tokens", body


async def test_text_longer_than_any_context_is_refused_before_tokenizing(svc, llm, monkeypatch):
    """Past max_model_len x the longest token's characters (x4), no text fits the context:
    refused untokenized (a 10 MB prompt held the tokenizer thread for seconds). With
    truncate_prompt_tokens only the end is tokenized, and the kept tokens are the ones the
    whole text's tokens end with."""
    limit = svc.core.models["demo"].max_prompt_chars
    longest = max(len(t) for t in llm.tokenizer.get_vocab())
    assert limit == 512 * longest * 4
    calls = []
    real = svc.core.models["demo"].tokenizer.__class__.__call__

    def counting(self, text, *args, **kwargs):
        calls.append(len(text))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(svc.core.models["demo"].tokenizer.__class__, "__call__", counting)
    huge = "ab " * (limit // 3 + 1)
    status, body = await svc.post("/v1/completions", {"model": "demo", "prompt": huge, **GREEDY})
    assert (status, body["error"]["param"]) == (400, "prompt") and not calls, body
    status, body = await svc.post("/v1/chat/completions", {
        "model": "demo", "messages": [{"role": "user", "content": huge}], **GREEDY})
    assert (status, body["error"]["param"]) == (400, "messages") and not calls, body
    # at the bound: tokenized (and then too long in tokens, as before)
    status, body = await svc.post("/v1/completions", {"model": "demo", "prompt": huge[:limit],
                                                      **GREEDY})  # fmt: skip
    assert status == 400 and "maximum context length" in body["error"]["message"] and calls
    status, body = await svc.post("/v1/completions", {
        "model": "demo", "prompt": huge, "truncate_prompt_tokens": 10, **GREEDY})
    assert status == 200 and body["usage"]["prompt_tokens"] == 10 and max(calls) == limit
    monkeypatch.undo()
    kept = list(llm.tokenizer(huge).input_ids)[-10:]
    assert body["choices"][0]["text"] == greedy(llm, kept)


def test_unknown_field_warnings_are_bounded(caplog):
    from segserve.deploy import protocol

    protocol._warned_fields.clear()
    with caplog.at_level("WARNING", logger=protocol.__name__):
        for i in range(protocol.MAX_WARNED_FIELDS + 50):
            CompletionRequest.model_validate({"model": "demo", "prompt": "hi", f"junk{i}": 1})
    assert len(protocol._warned_fields) == protocol.MAX_WARNED_FIELDS + 1
    assert len(caplog.records) == protocol.MAX_WARNED_FIELDS + 1  # and one saying it stops


async def test_tokenize_runs_in_the_tokenizer_thread(svc, llm, monkeypatch):
    import json

    from segserve.deploy import utility_api

    threads = tokenize_threads(svc.core, monkeypatch)
    raw = json.dumps({"model": "demo", "prompt": "Hello world"}).encode()
    out = await utility_api.tokenize_off_loop(svc.core, raw)
    assert out["tokens"] == list(llm.tokenizer("Hello world").input_ids)
    assert len(threads) == 1 and threads[0].startswith("segserve-tokenizer"), threads


def test_an_over_long_cache_salt_is_refused_for_grpc_too():
    # HTTP's schema caps the field; gRPC's message reaches ServiceCore.cache_salt as sent
    from segserve.deploy.errors import APIError
    from segserve.deploy.service import ServiceCore

    assert ServiceCore.cache_salt("s" * 128, None) == "r:" + "s" * 128
    with pytest.raises(APIError) as e:
        ServiceCore.cache_salt("s" * 100_000, "tenant")
    assert (e.value.status, e.value.param) == (400, "cache_salt")
    assert len(e.value.message) < 100  # the value is not echoed back


def test_a_refused_sampling_value_is_not_echoed_back_whole():
    with pytest.raises(ValueError) as e:
        SamplingParams(stop_token_ids=[-1] * 50_000)
    assert "stop_token_ids" in str(e.value) and len(str(e.value)) < 200


async def test_bodies_too_large_or_compressed_are_refused_by_name(svc, monkeypatch):
    monkeypatch.setattr(svc.core.config.ingress, "max_body_bytes", 2**16)
    head = json.dumps({"model": "demo", "prompt": "x", "max_tokens": 1, "user": ""}).encode()
    body = head[:-2] + b"u" * (2**16 - len(head)) + b'"}'
    assert len(body) == 2**16
    status, _ = await svc.post("/v1/completions", body)
    assert status == 200  # up to the bound
    big = body[:-2] + b'u"}'  # one byte past it, with no Content-Length (chunked) ...
    status, err = await svc.post("/v1/completions", big)
    assert (status, err["error"]["type"]) == (413, "invalid_request_error")
    assert "ingress.max_body_bytes" in err["error"]["message"]
    # ... and with one, refused from the header before the body is read
    status, _ = await svc.post("/v1/chat/completions", b"", {"content-length": str(2**16 + 1)})
    assert status == 413
    status, err = await svc.post("/v1/completions", gzip.compress(body),
                                 {"content-encoding": "gzip"})  # fmt: skip
    assert status == 415 and "'gzip'" in err["error"]["message"]
    status, _ = await svc.post("/v1/completions", body, {"content-encoding": "identity"})
    assert status == 200


def test_a_405_names_every_method_of_the_path():
    # GET and HEAD are two routes; Starlette's own 405 named only the first one's method (the
    # fuzzer's OPTIONS found `Allow: HEAD` on GET routes). No handler runs, so the app is
    # called as it is, without a replica.
    from fastapi.testclient import TestClient
    from segserve.deploy.ingress import api

    client = TestClient(api)
    for method, path, allow in [("OPTIONS", "/health", "GET, HEAD"),
                                ("DELETE", "/v1/models/org/name", "GET, HEAD"),
                                ("POST", "/metrics", "GET, HEAD"),
                                ("GET", "/v1/chat/completions", "POST"),
                                ("PUT", "/tokenize", "POST")]:  # fmt: skip
        resp = client.request(method, path)
        assert (resp.status_code, resp.headers["allow"]) == (405, allow), (method, path)
        assert resp.json()["error"]["code"] == 405
