"""The service, live: real Ray Serve on loopback, called with the `openai` client, raw HTTP and
gRPC. One Ray/Serve instance for the whole module (it takes ~15 s to start on 2 cores).

The oracle for generated text is the engine itself (segserve.LLM in this process, same demo
model), which tests/test_engine_vs_hf.py holds to HF transformers. A second application in the
same Serve instance serves the real SmolLM2-135M-Instruct when it can be fetched, whose chat
answer must make sense (tests/test_smollm2.py holds it to HF).
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import socket
import threading
from types import SimpleNamespace

import grpc
import openai
import pytest
from live_helpers import free_port, start_ray, wait_for

# A loopback test cluster: nothing to protect, and no ~/.ray/auth_token written by the tests.
os.environ["RAY_AUTH_MODE"] = "disabled"

import ray  # noqa: E402
from conftest import smollm2_or_reason  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve.config import HTTPOptions, gRPCOptions  # noqa: E402
from segserve import LLM, SamplingParams  # noqa: E402
from segserve.actors.engine_process import engine_processes  # noqa: E402
from segserve.deploy.app import build_app  # noqa: E402
from segserve.deploy.launch import GRPC_SERVICER  # noqa: E402
from segserve.deploy.replica import KV_COUNTERS, KV_GAUGES  # noqa: E402
from segserve.deploy.router import deployment_name  # noqa: E402
from segserve.proto.client import SegServeClient  # noqa: E402
from tool_models import FAMILIES, PARIS, TIME_TOOL, WEATHER_TOOL, make_tool_model  # noqa: E402

API_KEY = "test-key-123"
MAX_NUM_SEQS, MAX_QUEUE_LEN = 4, 2
MAIN = {
    "models": [{"name": "demo", "path": "demo", "dtype": "float32", "max_model_len": 512}],
    "pools": [{
        "name": "cpu", "device": "cpu", "num_replicas": 1, "num_kv_blocks": 256,
        "max_num_seqs": MAX_NUM_SEQS, "max_queue_len": MAX_QUEUE_LEN,
        "max_num_batched_tokens": 256, "cpus_per_replica": 1,
    }],
}  # fmt: skip
SECURE = {**MAIN, "ingress": {"api_key": API_KEY}}
# The engine in the ingress replica: one deployment (tests/test_streaming_path.py), and it steps
# in a child process of that replica (actors/engine_process.py), as on a GPU pool by default.
ONE = {**MAIN, "pools": [{**MAIN["pools"][0], "engine_process": True}],
       "ingress": {"engine_in_ingress": True}}  # fmt: skip
REAL = {
    "models": [{"name": "smollm2", "path": "smollm2", "dtype": "float32", "max_model_len": 512}],
    "pools": [{"name": "cpu", "device": "cpu", "num_replicas": 1, "num_kv_blocks": 64,
               "max_num_seqs": 4, "cpus_per_replica": 1}],
}  # fmt: skip
# lm-eval sends batches of 4 prompts at once: four replica calls that Serve's handle may hold
# queued for a moment, more than the main pool's tiny queue (kept tiny for the overload tests).
EVAL_POOL = {**MAIN["pools"][0], "name": "eval", "max_queue_len": 16}
EVAL_MODEL = {**MAIN["models"][0], "name": "eval", "pools": ["eval"]}




@pytest.fixture(scope="module")
def tools_model(tmp_path_factory):
    """A tiny Hermes/Qwen-template model whose reply is a scripted tool call (tool_models.py)."""
    return make_tool_model(tmp_path_factory.mktemp("tools"), "hermes")


@pytest.fixture(scope="module")
def svc(tools_model):
    # The tool model joins the main app (one more small replica, not another Serve instance).
    tools = {"name": "tools", "path": str(tools_model), "dtype": "float32",
             "max_model_len": 2048, "pools": ["cpu"]}  # fmt: skip
    main = {**MAIN, "models": [{**MAIN["models"][0], "pools": ["cpu"]}, tools, EVAL_MODEL],
            "pools": [*MAIN["pools"], EVAL_POOL]}  # fmt: skip
    metrics_port = free_port()
    # Logical CPUs: one per replica (Serve's default for the ingresses, cpus_per_replica for
    # the engines) of the four apps below.
    start_ray(num_cpus=9, _metrics_export_port=metrics_port)
    http_port, grpc_port = free_port(), free_port()
    serve.start(
        http_options=HTTPOptions(host="127.0.0.1", port=http_port),
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=[GRPC_SERVICER]),
    )
    serve.run(build_app(main), name="segserve", route_prefix="/")
    serve.run(build_app(SECURE), name="secure", route_prefix="/secure")
    serve.run(build_app(ONE), name="one", route_prefix="/one")
    _, real_missing = smollm2_or_reason()
    if real_missing is None:
        serve.run(build_app(REAL), name="real", route_prefix="/real")
    replica = serve.get_deployment_handle(deployment_name("demo", "cpu"), app_name="segserve")
    grpc_client = SegServeClient(f"127.0.0.1:{grpc_port}", application="segserve", timeout=60)
    real_grpc = SegServeClient(f"127.0.0.1:{grpc_port}", application="real", timeout=60)
    yield SimpleNamespace(
        http_port=http_port,
        metrics_port=metrics_port,
        base=f"http://127.0.0.1:{http_port}",
        grpc_target=f"127.0.0.1:{grpc_port}",
        oai=openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused",
                          max_retries=0, timeout=60),  # fmt: skip
        grpc=grpc_client,
        stats=lambda: replica.stats.remote().result(),
        real_missing=real_missing,
        real_oai=openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/real/v1",
                               api_key="unused", max_retries=0, timeout=60),
        real_grpc=real_grpc,
    )
    real_grpc.close()
    grpc_client.close()
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def engine():
    return LLM(model="demo", device="cpu", dtype="float32", num_kv_blocks=256, max_model_len=512)


def _post(svc, path: str, body: bytes | dict, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", svc.http_port, timeout=60)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    out = resp.status, resp.read().decode()
    conn.close()
    return out




# ----- the openai client ---------------------------------------------------------------------
PROMPTS = ["Hello, world", "The quick brown fox", "segment KV cache"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_completion_greedy_equals_engine(svc, engine, prompt):
    want = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0))[0]
    got = svc.oai.completions.create(model="demo", prompt=prompt, max_tokens=12, temperature=0)
    choice = got.choices[0]
    assert choice.text == want.outputs[0].text
    assert choice.finish_reason == want.outputs[0].finish_reason
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.completion_tokens == len(want.outputs[0].token_ids)

    stream = svc.oai.completions.create(model="demo", prompt=prompt, max_tokens=12,
                                        temperature=0, stream=True)  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == want.outputs[0].text
    assert chunks[-1].choices[0].finish_reason == want.outputs[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_token_id_prompt_and_usage_in_stream(svc, engine):
    ids = [1, 17, 42, 99, 300]
    want = engine.generate([ids], SamplingParams(max_tokens=8, temperature=0.0,
                                                 ignore_eos=True))[0]  # fmt: skip
    stream = svc.oai.completions.create(
        model="demo", prompt=ids, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == len(ids)
    assert "".join(c.choices[0].text for c in chunks[:-1]) == want.outputs[0].text


def test_prefix_cache_hits_are_reported_in_usage(svc):
    prompt = list(range(1, 41))  # 40 tokens: two full 16-token blocks can be reused
    first = svc.oai.completions.create(model="demo", prompt=prompt, max_tokens=2)
    again = svc.oai.completions.create(model="demo", prompt=prompt, max_tokens=2)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == 32
    via_grpc = svc.grpc.generate(prompt_token_ids=prompt, model="demo", max_tokens=2)
    assert via_grpc.usage.cached_prompt_tokens == 32


def test_cache_salt_isolates_the_prefix_cache(svc):
    prompt = list(range(2, 42))
    body = {"model": "demo", "prompt": prompt, "max_tokens": 2}
    cached = []
    for salt in [None, "tenant-a", "tenant-b", "tenant-a"]:
        status, text = _post(svc, "/v1/completions", {**body, "cache_salt": salt})
        assert status == 200, text
        cached.append(json.loads(text)["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert cached == [0, 0, 0, 32]
    via_grpc = svc.grpc.generate(prompt_token_ids=prompt, model="demo", max_tokens=2,
                                 cache_salt="tenant-b")  # fmt: skip
    assert via_grpc.usage.cached_prompt_tokens == 32


def test_chat_uses_template_and_streams(svc, engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    tok = engine.tokenizer
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = list(tok(text, add_special_tokens=False).input_ids)
    want = engine.generate([ids], SamplingParams(max_tokens=10, temperature=0.0))[0].outputs[0]

    got = svc.oai.chat.completions.create(model="demo", messages=messages, max_tokens=10,
                                          temperature=0)  # fmt: skip
    assert got.choices[0].message.content == want.text
    assert got.choices[0].message.role == "assistant"
    assert got.usage.prompt_tokens == len(ids)

    chunks = list(svc.oai.chat.completions.create(
        model="demo", messages=messages, max_completion_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.total_tokens == len(ids) + len(want.token_ids)


def test_n_seed_logprobs_stop(svc, engine):
    # n samples with a seed: reproducible, and as the engine draws them
    kw = dict(model="demo", prompt="Hello", max_tokens=8, temperature=1.0, n=2, seed=7)
    a = svc.oai.completions.create(**kw)
    b = svc.oai.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert sorted(c.index for c in a.choices) == [0, 1]
    want = engine.generate(["Hello"], SamplingParams(max_tokens=8, temperature=1.0, n=2, seed=7))
    assert [c.text for c in a.choices] == [o.text for o in want[0].outputs]

    # logprobs: the engine's numbers, one entry per generated token
    lp = svc.oai.completions.create(model="demo", prompt="Hello", max_tokens=5, temperature=0,
                                    logprobs=2, extra_body={"ignore_eos": True})  # fmt: skip
    ref = engine.generate(["Hello"], SamplingParams(max_tokens=5, temperature=0.0, logprobs=2,
                                                    ignore_eos=True))[0].outputs[0]  # fmt: skip
    got = lp.choices[0].logprobs
    assert len(got.tokens) == 5 and len(got.top_logprobs[0]) == 2
    assert got.token_logprobs == pytest.approx([x.logprob for x in ref.logprobs], abs=1e-5)
    chat = svc.oai.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0,
        logprobs=True, top_logprobs=3)  # fmt: skip
    assert len(chat.choices[0].logprobs.content) == 3
    assert len(chat.choices[0].logprobs.content[0].top_logprobs) == 3

    # stop string: cut where the engine's greedy text has it
    greedy12 = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    full = engine.generate(["Hello"], greedy12)[0].outputs[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = svc.oai.completions.create(model="demo", prompt="Hello", max_tokens=12, temperature=0,
                                     stop=[stop], extra_body={"ignore_eos": True})  # fmt: skip
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full[: full.index(stop)]


def test_beam_search_extension(svc, engine):
    want = engine.generate(["Hello"], SamplingParams(max_tokens=6, beam_width=3))[0].outputs
    got = svc.oai.completions.create(model="demo", prompt="Hello", max_tokens=6,
                                     extra_body={"beam_width": 3})  # fmt: skip
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == [o.text for o in want]


# ----- what OpenAI and vLLM clients send --------------------------------------------------------
def _get(svc, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", svc.http_port, timeout=60)
    conn.request("GET", path)
    resp = conn.getresponse()
    out = resp.status, resp.read().decode()
    conn.close()
    return out


def test_vllm_extensions_through_the_openai_client(svc, engine):
    ids = list(range(3, 30))
    got = svc.oai.completions.create(
        model="demo", prompt=ids, max_tokens=6, temperature=0, logprobs=1,
        extra_body={"truncate_prompt_tokens": 8, "return_tokens_as_token_ids": True,
                    "ignore_eos": True, "min_tokens": 0, "skip_special_tokens": True,
                    "spaces_between_special_tokens": True, "include_stop_str_in_output": False,
                    "some_future_field": [1, 2]})  # fmt: skip
    want = engine.generate([ids[-8:]], SamplingParams(max_tokens=6, temperature=0.0,
                                                      ignore_eos=True))[0].outputs[0]
    assert got.usage.prompt_tokens == 8 and got.choices[0].text == want.text
    assert got.choices[0].logprobs.tokens == [f"token_id:{t}" for t in want.token_ids]

    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Well"}]
    chat = svc.oai.chat.completions.create(
        model="demo", messages=history, max_tokens=5, temperature=0,
        extra_body={"add_generation_prompt": False, "continue_final_message": True,
                    "chat_template_kwargs": {"unused": 1}, "echo": True})  # fmt: skip
    tok = engine.tokenizer
    text = tok.apply_chat_template(history, tokenize=False, continue_final_message=True)
    cont = engine.generate([list(tok(text, add_special_tokens=False).input_ids)],
                           SamplingParams(max_tokens=5, temperature=0.0))[0].outputs[0]
    assert chat.choices[0].message.content == "Well" + cont.text

    beams = svc.oai.completions.create(model="demo", prompt="Hello", max_tokens=5, n=2,
                                       best_of=3, extra_body={"use_beam_search": True})
    want = engine.generate(["Hello"], SamplingParams(max_tokens=5, beam_width=3))[0].outputs
    assert [c.text for c in beams.choices] == [o.text for o in want[:2]]


ORDER_SCHEMA = {"type": "object", "properties": {
    "size": {"enum": ["S", "M", "L"]}, "qty": {"type": "integer", "minimum": 1, "maximum": 9},
    "tags": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 5}}},
    "required": ["size", "qty", "tags"], "additionalProperties": False}  # fmt: skip


def test_constraints_and_prompt_scoring_through_the_openai_client(svc, engine):
    import jsonschema

    # structured output: the SDK's response_format, vLLM's names through extra_body
    chat = svc.oai.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=100, n=2,
        temperature=1.0, seed=3, response_format={"type": "json_schema", "json_schema": {
            "name": "order", "schema": ORDER_SCHEMA, "strict": True}})  # fmt: skip
    for c in chat.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), ORDER_SCHEMA)
    got = svc.oai.completions.create(model="demo", prompt="Pick:", max_tokens=10,
                                     extra_body={"guided_choice": ["alpha", "beta"]})
    assert got.choices[0].text in ("alpha", "beta")
    with pytest.raises(openai.BadRequestError) as info:
        svc.oai.completions.create(model="demo", prompt="x", extra_body={
            "guided_json": {"type": "object", "properties": {"a": {"type": "nope"}}}})
    assert info.value.body["param"] == "guided_json" and "properties/a/type" in \
        info.value.body["message"]

    # logits constraints, as the engine applies them
    fields = {"min_tokens": 3, "logit_bias": {"1": 100}, "bad_words": ["the"]}
    got = svc.oai.completions.create(model="demo", prompt="Hello", max_tokens=8, temperature=0,
                                     logit_bias={"1": 100}, extra_body={
                                         k: v for k, v in fields.items() if k != "logit_bias"})
    want = engine.generate(["Hello"], SamplingParams(max_tokens=8, temperature=0.0,
                                                     **{**fields, "logit_bias": {1: 100}}))
    assert got.choices[0].text == want[0].outputs[0].text
    assert got.usage.completion_tokens == 4  # 3 tokens, then EOS (biased to the top)

    # echo with logprobs and max_tokens 0: the prompt scored (what lm-eval sends, batched)
    ids = [list(range(5, 17)), list(range(40, 50))]
    got = svc.oai.completions.create(model="demo", prompt=ids, max_tokens=0, echo=True,
                                     logprobs=1)  # fmt: skip
    want = engine.generate(ids, SamplingParams(max_tokens=0, prompt_logprobs=1))
    for c, w in zip(got.choices, want, strict=True):
        assert c.logprobs.token_logprobs[0] is None
        assert c.logprobs.token_logprobs[1:] == pytest.approx(
            [e.logprob for e in w.prompt_logprobs], abs=1e-5)
    assert got.usage.completion_tokens == 0


@pytest.mark.parametrize("path, prompt", [
    ("/v1/completions", {"prompt": "Hello"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi",
                                            "name": None}]}),
])  # fmt: skip
def test_null_for_every_nullable_field(svc, path, prompt):
    from segserve.deploy.protocol import ChatCompletionRequest, CompletionRequest

    schema = CompletionRequest if path == "/v1/completions" else ChatCompletionRequest
    base = {"model": "demo", **prompt, "max_tokens": 4, "temperature": 0}
    nulls = {n: None for n, f in schema.model_fields.items()
             if not f.is_required() and n not in base}  # fmt: skip
    status, text = _post(svc, path, {**base, **nulls})
    assert status == 200, text
    assert json.loads(text)["choices"][0] == json.loads(_post(svc, path, base)[1])["choices"][0]


def test_streaming_with_usage_in_every_chunk(svc):
    """What guidellm sends on every request."""
    chunks = list(svc.oai.completions.create(
        model="demo", prompt="Hello", max_tokens=6, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        extra_body={"ignore_eos": True}))  # fmt: skip
    assert all(c.usage is not None for c in chunks)
    assert [c.usage.completion_tokens for c in chunks[:-1]] == list(range(1, 7))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_batched_prompts_and_best_of(svc, engine):
    prompts = ["Hello", "The quick brown fox"]
    got = svc.oai.completions.create(model="demo", prompt=prompts, n=2, seed=5,
                                     max_tokens=5, temperature=1.0)  # fmt: skip
    want = engine.generate(prompts, SamplingParams(n=2, seed=5, max_tokens=5, temperature=1.0))
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    assert [c.text for c in got.choices] == [o.text for r in want for o in r.outputs]
    ids = [[0, 17, 42], [0, 99, 100]]
    got = svc.oai.completions.create(model="demo", prompt=ids, max_tokens=4, temperature=0)
    want = engine.generate(ids, SamplingParams(max_tokens=4, temperature=0.0))
    assert [c.text for c in got.choices] == [r.outputs[0].text for r in want]

    best = svc.oai.completions.create(model="demo", prompt="Hello", n=1, best_of=3, seed=9,
                                      max_tokens=5, temperature=1.0)  # fmt: skip
    samples = engine.generate(["Hello"], SamplingParams(n=3, seed=9, max_tokens=5,
                                                        temperature=1.0, logprobs=0))
    top = max(samples[0].outputs, key=lambda o: o.cumulative_logprob)
    assert [c.text for c in best.choices] == [top.text]


def _hf_tool_prompt(tools_model, messages, tools) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tools_model))
    text = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                   tokenize=False)  # fmt: skip
    return list(tok(text, add_special_tokens=False).input_ids)


def test_tool_calls_through_the_openai_client(svc, tools_model):
    fam = FAMILIES["hermes"]
    want_calls = [(name, json.dumps(args)) for name, args in fam.calls]
    messages = [{"role": "user", "content": "Weather in Paris, and the time?"}]
    got = svc.oai.chat.completions.create(model="tools", messages=messages,
                                          tools=[WEATHER_TOOL, TIME_TOOL])  # fmt: skip
    choice = got.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == fam.content
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == \
        want_calls
    assert got.usage.prompt_tokens == len(_hf_tool_prompt(tools_model, messages,
                                                          [WEATHER_TOOL, TIME_TOOL]))

    with svc.oai.chat.completions.stream(model="tools", messages=messages,
                                         tools=[WEATHER_TOOL, TIME_TOOL]) as stream:
        final = stream.get_final_completion()
    streamed = final.choices[0].message
    assert [(c.function.name, c.function.arguments) for c in streamed.tool_calls] == want_calls

    # the history goes back with the calls and their results
    first = choice.message.tool_calls[0]
    history = [*messages, {"role": "assistant", "content": choice.message.content,
                           "tool_calls": [first.model_dump()]},
               {"role": "tool", "tool_call_id": first.id, "content": "18 C"}]  # fmt: skip
    again = svc.oai.chat.completions.create(model="tools", messages=history,
                                            tools=[WEATHER_TOOL], tool_choice="none")
    assert again.choices[0].message.content == fam.plain_text
    status, text = _post(svc, "/tokenize", {"model": "tools", "messages": history,
                                            "tools": [WEATHER_TOOL]})
    template_history = [*messages, {"role": "assistant", "content": fam.content, "tool_calls": [
        {"id": first.id, "type": "function",
         "function": {"name": "get_weather", "arguments": PARIS}}]},
        {"role": "tool", "tool_call_id": first.id, "content": "18 C"}]  # fmt: skip
    assert status == 200
    assert json.loads(text)["tokens"] == _hf_tool_prompt(tools_model, template_history,
                                                         [WEATHER_TOOL])
    with pytest.raises(openai.BadRequestError, match="tool"):
        svc.oai.chat.completions.create(model="demo", messages=messages, tools=[WEATHER_TOOL])


def test_model_tokenizer_version_and_metrics_endpoints(svc, engine):
    card = svc.oai.models.retrieve("demo")
    assert card.id == "demo" and card.model_extra["max_model_len"] == 512
    with pytest.raises(openai.NotFoundError):
        svc.oai.models.retrieve("org/no-such-model")
    status, text = _post(svc, "/tokenize", {"model": "demo", "prompt": "Hello"})
    ids = list(engine.tokenizer("Hello").input_ids)
    assert status == 200 and json.loads(text)["tokens"] == ids
    status, text = _post(svc, "/detokenize", {"model": "demo", "tokens": ids})
    assert json.loads(text) == {"prompt": engine.tokenizer.decode(ids)}
    import segserve

    assert json.loads(_get(svc, "/version")[1]) == {"version": segserve.__version__}

    from prometheus_client.parser import text_string_to_metric_families

    svc.oai.completions.create(model="demo", prompt="metrics", max_tokens=2)

    def scrape() -> dict | None:
        status, text = _get(svc, "/metrics")
        assert status == 200
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.labels.get("model", sample.labels.get("model_name")) == "demo":
                    values[sample.name] = values.get(sample.name, 0) + sample.value
        done = values.get("segserve_time_to_first_token_seconds_count", 0) >= 1
        return values if done else None

    values = wait_for(scrape, timeout=30)
    assert values, "replica metrics never reached the ingress's /metrics"
    assert values["segserve_kv_blocks_total"] == 256
    assert values["segserve_requests_total"] >= 1
    assert "vllm:num_requests_running" in values and "vllm:kv_cache_usage_perc" in values
    # the other app's ingress knows its replica before it has sent it anything
    status, text = _get(svc, "/secure/metrics")
    assert status == 200

    def secure_blocks() -> bool:
        return 'segserve_kv_blocks_total{model="demo"' in _get(svc, "/secure/metrics")[1]

    assert wait_for(secure_blocks, timeout=30)


def test_models_and_health(svc):
    models = svc.oai.models.list()
    assert [m.id for m in models.data] == ["demo", "tools", "eval"]
    conn = http.client.HTTPConnection("127.0.0.1", svc.http_port, timeout=10)
    conn.request("GET", "/health")
    resp = conn.getresponse()
    assert (resp.status, json.loads(resp.read())) == (200, {"status": "ok"})
    for path in ("/health", "/v1/models"):  # HEAD beside GET: the status, no body
        conn.request("HEAD", path)
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"")
    conn.close()
    assert svc.grpc.health().status == "ok"
    listed = svc.grpc.list_models().models
    assert [(m.id, list(m.pools), m.max_model_len) for m in listed] == [
        ("demo", ["cpu"], 512), ("tools", ["cpu"], 2048), ("eval", ["eval"], 512)]


def test_real_model_answers_the_capital_question(svc):
    if svc.real_missing is not None:
        pytest.skip(svc.real_missing)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    got = svc.real_oai.chat.completions.create(model="smollm2", messages=messages,
                                               max_tokens=32, temperature=0)  # fmt: skip
    assert "Paris" in got.choices[0].message.content
    assert got.choices[0].finish_reason == "stop"
    reply = svc.real_grpc.generate(model="smollm2", messages=messages, max_tokens=32,
                                   temperature=0)  # fmt: skip
    assert "Paris" in reply.choices[0].text
    assert reply.choices[0].text == got.choices[0].message.content


# ----- gRPC ----------------------------------------------------------------------------------
def test_grpc_greedy_equals_engine(svc, engine):
    want = engine.generate(["Hello, world"], SamplingParams(max_tokens=10, temperature=0.0))[0]
    got = svc.grpc.generate("Hello, world", model="demo", max_tokens=10, temperature=0.0)
    assert list(got.choices[0].token_ids) == want.outputs[0].token_ids
    assert got.choices[0].text == want.outputs[0].text
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.pool == "cpu"

    parts = list(svc.grpc.generate_stream("Hello, world", model="demo", max_tokens=10,
                                          temperature=0.0))  # fmt: skip
    ids = [t for p in parts for c in p.choices for t in c.token_ids]
    assert ids == want.outputs[0].token_ids
    assert parts[-1].usage.completion_tokens == len(ids)
    msgs = svc.grpc.generate(messages=[{"role": "user", "content": "Hi"}], model="demo",
                             max_tokens=3, temperature=0.0)  # fmt: skip
    assert len(msgs.choices[0].token_ids) <= 3


def test_grpc_constraints_and_prompt_logprobs(svc, engine):
    import jsonschema

    got = svc.grpc.generate("Hi", model="demo", max_tokens=100, temperature=1.0, seed=2, n=2,
                            structured={"json": ORDER_SCHEMA})  # fmt: skip
    for c in got.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.text), ORDER_SCHEMA)
    got = svc.grpc.generate("Pick:", model="demo", max_tokens=10,
                            structured={"choice": ["alpha", "beta"]})
    assert got.choices[0].text in ("alpha", "beta")
    with pytest.raises(grpc.RpcError) as info:
        svc.grpc.generate("x", model="demo", structured={"regex": "[a-"})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "regex" in info.value.details()

    kw = {"max_tokens": 8, "temperature": 0.0, "min_tokens": 3, "logit_bias": {1: 100.0},
          "allowed_token_ids": list(range(1, 200)), "bad_words": ["the"]}
    got = svc.grpc.generate("Hello", model="demo", **kw)
    want = engine.generate(["Hello"], SamplingParams(**kw))[0].outputs[0]
    assert list(got.choices[0].token_ids) == want.token_ids and len(want.token_ids) == 4

    ids = list(range(5, 25))
    want = engine.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=2))[0]
    for reply in (svc.grpc.generate(prompt_token_ids=ids, model="demo", max_tokens=0,
                                    prompt_logprobs=2),
                  next(iter(svc.grpc.generate_stream(prompt_token_ids=ids, model="demo",
                                                     max_tokens=1, prompt_logprobs=2)))):
        c = reply.choices[0]
        assert [e.token_id for e in c.prompt_logprobs] == ids[1:]
        assert [e.logprob for e in c.prompt_logprobs] == pytest.approx(
            [e.logprob for e in want.prompt_logprobs], abs=1e-5)
        assert [[t.token_id for t in e.top] for e in c.prompt_logprobs] == [
            [t for t, _ in e.top] for e in want.prompt_logprobs]

    # tool_choice required: the reply is calls, whatever the model's template says
    tools = [{"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"size": {"enum": ["S", "M"]}},
        "required": ["size"]}}}]  # fmt: skip
    got = svc.grpc.generate(messages=[{"role": "user", "content": "Hi"}], model="demo",
                            tools=tools, tool_choice="required", parallel_tool_calls=False,
                            max_tokens=60)  # fmt: skip
    (call,) = got.choices[0].tool_calls
    assert call.name == "pick" and json.loads(call.arguments)["size"] in ("S", "M")
    assert got.choices[0].finish_reason == "tool_calls"


def test_lm_eval_against_the_live_service(svc, engine, tmp_path, monkeypatch):
    """lm-eval itself (its Python API, local-completions model) on two hand-made local tasks:
    multiple choice (loglikelihood: echo + logprobs, batches of 4 token-id prompts) and
    generation. The loglikelihoods it receives are the engine's prompt log-probs."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    from lm_eval import simple_evaluate
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager
    from segserve.models.demo import ensure_demo_model

    mc = [{"question": q, "choices": ch, "answer": a} for q, ch, a in [
        ("The soup is served", [" hot", " cold", " blue"], 0),
        ("Rain moves in from the", [" west", " east"], 0),
        ("A computer runs", [" programs", " soup", " rain", " slowly"], 0),
        ("Numbers like 42 appear", [" everywhere", " nowhere"], 0),
        ("The processor has a few", [" cores", " leaves"], 1),
    ]]  # fmt: skip
    gen = [{"question": q, "answer": "x"} for q in ("Hello", "The weather", "Thank you")]
    for name, rows in (("mc", mc), ("gen", gen)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "seg_mc.yaml").write_text(f"""task: seg_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / "mc.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    (tmp_path / "seg_gen.yaml").write_text(f"""task: seg_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / "gen.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
""")
    lm = LocalCompletionsAPI(model="eval", base_url=f"{svc.base}/v1/completions",
                             tokenizer=str(ensure_demo_model()), tokenizer_backend="huggingface",
                             batch_size=4, max_length=512, max_retries=1, timeout=60)
    out = simple_evaluate(model=lm, tasks=["seg_mc", "seg_gen"], log_samples=True,
                          task_manager=TaskManager(include_path=str(tmp_path),
                                                   include_defaults=False))
    assert 0.0 <= out["results"]["seg_mc"]["acc,none"] <= 1.0
    samples = out["samples"]["seg_mc"]
    assert sum(len(s["arguments"]) for s in samples) == 13
    for s in samples:
        for (context, continuation), resp in zip(s["arguments"], s["resps"], strict=True):
            ctx, cont = lm._encode_pair(context, continuation)
            scored = engine.generate([ctx + cont], SamplingParams(max_tokens=0,
                                                                  prompt_logprobs=0))[0]
            want = sum(e.logprob for e in scored.prompt_logprobs[len(ctx) - 1:])
            assert resp[0][0] == pytest.approx(want, abs=1e-4), (context, continuation)
    for s in out["samples"]["seg_gen"]:
        prompt = lm.tok_encode(s["arguments"][0][0])
        want = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0,
                                                        stop=["\n"], seed=1234))[0]
        assert s["resps"][0][0] == want.outputs[0].text


def test_grpc_chat_batches_and_tools(svc, engine):
    messages = [{"role": "user", "content": "Hi"}]
    tok = engine.tokenizer
    ids = list(tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                   add_special_tokens=False).input_ids)
    want = engine.generate([ids], SamplingParams(max_tokens=6, temperature=0.0))[0].outputs[0]
    got = svc.grpc.generate(messages=messages, model="demo", max_tokens=6, temperature=0.0)
    assert got.choices[0].text == want.text and got.usage.prompt_tokens == len(ids)

    prompts = ["Hello", "The quick brown fox"]
    want = engine.generate(prompts, SamplingParams(n=2, seed=4, max_tokens=5, temperature=1.0))
    got = svc.grpc.generate(prompts, model="demo", n=2, seed=4, max_tokens=5, temperature=1.0)
    assert [(c.index, c.text) for c in got.choices] == [
        (k, o.text) for k, o in enumerate(o for r in want for o in r.outputs)]
    assert got.usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in want)
    token_lists = [[0, 17, 42], [0, 99]]
    want = engine.generate(token_lists, SamplingParams(max_tokens=4, temperature=0.0))
    texts = {0: "", 1: ""}
    for part in svc.grpc.generate_stream(prompt_token_ids=token_lists, model="demo",
                                         max_tokens=4, temperature=0.0):
        for c in part.choices:
            texts[c.index] += c.text
    assert [texts[0], texts[1]] == [r.outputs[0].text for r in want]

    fam = FAMILIES["hermes"]
    want_calls = [(name, json.dumps(args)) for name, args in fam.calls]
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    got = svc.grpc.generate(messages=ask, model="tools", tools=[WEATHER_TOOL, TIME_TOOL])
    (choice,) = got.choices
    assert (choice.text, choice.finish_reason) == (fam.content, "tool_calls")
    assert [(c.name, c.arguments) for c in choice.tool_calls] == want_calls
    parts = list(svc.grpc.generate_stream(messages=ask, model="tools",
                                          tools=[WEATHER_TOOL, TIME_TOOL]))
    calls = [(c.name, c.arguments) for p in parts for ch in p.choices for c in ch.tool_calls]
    assert calls == want_calls
    assert "".join(ch.text for p in parts for ch in p.choices) == fam.content
    assert [ch.finish_reason for p in parts for ch in p.choices][-1] == "tool_calls"
    plain = svc.grpc.generate(messages=ask, model="tools", tools=[WEATHER_TOOL],
                              tool_choice="none")
    assert plain.choices[0].text == fam.plain_text and not plain.choices[0].tool_calls
    for bad in (dict(messages=ask, model="demo", tools=[WEATHER_TOOL]),
                dict(prompt="hi", model="tools", tools=[WEATHER_TOOL]),
                dict(messages=ask, model="tools", tools=[WEATHER_TOOL],
                     tool_choice={"type": "function", "function": {"name": "nope"}})):
        with pytest.raises(grpc.RpcError) as info:
            svc.grpc.generate(**bad)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad


# ----- bad input -----------------------------------------------------------------------------
BAD_HTTP = [
    ("/v1/completions", b"{not json", 400),
    ("/v1/completions", b"[1, 2]", 400),
    ("/v1/completions", {"prompt": "hi"}, 400),  # no model
    ("/v1/completions", {"model": "demo"}, 400),  # no prompt
    ("/v1/completions", {"model": "demo", "prompt": "hi", "max_tokens": "8"}, 400),
    ("/v1/completions", {"model": "demo", "prompt": "hi", "temperature": "hot"}, 400),
    ("/v1/completions", {"model": "demo", "prompt": 12}, 400),
    ("/v1/completions", {"model": "demo", "prompt": "hi", "max_tokens": -1}, 400),
    ("/v1/completions", {"model": "demo", "prompt": "hi", "temperature": -1}, 400),
    ("/v1/completions", {"model": "demo", "prompt": "hi", "top_p": 1.5}, 400),
    ("/v1/completions", {"model": "demo", "prompt": "hi", "n": 0}, 400),
    ("/v1/completions", {"model": "demo", "prompt": "hi", "logprobs": 50}, 400),
    ("/v1/completions", {"model": "demo", "prompt": "hi", "stop": [1]}, 400),
    ("/v1/completions", {"model": "demo", "prompt": ""}, 400),
    ("/v1/completions", {"model": "demo", "prompt": [999999]}, 400),
    ("/v1/completions", {"model": "demo", "prompt": "hi", "max_tokens": 10_000}, 400),
    ("/v1/completions", {"model": "demo", "prompt": "x " * 600, "max_tokens": 1}, 400),
    ("/v1/completions", {"model": "demo", "prompt": "hi", "device": "tpu"}, 400),
    ("/v1/completions", {"model": "demo", "prompt": "hi", "device": "gpu"}, 404),
    ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404),
    ("/v1/chat/completions", {"model": "demo", "messages": []}, 400),
    ("/v1/chat/completions", {"model": "demo", "messages": [{"role": "wizard",
                                                             "content": "x"}]}, 400),
    ("/v1/chat/completions", {"model": "demo", "messages": "hi"}, 400),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user",
                                                             "content": "x"}]}, 404),
    ("/v1/nothing", {"model": "demo"}, 404),
]  # fmt: skip


def test_bodies_too_large_or_compressed_get_413_and_415(svc):
    body = json.dumps({"model": "demo", "prompt": "hi", "max_tokens": 1}).encode()
    status, text = _post(svc, "/v1/completions", gzip.compress(body), {"Content-Encoding": "gzip"})
    assert status == 415 and "gzip" in json.loads(text)["error"]["message"]
    # past the default bound (32 MiB): refused from its Content-Length, before it is read
    huge = body[:-1] + b', "user": "' + b"u" * (32 * 2**20) + b'"}'
    status, text = _post(svc, "/v1/completions", huge)
    assert status == 413 and "max_body_bytes" in json.loads(text)["error"]["message"]
    assert _post(svc, "/v1/completions", body)[0] == 200


@pytest.mark.parametrize("path,body,status", BAD_HTTP)
def test_bad_http_input_gets_4xx_and_service_stays_healthy(svc, path, body, status):
    got, text = _post(svc, path, body)
    assert got == status, text
    err = json.loads(text)["error"]
    assert err["message"] and err["code"] == status
    ok = svc.oai.completions.create(model="demo", prompt="hi", max_tokens=2, temperature=0)
    assert len(ok.choices[0].text) >= 0 and ok.usage.completion_tokens >= 1


def test_openai_client_sees_typed_errors(svc):
    with pytest.raises(openai.NotFoundError):
        svc.oai.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        svc.oai.completions.create(model="demo", prompt="hi", temperature=500)


@pytest.mark.parametrize(
    "kwargs,code",
    [
        (dict(prompt="hi", model="nope"), grpc.StatusCode.NOT_FOUND),
        (dict(prompt="hi", model="demo", temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(prompt="hi", model="demo", max_tokens=10_000), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(prompt="hi", model="demo", device="gpu"), grpc.StatusCode.NOT_FOUND),
        (dict(prompt_token_ids=[999999], model="demo"), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(prompt="hi", model=""), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)  # fmt: skip
def test_bad_grpc_input(svc, kwargs, code):
    for call in (svc.grpc.generate, lambda **kw: list(svc.grpc.generate_stream(**kw))):
        with pytest.raises(grpc.RpcError) as info:
            call(**kwargs)
        assert info.value.code() == code, info.value.details()
    assert svc.grpc.generate("hi", model="demo", max_tokens=2).choices[0].token_ids


def test_grpc_checks_what_the_client_library_would_not(svc):
    """Raw stub calls: the server validates on its own, whatever client sends the bytes."""
    from segserve.proto import segserve_pb2 as pb
    from segserve.proto import segserve_pb2_grpc as pb_grpc

    bad = [
        pb.GenerateRequest(model="demo", prompt="hi",
                           sampling=pb.SamplingOptions(early_stopping="sometimes")),
        pb.GenerateRequest(model="demo", prompt="hi", messages=[pb.ChatMessage(role="user",
                                                                               content="x")]),
        pb.GenerateRequest(model="demo"),  # no input at all
        pb.GenerateRequest(model="demo", prompt="hi", device="tpu"),
        pb.GenerateRequest(model="demo", messages=[pb.ChatMessage(role="wizard", content="x")]),
    ]  # fmt: skip
    with grpc.insecure_channel(svc.grpc_target) as channel:
        stub = pb_grpc.SegServeStub(channel)
        md = (("application", "segserve"),)
        for request in bad:
            with pytest.raises(grpc.RpcError) as info:
                stub.Generate(request, metadata=md, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request


# ----- auth ----------------------------------------------------------------------------------
def test_api_key(svc):
    body = {"model": "demo", "prompt": "hi", "max_tokens": 2}
    assert _post(svc, "/secure/v1/completions", body)[0] == 401
    wrong = {"Authorization": "Bearer nope"}
    status, text = _post(svc, "/secure/v1/completions", body, wrong)
    assert status == 401 and json.loads(text)["error"]["type"] == "authentication_error"
    right = {"Authorization": f"Bearer {API_KEY}"}
    assert _post(svc, "/secure/v1/completions", body, right)[0] == 200
    assert _post(svc, "/v1/completions", body)[0] == 200  # the other app has no key

    bad = SegServeClient(svc.grpc_target, application="secure", api_key="nope", timeout=30)
    good = SegServeClient(svc.grpc_target, application="secure", api_key=API_KEY, timeout=30)
    with bad, good:
        with pytest.raises(grpc.RpcError) as info:
            bad.generate("hi", model="demo", max_tokens=2)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert good.generate("hi", model="demo", max_tokens=2).choices[0].token_ids


# ----- overload and disconnects --------------------------------------------------------------
def test_overload_gets_429_and_every_admitted_request_completes(svc):
    body = {"model": "demo", "prompt": "overload", "max_tokens": 48, "ignore_eos": True}
    results: list[tuple[int, str]] = []

    def call():
        results.append(_post(svc, "/v1/completions", body))

    threads = [threading.Thread(target=call) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(s for s, _ in results)
    assert 429 in statuses, statuses
    assert set(statuses) <= {200, 429}, [r for r in results if r[0] not in (200, 429)]
    for status, text in results:
        payload = json.loads(text)
        if status == 200:
            assert payload["usage"]["completion_tokens"] == 48
        else:
            assert payload["error"]["type"] == "rate_limit_error"
    # the service recovers
    assert svc.oai.completions.create(model="demo", prompt="hi", max_tokens=2).choices


def test_overload_grpc_resource_exhausted(svc):
    codes: list = []

    def call():
        try:
            svc.grpc.generate("overload", model="demo", max_tokens=48, ignore_eos=True)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            codes.append(e.code())

    threads = [threading.Thread(target=call) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes, codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes


def test_disconnect_mid_stream_frees_blocks(svc):
    idle = wait_for(lambda: svc.stats()["running_requests"] == 0 and svc.stats())
    assert idle, "the replica never went idle"
    assert set(KV_GAUGES) | set(KV_COUNTERS) <= set(idle)  # everything we export exists

    conn = http.client.HTTPConnection("127.0.0.1", svc.http_port, timeout=60)
    body = {"model": "demo", "prompt": "a long story " * 8, "max_tokens": 400,
            "ignore_eos": True, "stream": True}  # fmt: skip
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    for _ in range(3):  # a few tokens arrive: the request holds blocks now
        assert resp.readline().startswith(b"data: ")
        resp.readline()
    busy = wait_for(lambda: svc.stats()["blocks_used"] > idle["blocks_used"])
    assert busy, "the streaming request never showed up in the KV metrics"
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()

    settled = wait_for(lambda: svc.stats()["running_requests"] == 0 and svc.stats())
    assert settled and settled["blocks_used"] == idle["blocks_used"], settled


def test_prometheus_metrics_exported(svc):
    """The replica's ray.util.metrics reach Ray's Prometheus endpoint, tagged by model/pool."""
    svc.oai.completions.create(model="demo", prompt="metrics", max_tokens=2)
    wanted = ["ray_segserve_requests_total", "ray_segserve_kv_blocks_total",
              "ray_segserve_kv_utilization", "ray_segserve_time_to_first_token_seconds_count",
              "ray_segserve_prompt_tokens_total", "ray_segserve_generation_tokens_total"]

    def scrape() -> str | None:
        conn = http.client.HTTPConnection("127.0.0.1", svc.metrics_port, timeout=10)
        try:
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
        except OSError:
            return None
        finally:
            conn.close()
        ours = [ln for ln in text.splitlines() if ln.startswith("ray_segserve_")]
        have = all(any(ln.startswith(w) and 'model="demo"' in ln for ln in ours) for w in wanted)
        return text if have else None

    text = wait_for(scrape, timeout=60)
    assert text, "segserve metrics never showed up on Ray's metrics endpoint"
    total = [ln for ln in text.splitlines() if ln.startswith("ray_segserve_kv_blocks_total{")]
    assert any(ln.endswith(" 256.0") for ln in total), total  # the pool's size


# ----- soak -----------------------------------------------------------------------------------
SOAK_S = 60.0  # the minute; bench/soak.py runs it for as long as asked (10 min in the note)


def test_soak_mixed_workload_loses_nothing(svc):
    import asyncio
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "soak.py"
    spec = importlib.util.spec_from_file_location("soak", path)
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    report = asyncio.run(soak.run_soak(svc.base, svc.grpc_target, "segserve", SOAK_S,
                                       concurrency=6, stats=svc.stats))  # fmt: skip
    assert report["num_unexpected"] == 0, report
    assert report["leaked_blocks"] == 0, report
    kinds = {k.split("/")[0] for k in report["outcomes"]}
    assert {"stream", "bad", "grpc-bad"} <= kinds, report  # the mix really ran
    assert svc.oai.completions.create(model="demo", prompt="hi", max_tokens=2).choices


# ----- faults (last: it kills the "secure" app's replica) -----------------------------------
INTERNALS = ("Actor", "actor_id", "pid", "127.0.0.1", "Traceback", "ray.")


def test_killing_the_replica_mid_stream_gives_an_opaque_503_and_the_service_recovers(svc):
    auth = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    conn = http.client.HTTPConnection("127.0.0.1", svc.http_port, timeout=60)
    body = {"model": "demo", "prompt": "a long story " * 8, "max_tokens": 400,
            "ignore_eos": True, "stream": True}  # fmt: skip
    conn.request("POST", "/secure/v1/completions", json.dumps(body), auth)
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.readline().startswith(b"data: ")  # the stream is under way

    name = deployment_name("demo", "cpu")
    actors = [a for a in ray.util.list_named_actors(all_namespaces=True)
              if a["name"].startswith(f"SERVE_REPLICA::secure#{name}#")]  # fmt: skip
    assert len(actors) == 1, actors
    ray.kill(ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"]))

    events = [ln[6:] for ln in resp.read().decode().splitlines() if ln.startswith("data: ")]
    conn.close()
    errors = [json.loads(e)["error"] for e in events if e != "[DONE]" and "error" in e]
    if errors:  # or the stream finished before the kill landed: a complete answer
        assert errors[0]["code"] == 503 and errors[0]["type"] == "service_unavailable"
        assert not any(s in errors[0]["message"] for s in INTERNALS), errors[0]

    short = {"model": "demo", "prompt": "hi", "max_tokens": 2}
    seen = []

    def answered():
        status, text = _post(svc, "/secure/v1/completions", short, auth)
        seen.append((status, text))
        return status == 200

    assert wait_for(answered, timeout=60), seen[-3:]
    for status, text in seen[:-1]:  # while Serve replaces it: retryable, opaque
        assert status == 503 and not any(s in text for s in INTERNALS), (status, text)


# ----- engine_in_ingress -----------------------------------------------------------------------
def _one_metrics(svc) -> dict[tuple[str, str | None], float]:
    """The "one" app's /metrics samples of its engine, by (name, status label)."""
    from prometheus_client.parser import text_string_to_metric_families

    conn = http.client.HTTPConnection("127.0.0.1", svc.http_port, timeout=60)
    conn.request("GET", "/one/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return {(s.name, s.labels.get("status")): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples if s.labels.get("model") == "demo"}  # fmt: skip


def test_engine_in_ingress_streams_the_engines_tokens_and_frees_a_leavers_blocks(svc, engine):
    """The "one" app runs its engine inside its ingress replica (one deployment): the same
    answers over HTTP and gRPC, its /metrics from its own engine, and a client that leaves
    mid-stream frees its blocks (the in-process call is cancelled as Serve cancels one)."""
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    want = engine.generate([[5, 6, 7, 8, 9]], params)[0].outputs[0]
    body = {"model": "demo", "prompt": [5, 6, 7, 8, 9], "max_tokens": 8, "temperature": 0.0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    status, text = _post(svc, "/one/v1/completions", body)
    assert status == 200, text
    chunks = [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want.text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    with SegServeClient(svc.grpc_target, application="one", timeout=60) as client:
        reply = client.generate(prompt_token_ids=[5, 6, 7, 8, 9], model="demo", max_tokens=8,
                                temperature=0.0, ignore_eos=True)  # fmt: skip
    assert list(reply.choices[0].token_ids) == want.token_ids
    done = _one_metrics(svc)
    assert done["segserve_kv_blocks_used", None] == 0
    assert done["segserve_requests_total", "length"] == 2

    conn = http.client.HTTPConnection("127.0.0.1", svc.http_port, timeout=60)
    conn.request("POST", "/one/v1/completions", json.dumps({**body, "max_tokens": 400}),
                 {"Content-Type": "application/json"})  # fmt: skip
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: {")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    left = wait_for(lambda: (m := _one_metrics(svc)).get(("segserve_requests_total", "abort"))
                     and m)  # fmt: skip
    assert left and left["segserve_kv_blocks_used", None] == 0, left


def test_a_dead_engine_process_ends_its_stream_cleanly_and_its_replica_is_replaced(svc):
    """The "one" app's engine steps in a child process of its replica: killed mid-stream, the
    client gets an opaque error event (no internals), the replica fails its health check, and
    Serve replaces it (a new engine process) within 60 s."""
    (pid,) = engine_processes()
    body = {"model": "demo", "prompt": [5, 6, 7], "max_tokens": 400, "temperature": 0.0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", svc.http_port, timeout=60)
    conn.request("POST", "/one/v1/completions", json.dumps(body),
                 {"Content-Type": "application/json"})  # fmt: skip
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: {")
    os.kill(pid, 9)
    rest = resp.read().decode()
    conn.close()
    events = [e.strip() for e in rest.split("\n\n")]
    errors = [json.loads(e[6:])["error"] for e in events
              if e.startswith("data: {") and '"error"' in e]  # fmt: skip
    assert errors and errors[0]["code"] == 500, rest[-500:]
    assert "request id" in errors[0]["message"]
    assert not any(s in errors[0]["message"] for s in INTERNALS), errors
    short = {**body, "max_tokens": 4, "stream": False}
    assert wait_for(lambda: _post(svc, "/one/v1/completions", short)[0] == 200, 60)
    assert set(engine_processes()) - {pid}  # only the "one" app has one
