#!/usr/bin/env python
"""Fuzz the service over HTTP and gRPC for a given duration, then check that it is healthy.

    python bench/fuzz.py --duration 600            # its own local Ray Serve, the demo model
    python bench/fuzz.py --duration 60 --json fuzz.json

HTTP: schemathesis over the OpenAPI schema the ingress serves (/openapi.json), every check but
``positive_data_acceptance`` (a schema cannot say all that the service refuses with a 400: a
prompt plus max_tokens beyond the context, n above max_num_seqs, a regex that does not compile).
gRPC: every RPC of proto/segserve.proto with random messages (every field, values from the
edges of their types), valid requests with a few fields mutated, and raw bytes that are not a
message at all (corrupt wire format, invalid UTF-8 in strings, wrong wire types, garbage).

It passes when nothing answers HTTP 5xx, schemathesis finds no failure, no gRPC call ends with
a code other than OK, INVALID_ARGUMENT, NOT_FOUND or RESOURCE_EXHAUSTED (INTERNAL and UNKNOWN
above all), and afterwards a greedy request gives the answer it gave before, the replica's KV
blocks are back to idle and the ingress has nothing in flight. It exits 1 otherwise.

``run_http_fuzz``, ``run_grpc_fuzz`` and ``check_healthy`` are the pieces alone, against a
running service (tests/test_serve_fuzz.py runs them for a bounded number of cases).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import glob
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

MODEL = "demo"
VOCAB = 512  # the demo model's
# The fuzzed service: one small replica with a short context (64 tokens: a chat request without
# max_tokens generates up to it), so that no request is slow.
CONFIG: dict[str, Any] = {
    "models": [{"name": MODEL, "path": "demo", "dtype": "float32", "max_model_len": 64}],
    "pools": [{"name": "cpu", "device": "cpu", "num_replicas": 1, "num_kv_blocks": 256,
               "max_num_seqs": 4, "max_queue_len": 32, "max_num_batched_tokens": 256,
               "cpus_per_replica": 1}],
    "ingress": {"request_timeout_s": 120},
}  # fmt: skip
GRPC_ALLOWED = ("OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED")
# The health probe: greedy, so its answer is the same before and after the fuzzing.
PROBE = {"model": MODEL, "prompt": [1, 2, 3, 4, 5, 6], "max_tokens": 8, "temperature": 0,
         "ignore_eos": True}  # fmt: skip


# ----- HTTP: schemathesis ---------------------------------------------------------------------
def run_http_fuzz(base: str, *, max_examples: int | None = None, max_time: float | None = None,
                  seed: int = 0, workers: int = 2, phases: str | None = None,
                  ) -> dict[str, Any]:  # fmt: skip
    """schemathesis over ``base``/openapi.json (its CLI, in a subprocess): statuses answered,
    the failures it found and any 5xx."""
    with tempfile.TemporaryDirectory() as reports:
        cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{base}/openapi.json",
               "--checks", "all", "--exclude-checks", "positive_data_acceptance",
               "--request-timeout", "150", "--workers", str(workers), "--seed", str(seed),
               # slower than this is a hang: no request to the fuzzed service takes seconds
               "--max-response-time", "60",
               "--report", "ndjson", "--report-dir", reports, "--no-color"]  # fmt: skip
        if max_examples is not None:
            cmd += ["--max-examples", str(max_examples)]
        if phases is not None:  # examples, coverage, fuzzing, stateful (default: all)
            cmd += ["--phases", phases]
        if max_time is not None:
            cmd += ["--max-time", str(max(1, int(max_time)))]
        # cwd: schemathesis keeps a cache of its finds there (.schemathesis/), not in the repo
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=reports)
        (path,) = glob.glob(os.path.join(reports, "*.ndjson"))
        with open(path) as f:
            report = _read_ndjson(f)
    report["exit_code"] = proc.returncode
    report["summary"] = proc.stdout[proc.stdout.rfind("SUMMARY"):][-3000:]
    # schemathesis's own errors (its generator failing on a schema construct) are not the
    # service's; a transport error (connection reset, timeout) is.
    report["passed"] = not report["failures"] and not report["server_errors"] and not [
        e for e in report["errors"] if "Network" in e or "Timeout" in e or "Connection" in e]
    return report


def _read_ndjson(lines: Any) -> dict[str, Any]:
    statuses: Counter[str] = Counter()
    seconds: Counter[str] = Counter()  # time spent waiting for answers, by operation
    failures: list[str] = []
    errors: list[str] = []
    server_errors: list[str] = []
    for line in lines:
        event = json.loads(line)
        kind, body = next(iter(event.items()))
        if kind == "ScenarioFinished":
            recorder = body.get("recorder", {})
            for interaction in recorder.get("interactions", {}).values():
                resp, req = interaction.get("response"), interaction.get("request", {})
                if resp is None:
                    continue
                status = resp["status_code"]
                statuses[str(status)] += 1
                seconds[recorder.get("label", "?")] += resp.get("elapsed", 0)
                if status >= 500:
                    content = (resp.get("content") or {}).get("$base64", "")
                    server_errors.append(f"{req.get('method')} {req.get('uri')} -> {status} "
                                         f"{base64.b64decode(content)[:300]!r}")  # fmt: skip
            for checks in recorder.get("checks", {}).values():
                for check in checks:
                    if check.get("status") == "failure":
                        failures.append(f"{check.get('name')}: "
                                        f"{json.dumps(check.get('failure_info'))[:500]}")
        elif kind == "NonFatalError":
            errors.append(json.dumps(body)[:500])
    return {"cases": sum(statuses.values()), "statuses": dict(sorted(statuses.items())),
            "failures": failures[:20], "num_failures": len(failures), "errors": errors[:20],
            "server_errors": server_errors[:20],
            "seconds": {k: round(v, 1) for k, v in seconds.most_common()}}  # fmt: skip


# ----- gRPC: random, mutated and raw messages -------------------------------------------------
INT_EDGES = (0, 1, 2, 3, 7, 16, 100, 511, 512, 513, 4096, 2**31 - 1, 2**31, 2**32 - 1)
FLOAT_EDGES = (0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1e-320, 1e308, -1e308, float("inf"),
               float("-inf"), float("nan"), 100.0, -100.0, 101.0)  # fmt: skip
STRINGS = (
    "", " ", "demo", "a" * 5000, "\x00", "\x00demo", "héllo wörld ✓ 🤖", "\u202e\ufeff",
    "<|im_start|>", "</s>", "{{ raise_exception('x') }}",
    "{% for i in range(99999) %}x{% endfor %}",
    "[" * 5000 + "]" * 5000, '{"type": "object"}', '{"type": "array", "items": 5}', "null",
    "(a+)+$", "[", "a{99999}", ".*", "root ::= \"x\"", "start: \"a\"+", "true", "never",
    "auto", "required", "none", "user", "assistant", "tool", "system", "cpu", "gpu",
)  # fmt: skip
# Fields whose useful values are few: mostly one of these, sometimes anything.
CHOICES = {
    "model": (MODEL,), "device": ("auto", "cpu", "gpu"), "role": ("user", "assistant", "system"),
    "early_stopping": ("true", "false", "never"), "mode": ("none", "auto", "required"),
    "type": ("function",),
}  # fmt: skip
SCALAR_RANGES = {  # protobuf FieldDescriptor types -> (lo, hi)
    5: (-2**31, 2**31 - 1), 17: (-2**31, 2**31 - 1), 15: (-2**31, 2**31 - 1),  # int32
    3: (-2**63, 2**63 - 1), 18: (-2**63, 2**63 - 1), 16: (-2**63, 2**63 - 1),  # int64
    13: (0, 2**32 - 1), 7: (0, 2**32 - 1), 4: (0, 2**64 - 1), 6: (0, 2**64 - 1),  # unsigned
}  # fmt: skip
TYPE_DOUBLE, TYPE_FLOAT, TYPE_BOOL, TYPE_STRING, TYPE_MESSAGE = 1, 2, 8, 9, 11


def _int(rng: random.Random, lo: int, hi: int) -> int:
    pick = rng.random()
    if pick < 0.5:
        v = rng.choice(INT_EDGES + tuple(-e for e in INT_EDGES[:8]))
    elif pick < 0.8:
        v = rng.randrange(0, VOCAB)
    else:
        v = rng.randint(lo, hi)
    return min(max(v, lo), hi)


def _string(rng: random.Random, name: str) -> str:
    if name in CHOICES and rng.random() < 0.85:
        return rng.choice(CHOICES[name])
    if rng.random() < 0.7:
        return rng.choice(STRINGS)
    # random code points, surrogates excluded (protobuf cannot send them; the raw cases do)
    return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0xA0, 0xD800),
                                   rng.randrange(0xE000, 0x110000)]))
                   for _ in range(rng.randrange(1, 40)))  # fmt: skip


def _value(rng: random.Random, field: Any, depth: int) -> Any:
    t = field.type
    if t in SCALAR_RANGES:
        return _int(rng, *SCALAR_RANGES[t])
    if t in (TYPE_DOUBLE, TYPE_FLOAT):
        v = rng.choice(FLOAT_EDGES) if rng.random() < 0.6 else rng.uniform(-3, 3)
        if t == TYPE_FLOAT and abs(v) > 3e38 and v == v and abs(v) != float("inf"):
            v = 3e38 if v > 0 else -3e38
        return v
    if t == TYPE_BOOL:
        return rng.random() < 0.5
    if t == TYPE_STRING:
        return _string(rng, field.name)
    raise TypeError(f"unhandled field type {t} of {field.full_name}")


def fill_random(rng: random.Random, message: Any, depth: int = 0, p: float = 0.5) -> Any:
    """Set a random subset of ``message``'s fields (each with probability ``p``) to random
    values, recursing into sub-messages; returns the message."""
    for field in message.DESCRIPTOR.fields:
        if rng.random() > p:
            continue
        _set_random(rng, message, field, depth)
    return message


def _set_random(rng: random.Random, message: Any, field: Any, depth: int) -> None:
    name = field.name
    if field.type == TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
        entry = field.message_type.fields_by_name
        key_f, val_f = entry["key"], entry["value"]
        target = getattr(message, name)
        for _ in range(rng.randrange(0, 5)):
            target[_value(rng, key_f, depth)] = _value(rng, val_f, depth)
        return
    if field.is_repeated:
        target = getattr(message, name)
        count = rng.choice([0, 1, 1, 2, 3, 5, 300]) if depth < 3 else rng.randrange(0, 2)
        for _ in range(count):
            if field.type == TYPE_MESSAGE:
                fill_random(rng, target.add(), depth + 1)
            else:
                target.append(_value(rng, field, depth))
        return
    if field.type == TYPE_MESSAGE:
        if depth < 3:
            fill_random(rng, getattr(message, name), depth + 1)
            getattr(message, name).SetInParent()
        return
    setattr(message, name, _value(rng, field, depth))


def _valid_request(pb: Any, rng: random.Random) -> Any:
    """A request the service answers: tokens, text, chat or a batch, a few tokens long."""
    sampling = pb.SamplingOptions(max_tokens=rng.randrange(1, 6), temperature=0.0)
    kind = rng.randrange(4)
    if kind == 0:
        return pb.GenerateRequest(model=MODEL, prompt_token_ids=[1, 2, 3, 4], sampling=sampling)
    if kind == 1:
        return pb.GenerateRequest(model=MODEL, prompt="Hello there", sampling=sampling)
    if kind == 2:
        return pb.GenerateRequest(model=MODEL, sampling=sampling,
                                  messages=[pb.ChatMessage(role="user", content="hi")])
    return pb.GenerateRequest(model=MODEL, prompts=["a", "b c"], sampling=sampling)


def _mutate(pb: Any, rng: random.Random) -> Any:
    """A valid request with one to three fields (anywhere in it) set at random."""
    request = _valid_request(pb, rng)
    for _ in range(rng.randrange(1, 4)):
        target = request.sampling if rng.random() < 0.6 else request
        field = rng.choice(target.DESCRIPTOR.fields)
        target.ClearField(field.name)
        _set_random(rng, target, field, 1)
    return request


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    tag = _varint(number << 3 | wire_type)
    if wire_type == 2:
        return tag + _varint(len(payload)) + payload
    return tag + payload


def _raw(pb: Any, rng: random.Random) -> bytes:
    """Bytes that are not a valid GenerateRequest, or barely are."""
    good = _valid_request(pb, rng).SerializeToString()
    kind = rng.randrange(10)
    if kind == 0:  # random bytes flipped
        b = bytearray(good)
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    if kind == 1:  # cut short
        return good[: rng.randrange(len(good))]
    if kind == 2:  # garbage
        return rng.randbytes(rng.randrange(0, 300))
    if kind == 3:  # a string field (model; or a chat message's content) that is not UTF-8
        bad = rng.choice([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"])
        if rng.random() < 0.5:
            return good + _field(1, 2, b"demo" + bad)
        return good + _field(4, 2, _field(1, 2, b"user") + _field(2, 2, bad))
    if kind == 4:  # known fields with the wrong wire type
        number = rng.choice([1, 2, 3, 5, 6, 7])
        return good + rng.choice([_field(number, 0, _varint(rng.randrange(2**40))),
                                  _field(number, 5, struct.pack("<I", 7)),
                                  _field(number, 1, struct.pack("<d", 1.5))])  # fmt: skip
    if kind == 5:  # a length prefix far past the end
        return good + _varint(2 << 3 | 2) + _varint(2**31)
    if kind == 6:  # an over-long varint
        return good + _varint(5 << 3 | 0) + b"\xff" * 11 + b"\x01"
    if kind == 7:  # uint32 fields sent as 64-bit negatives (they wrap)
        sampling = _field(1, 0, _varint(-1)) + _field(12, 0, _varint(-5))
        return good + _field(5, 2, sampling)
    if kind == 8:  # huge repeated token ids, packed
        ids = b"".join(_varint(rng.choice([0, 2**32 - 1, 2**35, 511, 512])) for _ in range(50))
        return _field(1, 2, b"demo") + _field(3, 2, ids)
    return good + _field(rng.randrange(30, 2**29 - 1), 2, rng.randbytes(8))  # unknown field


class _GrpcOutcomes:
    def __init__(self) -> None:
        self.codes: Counter[tuple[str, str, str]] = Counter()
        self.unexpected: list[str] = []
        self.examples: dict[str, str] = {}  # code -> the first details seen with it

    def add(self, rpc: str, kind: str, code: str, why: str = "") -> None:
        if why.startswith("Stream removed"):  # the transport failed, whatever the code says
            code = f"TRANSPORT_{code}"
        self.codes[(rpc, kind, code)] += 1
        self.examples.setdefault(code, f"{rpc}/{kind}: {why}"[:300])
        if code not in GRPC_ALLOWED:
            self.unexpected.append(f"{rpc}/{kind}: {code} {why}"[:400])


async def _call_grpc(channel: Any, rng: random.Random, out: _GrpcOutcomes, app: str) -> None:
    import grpc
    from segserve.proto import segserve_pb2 as pb

    rpc = rng.choice(["Generate", "GenerateStream", "Generate", "GenerateStream", "ListModels",
                      "Health"])  # fmt: skip
    request_type = {"ListModels": pb.ListModelsRequest, "Health": pb.HealthRequest}.get(
        rpc, pb.GenerateRequest)
    pick = rng.random()
    if pick < 0.3:
        kind, payload = "raw", _raw(pb, rng)
    elif pick < 0.65 and request_type is pb.GenerateRequest:
        kind, payload = "mutated", _mutate(pb, rng).SerializeToString()
    else:
        kind, payload = "random", fill_random(rng, request_type()).SerializeToString()
    method = f"/segserve.v1.SegServe/{rpc}"
    md = (("application", app),)
    try:
        if rpc == "GenerateStream":
            parts = [pb.GenerateResponse.FromString(b) async for b in
                     channel.unary_stream(method)(payload, metadata=md, timeout=150)]
            if not parts or not parts[-1].HasField("usage"):
                return out.add(rpc, kind, "BAD_STREAM", f"no usage at the end: {parts[-1:]}")
        else:
            reply = await channel.unary_unary(method)(payload, metadata=md, timeout=150)
            {"Generate": pb.GenerateResponse, "ListModels": pb.ListModelsResponse,
             "Health": pb.HealthResponse}[rpc].FromString(reply)
        out.add(rpc, kind, "OK")
    except grpc.aio.AioRpcError as e:
        out.add(rpc, kind, e.code().name, f"{e.details()} <- {payload[:200]!r}")


async def run_grpc_fuzz(target: str, app: str, *, cases: int | None = None,
                        duration_s: float | None = None, seed: int = 0,
                        concurrency: int = 4) -> dict[str, Any]:  # fmt: skip
    """Random, mutated and raw requests to every RPC, ``cases`` of them or for ``duration_s``."""
    import grpc

    out = _GrpcOutcomes()
    end = time.monotonic() + duration_s if duration_s is not None else None
    issued = 0

    async with grpc.aio.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", 64 << 20)]) as channel:  # fmt: skip
        async def worker(i: int) -> None:
            nonlocal issued
            rng = random.Random(seed * 1000 + i)
            while (cases is None or issued < cases) and (end is None or time.monotonic() < end):
                issued += 1
                try:
                    await _call_grpc(channel, rng, out, app)
                except Exception as e:  # the fuzzer's own failure is an outcome too
                    out.add("?", "client", "CLIENT_ERROR", repr(e))

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    codes: Counter[str] = Counter()
    for (_, _, code), n in out.codes.items():
        codes[code] += n
    return {"cases": sum(out.codes.values()), "codes": dict(sorted(codes.items())),
            "by_rpc": {"/".join(k): n for k, n in sorted(out.codes.items())},
            "examples": out.examples,
            "unexpected": out.unexpected[:20], "num_unexpected": len(out.unexpected),
            "passed": not out.unexpected}  # fmt: skip


# ----- health afterwards ----------------------------------------------------------------------
def probe_answer(base: str) -> list[int]:
    """The greedy probe's tokens (HTTP)."""
    import urllib.request

    req = urllib.request.Request(f"{base}/v1/completions", json.dumps(PROBE).encode(),
                                 {"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=120) as resp:
        body = json.loads(resp.read())
    return body["choices"][0]["text"]


def wait_idle(stats: Callable[[], dict[str, float]], in_flight: Callable[[], dict[str, int]],
              timeout_s: float = 60.0) -> dict[str, Any]:  # fmt: skip
    """Poll until the replica runs and queues nothing and the ingress has nothing in flight;
    the last readings (a bound on waiting for state to settle, not a speed test)."""
    deadline = time.monotonic() + timeout_s
    while True:
        s, f = stats(), in_flight()
        idle = not s["running_requests"] and not s["waiting_requests"] and not any(f.values())
        if idle or time.monotonic() > deadline:
            return {"idle": idle, "blocks_used": int(s["blocks_used"]), "in_flight": f,
                    "running": int(s["running_requests"]), "waiting": int(s["waiting_requests"])}
        time.sleep(0.2)


def check_healthy(base: str, expected: Any, stats: Callable[[], dict[str, float]],
                  in_flight: Callable[[], dict[str, int]]) -> dict[str, Any]:  # fmt: skip
    """After the fuzzing: idle with no KV block held, and the probe answers as before."""
    settled = wait_idle(stats, in_flight)
    answer = probe_answer(base)
    settled.update(probe_ok=answer == expected, passed=settled["idle"] and answer == expected
                   and settled["blocks_used"] == 0)  # fmt: skip
    return settled


# ----- the script -----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=60.0, help="seconds of fuzzing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grpc-concurrency", type=int, default=4)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=9000)
    p.add_argument("--json", default=None, help="also write the report here")
    args = p.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions
    from segserve.deploy.app import build_app
    from segserve.deploy.launch import DEFAULT_SERVE_MODE, GRPC_SERVICER, set_serve_mode
    from segserve.deploy.router import deployment_name

    set_serve_mode(DEFAULT_SERVE_MODE)  # as `segserve serve` starts Ray
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options=HTTPOptions(host="127.0.0.1", port=args.http_port),
                    grpc_options=gRPCOptions(port=args.grpc_port,
                                             grpc_servicer_functions=[GRPC_SERVICER]))  # fmt: skip
        serve.run(build_app(CONFIG), name="segserve", route_prefix="/")
        replica = serve.get_deployment_handle(deployment_name(MODEL, "cpu"), app_name="segserve")
        ingress = serve.get_deployment_handle("Ingress", app_name="segserve")
        base, target = f"http://127.0.0.1:{args.http_port}", f"127.0.0.1:{args.grpc_port}"
        expected = probe_answer(base)
        start = time.monotonic()

        async def both() -> tuple[dict[str, Any], dict[str, Any]]:
            http = asyncio.to_thread(run_http_fuzz, base, max_time=args.duration, seed=args.seed)
            grpc_ = run_grpc_fuzz(target, "segserve", duration_s=args.duration, seed=args.seed,
                                  concurrency=args.grpc_concurrency)
            return await asyncio.gather(http, grpc_)

        http, grpc_ = asyncio.run(both())
        elapsed = time.monotonic() - start
        health = check_healthy(base, expected, lambda: replica.stats.remote().result(),
                               lambda: ingress.in_flight.remote().result())
    finally:
        serve.shutdown()
        ray.shutdown()
    report = {"duration_s": args.duration, "elapsed_s": round(elapsed, 1), "http": http,
              "grpc": grpc_, "health": health,
              "passed": http["passed"] and grpc_["passed"] and health["passed"]}  # fmt: skip
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
