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
GRPC_SERVICER = "segserve.proto.segserve_pb2_grpc.add_SegServeServicer_to_server"


def start(config_path: str | Path, address: str | None = None, blocking: bool = True) -> Any:
    """Deploy every application in the file; returns Serve's status once all are running."""
    # Ray 2.60 turns on token auth for new local clusters by default and keeps the token in
    # ~/.ray/auth_token (made on first start). We keep that default, but say so explicitly;
    # RAY_AUTH_MODE=disabled turns it off (the tests do, on loopback). It must be set before
    # Ray is first imported: Ray reads it once, and a stale "disabled" would skip making the
    # token that the GCS then demands.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from .config import load_serve_file

    raw, services = load_serve_file(config_path)
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
        print(_banner(http.host, http.port, grpc.port, services), flush=True)
        _wait_forever()
    return serve.status()


def _worker_env() -> dict[str, str]:
    keep = ("PYTHONPATH", "SEGSERVE_CACHE_DIR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return {k: os.environ[k] for k in keep if k in os.environ}


def _banner(host: str, http_port: int, grpc_port: int, services: list) -> str:
    model = services[0].models[0].name
    key = " --api-key $SEGSERVE_API_KEY" if services[0].ingress.api_key else ""
    hdr = ' -H "Authorization: Bearer $SEGSERVE_API_KEY"' if key else ""
    shown = "localhost" if host in ("0.0.0.0", "127.0.0.1", "::") else host
    return f"""
segserve is serving {", ".join(m.name for s in services for m in s.models)}
  HTTP (OpenAI API): http://{shown}:{http_port}/v1
  gRPC:              {shown}:{grpc_port}

Try:
  segserve client --grpc {shown}:{grpc_port} --model {model} --prompt "Hello" --stream{key}
  segserve client --http http://{shown}:{http_port} --model {model} --prompt "Hello" --stream{key}
  curl http://{shown}:{http_port}/v1/completions{hdr} -H 'Content-Type: application/json' \\
       -d '{{"model": "{model}", "prompt": "Hello", "max_tokens": 16}}'
  python -c "import openai; c = openai.OpenAI(base_url='http://{shown}:{http_port}/v1', \\
api_key='none'); print(c.completions.create(model='{model}', prompt='Hello').choices[0].text)"

Ctrl-C stops it.""".strip("\n")


def _wait_forever() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.is_set():
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    from ray import serve

    serve.shutdown()


def add_parser(sub: Any, common: Any) -> Any:
    """Register ``serve`` on the ``segserve`` subcommand parsers."""
    p = sub.add_parser("serve", parents=[common], help="run the service (Ray Serve)",
                       description="Start Ray (embedded, or join --address), deploy the Serve "
                                   "config file and serve HTTP and gRPC until Ctrl-C.")  # fmt: skip
    p.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG),
                   help="a Serve config file (default: deploy/configs/local.yaml, the demo "
                        "model on CPU)")  # fmt: skip
    p.add_argument("--address", default=None, help="join this Ray cluster (default: local)")
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args: Any) -> int:
    import sys

    from .config import ConfigError

    try:
        start(args.config, address=args.address)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
