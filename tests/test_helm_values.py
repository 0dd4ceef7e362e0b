"""The chart's values are its interface: a deploy/ config's `args` turn into values unchanged,
values.schema.json stays in step with segserve's config schema and with values.yaml, and bad
values fail at render time with a message that names them."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import yaml
from helm_chart import CHART, REPO, one, render, serve_config
from segserve.deploy.config import parse_service_config

DEPLOY_CONFIGS = sorted((REPO / "deploy" / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("helm-values")


def _values_from_deploy_config(raw: dict) -> dict:
    """What a user writes to install a deploy/ config with the chart."""
    (app,) = raw["applications"]
    args = app["args"]
    devices = {p["device"] for p in args["pools"]}
    key_env = (args.get("ingress") or {}).get("api_key_env")
    values = {
        "segserve": args,
        "serve": {"applicationName": app["name"], "routePrefix": app["route_prefix"],
                  "proxyLocation": raw["proxy_location"]},
        "ports": {"http": raw["http_options"]["port"], "grpc": raw["grpc_options"]["port"]},
        "gpu": {"enabled": bool(devices & {"cuda", "xpu"}),
                "vendor": "intel" if "xpu" in devices else "nvidia"},
        "cpu": {"enabled": "cpu" in devices},
    }  # fmt: skip
    if key_env:
        values["apiKey"] = {"enabled": True, "envVar": key_env}
    for p in args["pools"]:  # a replica group's worker pods are sized to hold it
        group = "cpu" if p["device"] == "cpu" else "gpu"
        if p.get("tensor_parallel_size", 1) > 1:
            values[group]["tensorParallelSize"] = p["tensor_parallel_size"]
    return values


@pytest.mark.parametrize("path", DEPLOY_CONFIGS, ids=lambda p: p.name)
def test_deploy_config_turns_into_values(tmp, path):
    """One source of truth: the chart renders a deploy/ config's service unchanged."""
    raw = yaml.safe_load(path.read_text())
    rs = one(render(_values_from_deploy_config(raw), tmp), "RayService")
    rendered = serve_config(rs)
    for key in ("proxy_location", "http_options", "grpc_options"):
        assert rendered[key] == raw[key], key
    (app,) = rendered["applications"]
    (want,) = raw["applications"]
    assert {k: app[k] for k in ("name", "route_prefix", "import_path")} == {
        k: want[k] for k in ("name", "route_prefix", "import_path")}  # fmt: skip
    assert parse_service_config(app["args"]) == parse_service_config(want["args"])


BAD_VALUES = [
    ("negative replicas", {"gpu": {"replicas": -1}},
     "gpu.replicas: Must be greater than or equal to 0"),
    ("negative maxReplicas", {"cpu": {"maxReplicas": -2}}, "cpu.maxReplicas"),
    ("unknown pool device", {"segserve": {"models": [{"name": "m"}],
                                          "pools": [{"name": "p", "device": "tpu"}]}},
     "segserve.pools.0.device must be one of the following"),
    ("pool num_replicas 0", {"segserve": {"models": [{"name": "m"}],
                                          "pools": [{"name": "p", "device": "cpu",
                                                     "num_replicas": 0}]}},
     "segserve.pools.0.num_replicas"),
    ("misspelt pool key", {"segserve": {"models": [{"name": "m"}],
                                        "pools": [{"name": "p", "device": "cpu",
                                                   "max_num_seq": 4}]}},
     "Additional property max_num_seq is not allowed"),
    ("unknown fetch", {"segserve": {"models": [{"name": "m", "fetch": "llama-70b"}],
                                    "pools": [{"name": "p", "device": "cpu"}]}},
     "segserve.models.0.fetch"),
    ("misspelt group key", {"gpu": {"replica": 2}}, "Additional property replica is not allowed"),
    ("unknown vendor", {"gpu": {"vendor": "amd"}}, "gpu.vendor must be one of the following"),
    ("min above max", {"gpu": {"minReplicas": 5}},
     "gpu.minReplicas (5) must be <= gpu.maxReplicas"),
    ("replicas above max", {"cpu": {"replicas": 9}}, "cpu.replicas (9) must lie in"),
    ("cuda pool on intel", {"gpu": {"vendor": "intel"},
                            "segserve": {"models": [{"name": "m"}],
                                         "pools": [{"name": "g", "device": "cuda"}]}},
     "device cuda does not match gpu.vendor intel"),
    ("pool tp differs", {"segserve": {"models": [{"name": "m"}],
                                      "pools": [{"name": "c", "device": "cpu",
                                                 "tensor_parallel_size": 2}]}},
     "tensor_parallel_size 2 differs from cpu.tensorParallelSize 1"),
    ("no group", {"gpu": {"enabled": False}, "cpu": {"enabled": False}},
     "enable at least one worker group"),
    ("model on disabled pools", {"cpu": {"enabled": False},
                                 "segserve": {"models": [{"name": "m", "pools": ["cpu"]}],
                                              "pools": [{"name": "g", "device": "gpu"},
                                                        {"name": "cpu", "device": "cpu"}]}},
     "segserve.models[0] (m): none of its pools"),
    ("plain-text api key", {"segserve": {"ingress": {"api_key": "x"}}}, "apiKey.enabled"),
    ("key env without secret", {"segserve": {"ingress": {"api_key_env": "K"}}},
     "needs apiKey.enabled=true"),
    ("no limits", {"head": {"resources": {"limits": None}}}, "head.resources"),
    ("privileged", {"securityContext": {"privileged": True}}, "securityContext.privileged"),
    ("root", {"podSecurityContext": {"runAsNonRoot": False}}, "podSecurityContext.runAsNonRoot"),
]  # fmt: skip


@pytest.mark.parametrize("values,message", [b[1:] for b in BAD_VALUES],
                         ids=[b[0] for b in BAD_VALUES])  # fmt: skip
def test_bad_values_fail_at_render(tmp, values, message):
    proc = render(values, tmp, check=False)
    assert not isinstance(proc, list), "rendered although the values are bad"
    assert message in proc.stderr, proc.stderr


def _values_schema_module():
    path = REPO / "k8s" / "values_schema.py"
    spec = importlib.util.spec_from_file_location("values_schema", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_values_schema_in_step_with_service_config():
    mod = _values_schema_module()
    current = json.loads(mod.SCHEMA_PATH.read_text())
    assert mod.render(mod.updated(current)) == mod.SCHEMA_PATH.read_text(), (
        "k8s/segserve/values.schema.json is stale: run `python k8s/values_schema.py`"
    )


def test_values_yaml_and_schema_name_the_same_keys():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(v: dict, s: dict, where: str) -> None:
        if s.get("additionalProperties") is not False:
            return  # a free-form map (resources, labels, securityContext, ...)
        declared = set(s["properties"]) - {"global"}
        assert set(v) == declared, f"{where}: values.yaml {sorted(set(v) ^ declared)} vs schema"
        for k, sub in v.items():
            if isinstance(sub, dict) and k != "segserve":  # that one is ServiceConfig's
                walk(sub, s["properties"][k], f"{where}.{k}")

    walk(values, schema, "<root>")
    text = (CHART / "values.yaml").read_text()
    for key in values:  # every top-level key is documented by a comment right above it
        assert re.search(rf"#[^\n]*\n(#[^\n]*\n)*{key}:", text), f"{key} has no comment"


def test_dockerfile_runs_as_non_root_with_the_charts_ray():
    text = (REPO / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    (ray,) = re.findall(r"^ARG RAY_VERSION=(\S+)", text, re.M)
    assert ray == values["ray"]["version"]
    assert values["podSecurityContext"]["runAsUser"] == int(users[-1].split(":")[0])
    for variant in ("cpu)", "cuda)", "xpu)"):
        assert variant in text
