"""The service config (deploy/config.py) and what build_app makes of it (deploy/app.py).

No Ray cluster: ``build_app`` only binds deployments, so their options can be read straight
off the bound ``Deployment`` objects (``_deployment_config``, ``ray_actor_options``,
``init_args``), which is what Serve ships to its controller.
"""

from __future__ import annotations

import copy
import importlib
from pathlib import Path
from typing import Any

import pytest
import segserve.deploy
from ray.serve import Application
from ray.serve._private.autoscaling_state import _resolve_policy_callable
from segserve.deploy.app import build_app, replica_options
from segserve.deploy.autoscaling import KVPressurePolicy
from segserve.deploy.config import (
    ConfigError,
    ServiceConfig,
    engine_config,
    load_serve_file,
    parse_service_config,
)
from segserve.deploy.router import KVHeadroomRouter

CONFIGS = Path(segserve.deploy.__file__).parent / "configs"
POLICY = "segserve.deploy.autoscaling:KVPressurePolicy"
ROUTER = "segserve.deploy.router:KVHeadroomRouter"


def deployments(app: Application) -> tuple[Any, dict[str, Any]]:
    """(the Ingress deployment, {name: LLMReplica deployment}) of a built application."""
    ingress = app._bound_deployment
    handles = ingress.init_args[1]
    return ingress, {name: h._bound_deployment for name, h in handles.items()}


def load(name: str) -> tuple[dict[str, Any], ServiceConfig]:
    raw, services = load_serve_file(CONFIGS / f"{name}.yaml")
    assert len(services) == 1
    return raw, services[0]


# ----- the shipped config files ----------------------------------------------------------------
def test_local_yaml():
    raw, cfg = load("local")
    assert raw["http_options"]["port"] == 8000
    assert raw["grpc_options"]["port"] == 9000
    assert raw["applications"][0]["import_path"] == "segserve.deploy.app:build_app"
    assert [(m.name, m.path, m.dtype) for m in cfg.models] == [("smollm2", "smollm2", "float32")]
    [pool] = cfg.pools
    assert (pool.name, pool.device, pool.num_replicas, pool.autoscaling) == ("cpu", "cpu", 1, None)
    assert (pool.kv_cache_memory_gb, pool.max_num_seqs, pool.max_queue_len) == (0.5, 64, 256)
    assert cfg.ingress.api_key is None and cfg.ingress.api_key_env is None


def test_gpu_yaml():
    _, cfg = load("gpu")
    [model] = cfg.models
    assert (model.name, model.path, model.dtype, model.max_model_len) == (
        "smollm2", "smollm2", "bfloat16", 4096
    )  # fmt: skip
    [pool] = cfg.pools
    assert (pool.name, pool.device, pool.tensor_parallel_size) == ("gpu", "cuda", 1)
    assert (pool.gpu_memory_utilization, pool.max_num_batched_tokens) == (0.85, 4096)
    assert (pool.max_num_seqs, pool.max_queue_len, pool.num_replicas) == (128, 512, None)
    a = pool.autoscaling
    assert (a.min_replicas, a.max_replicas, a.initial_replicas) == (1, 4, None)
    assert (a.scale_up_kv_utilization, a.scale_down_kv_utilization) == (0.8, 0.3)
    assert cfg.ingress.api_key_env == "SEGSERVE_API_KEY"


def test_hetero_yaml():
    _, cfg = load("hetero")
    [model] = cfg.models
    assert (model.name, model.dtype, model.pools) == ("smollm2", "auto", None)
    assert [(p.name, p.device) for p in cfg.pools] == [("gpu", "cuda"), ("cpu", "cpu")]
    assert [p.name for p in cfg.pools_for(model)] == ["gpu", "cpu"]
    gpu, cpu = cfg.pools
    assert (gpu.autoscaling.min_replicas, gpu.autoscaling.max_replicas) == (1, 2)
    assert (cpu.autoscaling.min_replicas, cpu.autoscaling.max_replicas) == (0, 4)
    assert cpu.autoscaling.initial_replicas == 1
    assert (cpu.kv_cache_memory_gb, cpu.cpus_per_replica, cpu.max_num_seqs) == (4, 8, 16)
    assert cpu.max_queue_len == 64


# ----- build_app -------------------------------------------------------------------------------
def test_build_local():
    _, cfg = load("local")
    # local.yaml keeps the engine in its own deployment (a dying replica is a retryable 503)
    assert not cfg.ingress.engine_in_ingress
    # With engine_in_ingress: one deployment, the pool's options
    one_cfg = cfg.model_copy(update={"ingress": cfg.ingress.model_copy(
        update={"engine_in_ingress": True})})  # fmt: skip
    one = build_app(one_cfg)._bound_deployment
    assert (one.name, one.init_args[1], one.num_replicas) == ("Ingress", {}, 1)
    assert one.ray_actor_options == {"num_cpus": 1.0}
    assert one.max_ongoing_requests == 1024 and one.max_queued_requests == -1
    # The same service in two layers
    app = build_app(cfg)
    assert isinstance(app, Application)
    ingress, deps = deployments(app)
    assert ingress.name == "Ingress"
    assert ingress.num_replicas == 1
    assert ingress.max_ongoing_requests == 1024
    assert ingress.init_args[0] == cfg.model_dump()
    assert list(deps) == ["LLM:smollm2:cpu"]
    d = deps["LLM:smollm2:cpu"]
    assert d.name == "LLM:smollm2:cpu"
    assert d.ray_actor_options == {"num_cpus": 1.0}  # no num_gpus on a cpu pool
    assert d.max_ongoing_requests == 64 + 256
    assert d.max_queued_requests == 256
    assert d.num_replicas == 1
    assert d._deployment_config.autoscaling_config is None
    engine, model, pool, engine_process = d.init_args
    assert (model, pool, engine_process) == ("smollm2", "cpu", False)  # cpu: in-process
    assert (engine["model"], engine["device"], engine["dtype"]) == ("smollm2", "cpu", "float32")
    assert (engine["kv_cache_memory_gb"], engine["max_num_seqs"]) == (0.5, 64)
    assert engine["max_queue_len"] == 256


def test_build_tensor_parallel_groups():
    """A TP pool's replica is a placement group of one bundle per rank; the replica (rank 0)
    asks for bundle 0's resources, and the engine gets the group's size and communicator."""
    for name, device, comm in (("tp-cpu", "cpu", "oneccl"), ("tp-gpu", "cuda", "nccl")):
        _, cfg = load(name)
        _, deps = deployments(build_app(cfg))
        (d,) = deps.values()
        dc = d._deployment_config
        rc = d._replica_config
        gpu = {"GPU": 1} if device == "cuda" else {}
        assert rc.placement_group_bundles == [{"CPU": 1.0, **gpu}] * 2, name
        assert rc.placement_group_strategy == "STRICT_PACK"
        assert d.ray_actor_options == {"num_cpus": 1.0, **({"num_gpus": 1} if gpu else {})}
        engine = d.init_args[0]
        assert (engine["tensor_parallel_size"], engine["communicator"]) == (2, comm), name
        assert d.init_args[3] is False, name  # a replica group's rank 0 steps in-process
        assert dc is not None


def test_build_gpu():
    _, cfg = load("gpu")
    _, deps = deployments(build_app(cfg))
    assert list(deps) == ["LLM:smollm2:gpu"]
    d = deps["LLM:smollm2:gpu"]
    assert d.ray_actor_options == {"num_cpus": 1.0, "num_gpus": 1}
    assert d.init_args[3] is True  # a one-GPU replica's engine steps in a child process
    assert d.max_ongoing_requests == 128 + 512
    assert d.max_queued_requests == 512
    dc = d._deployment_config
    a = dc.autoscaling_config
    assert (a.min_replicas, a.max_replicas, a.initial_replicas) == (1, 4, None)
    assert (a.upscale_delay_s, a.downscale_delay_s, a.look_back_period_s) == (5.0, 60.0, 15.0)
    assert a.policy.policy_function == POLICY
    assert a.policy.policy_kwargs == {
        "scale_up_kv_utilization": 0.8,
        "scale_up_waiting_per_replica": 1.0,
        "scale_down_kv_utilization": 0.3,
    }
    rc = dc.request_router_config
    assert rc.request_router_class == ROUTER
    module, _, cls = rc.request_router_class.partition(":")
    assert getattr(importlib.import_module(module), cls) is KVHeadroomRouter
    assert rc.request_routing_stats_period_s == 0.5
    assert d.init_args[0]["dtype"] == "bfloat16"
    assert d.init_args[0]["gpu_memory_utilization"] == 0.85


def test_build_hetero():
    _, cfg = load("hetero")
    ingress, deps = deployments(build_app(cfg))
    assert list(deps) == ["LLM:smollm2:gpu", "LLM:smollm2:cpu"]
    gpu, cpu = deps["LLM:smollm2:gpu"], deps["LLM:smollm2:cpu"]
    assert gpu.ray_actor_options == {"num_cpus": 1.0, "num_gpus": 1}
    assert cpu.ray_actor_options == {"num_cpus": 8.0}
    assert (gpu.max_ongoing_requests, gpu.max_queued_requests) == (128 + 256, 256)
    assert (cpu.max_ongoing_requests, cpu.max_queued_requests) == (16 + 64, 64)
    ca = cpu._deployment_config.autoscaling_config
    assert (ca.min_replicas, ca.max_replicas, ca.initial_replicas) == (0, 4, 1)
    for d in (gpu, cpu):
        assert d._deployment_config.autoscaling_config.policy.policy_function == POLICY
        assert d._deployment_config.request_router_config.request_router_class == ROUTER
    # dtype auto: bf16 on the GPU pool, fp32 on the CPU pool
    assert (gpu.init_args[0]["dtype"], cpu.init_args[0]["dtype"]) == ("bfloat16", "float32")
    assert (gpu.init_args[0]["device"], cpu.init_args[0]["device"]) == ("cuda", "cpu")
    assert cpu.init_args[0]["kv_cache_memory_gb"] == 4.0
    # the ingress holds a handle per (model, pool)
    assert set(ingress.init_args[1]) == {"LLM:smollm2:gpu", "LLM:smollm2:cpu"}


def _two_models() -> dict[str, Any]:
    return {
        "models": [{"name": "a"}, {"name": "b", "pools": ["small"]}],
        "pools": [
            {"name": "big", "device": "cuda", "num_replicas": 3, "max_num_seqs": 10,
             "max_queue_len": 5, "cpus_per_replica": 2,
             "autoscaling": None},
            {"name": "small", "device": "cpu", "max_num_seqs": 7, "max_queue_len": 3,
             "autoscaling": {"min_replicas": 2, "max_replicas": 5, "initial_replicas": 3,
                             "scale_up_kv_utilization": 0.9,
                             "scale_up_waiting_per_replica": 2.5,
                             "scale_down_kv_utilization": 0.2, "upscale_delay_s": 1,
                             "downscale_delay_s": 30, "look_back_period_s": 20}},
        ],
        "ingress": {"num_replicas": 2, "max_ongoing_requests": 99},
    }  # fmt: skip


def test_build_one_deployment_per_model_and_pool():
    ingress, deps = deployments(build_app(_two_models()))  # a plain dict is accepted too
    assert list(deps) == ["LLM:a:big", "LLM:a:small", "LLM:b:small"]
    assert (ingress.num_replicas, ingress.max_ongoing_requests) == (2, 99)
    big = deps["LLM:a:big"]
    assert big.ray_actor_options == {"num_cpus": 2.0, "num_gpus": 1}
    assert big.num_replicas == 3
    assert big._deployment_config.autoscaling_config is None
    assert (big.max_ongoing_requests, big.max_queued_requests) == (15, 5)
    for name in ("LLM:a:small", "LLM:b:small"):
        d = deps[name]
        assert d.ray_actor_options == {"num_cpus": 1.0}
        assert (d.max_ongoing_requests, d.max_queued_requests) == (10, 3)
        a = d._deployment_config.autoscaling_config
        assert (a.min_replicas, a.max_replicas, a.initial_replicas) == (2, 5, 3)
        assert (a.upscale_delay_s, a.downscale_delay_s, a.look_back_period_s) == (1, 30, 20)
        assert a.policy.policy_kwargs == {
            "scale_up_kv_utilization": 0.9,
            "scale_up_waiting_per_replica": 2.5,
            "scale_down_kv_utilization": 0.2,
        }
    assert deps["LLM:b:small"].init_args[1:] == ("b", "small", False)
    assert big.init_args[3] is True  # its own GPU: the engine steps in a child process


def test_serve_instantiates_the_policy_with_the_pool_thresholds():
    """Serve's controller resolves the import path and calls the class with policy_kwargs:
    a kwarg name that KVPressurePolicy does not take would only fail at deploy time."""
    _, deps = deployments(build_app(_two_models()))
    policy = deps["LLM:a:small"]._deployment_config.autoscaling_config.policy
    p = _resolve_policy_callable(policy)
    assert isinstance(p, KVPressurePolicy)
    assert (p.up_kv, p.up_waiting, p.down_kv) == (0.9, 2.5, 0.2)


def test_replica_options_without_autoscaling_defaults_to_one_replica():
    cfg = parse_service_config(
        {"models": [{"name": "m"}], "pools": [{"name": "c", "device": "cpu"}]}
    )
    opts = replica_options(cfg.pools[0])
    assert opts["num_replicas"] == 1
    assert "autoscaling_config" not in opts
    assert opts["max_ongoing_requests"] == 128 + 256


# ----- engine_config ---------------------------------------------------------------------------
def _cfg(model: dict[str, Any], pool: dict[str, Any]) -> ServiceConfig:
    return parse_service_config({"models": [{"name": "m", **model}], "pools": [pool]})


@pytest.mark.parametrize(
    "device, dtype, expected",
    [
        ("cuda", "auto", "bfloat16"),
        ("xpu", "auto", "bfloat16"),
        ("cpu", "auto", "float32"),
        ("cpu", "float16", "float16"),
        ("cuda", "float32", "float32"),
    ],
)
def test_engine_config_dtype(device, dtype, expected):
    cfg = _cfg({"dtype": dtype}, {"name": "p", "device": device})
    assert engine_config(cfg.models[0], cfg.pools[0]).dtype == expected


def test_engine_config_fields():
    cfg = _cfg(
        {"path": "/ckpt", "max_model_len": 333},
        {"name": "p", "device": "cpu", "kv_cache_memory_gb": 1.5, "block_size": 32,
         "max_num_seqs": 9, "max_num_batched_tokens": 512, "max_queue_len": 17,
         "kernel_backend": "reference"},
    )  # fmt: skip
    e = engine_config(cfg.models[0], cfg.pools[0])
    assert (e.model, e.device, e.kernel_backend) == ("/ckpt", "cpu", "reference")
    assert (e.block_size, e.max_model_len, e.max_num_seqs) == (32, 333, 9)
    assert (e.max_num_batched_tokens, e.max_queue_len) == (512, 17)
    assert (e.kv_cache_memory_gb, e.num_kv_blocks) == (1.5, None)


def test_engine_config_kv_dtype_per_pool_and_cpu_threads():
    """A pool's kv_dtype wins over the model's; a CPU replica runs its reserved CPUs as threads."""
    cfg = parse_service_config({
        "models": [{"name": "m", "kv_dtype": "int8"}],
        "pools": [{"name": "a", "device": "cpu", "cpus_per_replica": 3},
                  {"name": "b", "device": "cpu", "kv_dtype": "auto"},
                  {"name": "g", "device": "cuda"}],
    })  # fmt: skip
    a, b, g = (engine_config(cfg.models[0], p) for p in cfg.pools)
    assert (a.kv_dtype, b.kv_dtype, g.kv_dtype) == ("int8", "auto", "int8")
    assert (a.cpu_threads, b.cpu_threads, g.cpu_threads) == (3, 1, None)


def test_engine_config_memory_passthrough():
    gpu = _cfg({}, {"name": "p", "device": "cuda", "gpu_memory_utilization": 0.42})
    assert engine_config(gpu.models[0], gpu.pools[0]).gpu_memory_utilization == 0.42
    blocks = _cfg({}, {"name": "p", "device": "cpu", "num_kv_blocks": 123})
    e = engine_config(blocks.models[0], blocks.pools[0])
    assert e.num_kv_blocks == 123
    assert e.kv_cache_memory_gb == 2.0  # unset: EngineConfig's default


# ----- bad configs -----------------------------------------------------------------------------
def _base() -> dict[str, Any]:
    return {
        "models": [{"name": "m"}],
        "pools": [{"name": "gpu", "device": "cuda"}, {"name": "cpu", "device": "cpu"}],
    }


def _set(cfg: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """cfg with the dotted ``path`` (list indices as numbers) set to ``value``."""
    cfg = copy.deepcopy(cfg)
    *parents, last = path.split(".")
    node: Any = cfg
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    node[int(last) if isinstance(node, list) else last] = value
    return cfg


AS = {"min_replicas": 1, "max_replicas": 2}

BAD = [
    # (what is wrong, changes to the base config, field path named, message fragment)
    ("unknown device", {"pools.0.device": "tpu"}, "args.pools.0.device", "'cpu', 'cuda'"),
    ("negative replicas", {"pools.1.num_replicas": -1}, "args.pools.1.num_replicas",
     "greater than or equal to 1"),
    ("replicas and autoscaling", {"pools.0.num_replicas": 2, "pools.0.autoscaling": AS},
     "args.pools.0", "not both"),
    ("min > max", {"pools.0.autoscaling": {"min_replicas": 3, "max_replicas": 2}},
     "args.pools.0.autoscaling", "min_replicas must be <= max_replicas"),
    ("down >= up", {"pools.0.autoscaling": {**AS, "scale_down_kv_utilization": 0.8}},
     "args.pools.0.autoscaling", "scale_down_kv_utilization must be <"),
    ("two memory sizes", {"pools.1.kv_cache_memory_gb": 1, "pools.1.num_kv_blocks": 64},
     "args.pools.1", "at most one of"),
    ("gpu memory on cpu", {"pools.1.gpu_memory_utilization": 0.5}, "args.pools.1",
     "cuda/xpu pools only"),
    ("typo in a pool", {"pools.0.gpu_memory_utilisation": 0.5},
     "args.pools.0.gpu_memory_utilisation", "Extra inputs are not permitted"),
    ("typo at the top", {"modles": []}, "args.modles", "Extra inputs are not permitted"),
    ("typo in a model", {"models.0.dtpye": "float32"}, "args.models.0.dtpye",
     "Extra inputs are not permitted"),
    ("typo in ingress", {"ingress.apikey": "x"}, "args.ingress.apikey",
     "Extra inputs are not permitted"),
    ("typo in autoscaling", {"pools.0.autoscaling": {**AS, "max_replica": 3}},
     "args.pools.0.autoscaling.max_replica", "Extra inputs are not permitted"),
    ("duplicate pools", {"pools.1.name": "gpu"}, "args", "duplicate pool name(s): ['gpu']"),
    ("duplicate models", {"models": [{"name": "m"}, {"name": "m"}]}, "args",
     "duplicate model name(s): ['m']"),
    ("unknown pool", {"models.0.pools": ["gpu", "tpu"]}, "args", "unknown pool(s) ['tpu']"),
    ("no models", {"models": []}, "args.models", "at least 1 item"),
    ("no pools", {"pools": []}, "args.pools", "at least 1 item"),
    ("tp that cannot split the model", {"models.0.path": "demo",
                                         "pools.1.tensor_parallel_size": 3}, "args",
     "pool 'cpu' with model 'm': tensor_parallel_size 3 does not divide the model's attention "
     "heads (8)"),
    ("nccl on a cpu pool", {"pools.1.communicator": "nccl"}, "args.pools.1",
     "communicator 'nccl' does not run on 'cpu' devices"),
    ("unknown communicator", {"pools.1.communicator": "mpi"}, "args.pools.1.communicator",
     "'nccl', 'xccl', 'oneccl' or 'gloo'"),
    ("fp8 kv", {"models.0.kv_dtype": "fp8"}, "args.models.0.kv_dtype", "'auto' or 'int8'"),
    ("fp8 kv on a pool", {"pools.1.kv_dtype": "fp8"}, "args.pools.1.kv_dtype",
     "'auto' or 'int8'"),
    ("block size", {"pools.0.block_size": 24}, "args.pools.0", "power of two, got 24"),
    ("both api keys", {"ingress": {"api_key": "k", "api_key_env": "E"}}, "args.ingress",
     "set api_key or api_key_env, not both"),
    ("empty api key", {"ingress": {"api_key": ""}}, "args.ingress", "must not be empty"),
    ("key salt without a key", {"ingress": {"api_key_cache_salt": "t"}}, "args.ingress",
     "api_key_cache_salt needs api_key or api_key_env"),
    ("'#' in a model name", {"models.0.name": "a#b"}, "args.models.0.name", "pattern"),
    ("string for a number", {"pools.0.max_num_seqs": "many"}, "args.pools.0.max_num_seqs",
     "valid integer"),
    ("engine process of a replica group", {"models.0.path": "demo",
                                           "pools.1.tensor_parallel_size": 2,
                                           "pools.1.engine_process": True}, "args.pools.1",
     "engine_process needs tensor_parallel_size 1"),
]  # fmt: skip


@pytest.mark.parametrize("what, changes, where, fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_config_names_the_field(what, changes, where, fragment):
    cfg = _base()
    for path, value in changes.items():
        cfg = _set(cfg, path, value)
    with pytest.raises(ConfigError) as info:
        parse_service_config(cfg)
    msg = str(info.value)
    assert msg.startswith("invalid segserve config: ")
    assert f" {where}: " in msg, msg  # exactly this path, not a longer or shorter one
    assert fragment in msg, msg


def test_base_config_is_valid():
    """The BAD cases fail because of their one change, not because the base is broken."""
    cfg = parse_service_config(_base())
    assert [p.name for p in cfg.pools] == ["gpu", "cpu"]


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_model_with_empty_pool_list_is_refused():
    with pytest.raises(ConfigError, match=r"args\.models\.0\.pools"):
        parse_service_config(_set(_base(), "models.0.pools", []))


@pytest.mark.parametrize("initial", [0, 5])
def test_initial_replicas_outside_bounds_is_refused(initial):
    bad = _set(_base(), "pools.0.autoscaling",
               {"min_replicas": 1, "max_replicas": 4, "initial_replicas": initial})  # fmt: skip
    with pytest.raises(ConfigError, match=r"args\.pools\.0\.autoscaling"):
        parse_service_config(bad)


# ----- load_serve_file -------------------------------------------------------------------------
APP_YAML = """
applications:
  - name: segserve
    import_path: {import_path}
    args:
      models: [{{name: m}}]
      pools: [{{name: cpu, device: {device}}}]
"""


def _write(tmp_path: Path, text: str, name: str = "serve.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_load_minimal(tmp_path):
    path = _write(tmp_path, APP_YAML.format(import_path="segserve.deploy.app:build_app",
                                            device="cpu"))  # fmt: skip
    raw, [cfg] = load_serve_file(path)
    assert raw["applications"][0]["name"] == "segserve"
    assert [(p.name, p.device) for p in cfg.pools] == [("cpu", "cpu")]


def test_load_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_serve_file(tmp_path / "nope.yaml")


def test_load_invalid_yaml(tmp_path):
    path = _write(tmp_path, "applications: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_serve_file(path)


def test_load_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_serve_file(_write(tmp_path, "- 1\n- 2\n"))


def test_load_bad_serve_part(tmp_path):
    text = "http_options:\n  port: eighty\n" + APP_YAML.format(
        import_path="segserve.deploy.app:build_app", device="cpu"
    )
    with pytest.raises(ConfigError, match=r": http_options\.port: .*integer"):
        load_serve_file(_write(tmp_path, text))


def test_load_no_applications(tmp_path):
    with pytest.raises(ConfigError, match=r"applications: Field required"):
        load_serve_file(_write(tmp_path, "http_options: {port: 8000}\n"))


def test_load_bad_args_names_application_field(tmp_path):
    path = _write(tmp_path, APP_YAML.format(import_path="segserve.deploy.app:build_app",
                                            device="tpu"))  # fmt: skip
    with pytest.raises(ConfigError, match=r"applications\.0\.args\.pools\.0\.device: "):
        load_serve_file(path)


def test_load_foreign_import_path(tmp_path):
    path = _write(tmp_path, APP_YAML.format(import_path="mypkg.app:build", device="cpu"))
    with pytest.raises(ConfigError, match="import_path must be segserve.deploy.app:build_app"):
        load_serve_file(path)


def test_load_other_segserve_import_path(tmp_path):
    path = _write(tmp_path, APP_YAML.format(import_path="segserve.deploy.ingress:Ingress",
                                            device="cpu"))  # fmt: skip
    with pytest.raises(ConfigError, match="import_path"):
        load_serve_file(path)
