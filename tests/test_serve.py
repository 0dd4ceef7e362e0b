"""The service, live: real Ray Serve on loopback, called with the `openai` client, raw HTTP and
gRPC. One Ray/Serve instance for the whole module (it takes ~15 s to start on 2 cores).

The oracle for generated text is the engine itself (segserve.LLM in this process, same demo
model), which tests/test_engine_vs_hf.py holds to HF transformers. A second application in the
same Serve instance serves the real SmolLM2-135M-Instruct when it can be fetched, whose chat
answer must make sense (tests/test_smollm2.py holds it to HF).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
from types import SimpleNamespace

import grpc
import openai
import pytest

# A loopback test cluster: nothing to protect, and no ~/.ray/auth_token written by the tests.
os.environ["RAY_AUTH_MODE"] = "disabled"

import ray  # noqa: E402
from conftest import smollm2_or_reason  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve.config import HTTPOptions, gRPCOptions  # noqa: E402
from segserve import LLM, SamplingParams  # noqa: E402
from segserve.deploy.app import build_app  # noqa: E402
from segserve.deploy.launch import GRPC_SERVICER  # noqa: E402
from segserve.deploy.replica import KV_COUNTERS, KV_GAUGES  # noqa: E402
from segserve.deploy.router import deployment_name  # noqa: E402
from segserve.proto.client import SegServeClient  # noqa: E402

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
REAL = {
    "models": [{"name": "smollm2", "path": "smollm2", "dtype": "float32", "max_model_len": 512}],
    "pools": [{"name": "cpu", "device": "cpu", "num_replicas": 1, "num_kv_blocks": 64,
               "max_num_seqs": 4, "cpus_per_replica": 1}],
}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def svc():
    metrics_port = _free_port()
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=metrics_port)  # fmt: skip
    http_port, grpc_port = _free_port(), _free_port()
    serve.start(
        http_options=HTTPOptions(host="127.0.0.1", port=http_port),
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=[GRPC_SERVICER]),
    )
    serve.run(build_app(MAIN), name="segserve", route_prefix="/")
    serve.run(build_app(SECURE), name="secure", route_prefix="/secure")
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


def _wait_for(pred, timeout: float = 30.0):
    """Poll until pred() is truthy: a bound on waiting for state to settle, not a speed test."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


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


def test_models_and_health(svc):
    models = svc.oai.models.list()
    assert [m.id for m in models.data] == ["demo"]
    conn = http.client.HTTPConnection("127.0.0.1", svc.http_port, timeout=10)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()
    assert svc.grpc.health().status == "ok"
    listed = svc.grpc.list_models().models
    assert [(m.id, list(m.pools), m.max_model_len) for m in listed] == [("demo", ["cpu"], 512)]


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


# ----- bad input -----------------------------------------------------------------------------
BAD_HTTP = [
    ("/v1/completions", b"{not json", 400),
    ("/v1/completions", b"[1, 2]", 400),
    ("/v1/completions", {"prompt": "hi"}, 400),  # no model
    ("/v1/completions", {"model": "demo"}, 400),  # no prompt
    ("/v1/completions", {"model": "demo", "prompt": "hi", "max_tokens": "8"}, 400),
    ("/v1/completions", {"model": "demo", "prompt": "hi", "temperature": "hot"}, 400),
    ("/v1/completions", {"model": "demo", "prompt": 12}, 400),
    ("/v1/completions", {"model": "demo", "prompt": "hi", "max_tokens": 0}, 400),
    ("/v1/completions", {"model": "demo", "prompt": "hi", "temperature": -1}, 400),
    ("/v1/completions", {"model": "demo", "prompt": "hi", "top_p": 1.5}, 400),
    ("/v1/completions", {"model": "demo", "prompt": "hi", "n": 0}, 400),
    ("/v1/completions", {"model": "demo", "prompt": "hi", "logprobs": 50}, 400),
    ("/v1/completions", {"model": "demo", "prompt": "hi", "stop": [1]}, 400),
    ("/v1/completions", {"model": "demo", "prompt": "hi", "bogus_field": 1}, 400),
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
    idle = _wait_for(lambda: svc.stats()["running_requests"] == 0 and svc.stats())
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
    busy = _wait_for(lambda: svc.stats()["blocks_used"] > idle["blocks_used"])
    assert busy, "the streaming request never showed up in the KV metrics"
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()

    settled = _wait_for(lambda: svc.stats()["running_requests"] == 0 and svc.stats())
    assert settled and settled["blocks_used"] == idle["blocks_used"], settled


def test_prometheus_metrics_exported(svc):
    """The replica's ray.util.metrics reach Ray's Prometheus endpoint, tagged by model/pool."""
    svc.oai.completions.create(model="demo", prompt="metrics", max_tokens=2)
    wanted = ["ray_segserve_requests_total", "ray_segserve_kv_blocks_total",
              "ray_segserve_kv_utilization", "ray_segserve_time_to_first_token_seconds_count"]

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

    text = _wait_for(scrape, timeout=60)
    assert text, "segserve metrics never showed up on Ray's metrics endpoint"
    total = [ln for ln in text.splitlines() if ln.startswith("ray_segserve_kv_blocks_total{")]
    assert any(ln.endswith(" 256.0") for ln in total), total  # the pool's size
