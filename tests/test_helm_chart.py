"""The Helm chart k8s/segserve, rendered by real Helm (v3.17.1) and checked against independent
schemas: the RayService against KubeRay's CRD, every other object against Kubernetes' own
(kubernetes-validate), serveConfigV2 against Ray Serve's ServeDeploySchema and segserve's
ServiceConfig. Bad values must fail at render time with a message naming them."""

from __future__ import annotations

import base64
import json

import kubernetes_validate
import pytest
import yaml
from helm_chart import (
    CHART,
    REPO,
    by_kind,
    helm,
    one,
    pod_templates,
    rayservice_errors,
    render,
    render_notes,
    serve_config,
    service_args,
    worker_groups,
)
from segserve.deploy.config import load_serve_file

K8S_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())

CASES = {
    "default": {},
    "gpu_only": {"cpu": {"enabled": False}},
    "cpu_only": {"gpu": {"enabled": False}},
    "intel_gpu": {"gpu": {"vendor": "intel", "image": {"tag": "0.1.0-xpu"}}},
    "tp2": {"gpu": {"tensorParallelSize": 2}},
    "api_key": {"apiKey": {"enabled": True, "value": "s3cret"}},
    "everything": {
        "segserve": {
            "models": [{"name": "smollm2", "fetch": "smollm2"},
                       {"name": "llama", "path": "/models/llama", "pools": ["gpu"]}],
            "pools": [{"name": "gpu", "device": "gpu", "num_replicas": 2},
                      {"name": "cpu", "device": "cpu", "kv_cache_memory_gb": 2}],
            "ingress": {"num_replicas": 2, "api_key_env": "LLM_KEY"},
        },  # fmt: skip
        "apiKey": {"enabled": True, "existingSecret": "my-key", "envVar": "LLM_KEY"},
        "modelStorage": {"existingClaim": "models"},
        "cache": {"existingClaim": "segserve-cache"},
        "ingress": {"enabled": True, "className": "nginx",
                    "hosts": [{"host": "llm.example.com"}],
                    "tls": [{"secretName": "llm-tls", "hosts": ["llm.example.com"]}],
                    "grpc": {"enabled": True, "host": "grpc.llm.example.com"}},  # fmt: skip
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "grafanaDashboard": {"enabled": True},
        "ray": {"authMode": "disabled", "autoscaling": {"enabled": False}},
        "extraEnv": [{"name": "OMP_NUM_THREADS", "value": "4"}],
        "imagePullSecrets": [{"name": "regcred"}],
        "gpu": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]},
    },
    "hostpath_gguf": {
        "segserve": {"models": [{"name": "smol", "path": "/models/smol.gguf"}],
                     "pools": [{"name": "cpu", "device": "cpu"}]},  # fmt: skip
        "gpu": {"enabled": False},
        "modelStorage": {"hostPath": "/srv/models"},
    },
}
SERVE_VALID = [c for c in CASES if c != "tp2"]  # tp > 1 waits for issue 11


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("helm")


@pytest.fixture(scope="module")
def rendered(tmp):
    cache: dict[str, list[dict]] = {}

    def get(case: str) -> list[dict]:
        if case not in cache:
            cache[case] = render(CASES[case], tmp)
        return cache[case]

    return get


def _containers(rayservice: dict) -> list[tuple[str, dict]]:
    out = []
    for group, template in pod_templates(rayservice).items():
        spec = template["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            out.append((f"{group}/{c['name']}", c))
    return out


# --- Helm itself ---------------------------------------------------------------------------


def test_helm_lint(tmp):
    out = helm("lint", "--strict", str(CHART)).stdout
    assert "0 chart(s) failed" in out, out
    for case in ("everything", "intel_gpu"):
        path = tmp / f"lint-{case}.yaml"
        path.write_text(yaml.safe_dump(CASES[case]))
        helm("lint", "--strict", str(CHART), "-f", str(path))


# --- schemas -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_rayservice_matches_the_crd(rendered, case):
    errors = rayservice_errors(one(rendered(case), "RayService"))
    assert not errors, "\n".join(errors)


def test_crd_check_refuses_unknown_fields_and_bad_types(rendered):
    """The oracle can fail: a misspelt field and a wrongly typed one are caught."""
    rs = json.loads(json.dumps(one(rendered("default"), "RayService")))
    cluster = rs["spec"]["rayClusterConfig"]
    cluster["workerGroupSpecs"][0]["replica"] = 1
    cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"] = "big"
    errors = "\n".join(rayservice_errors(rs))
    assert "'replica' was unexpected" in errors and "limits" in errors, errors


@pytest.mark.parametrize("case", CASES)
def test_kubernetes_objects_valid(rendered, case):
    objects = rendered(case)
    rs = one(objects, "RayService")
    # The pod templates inside the RayService, against Kubernetes' PodTemplate too.
    checked = [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group},
                "template": template} for group, template in pod_templates(rs).items()]  # fmt: skip
    checked += [o for o in objects if o["kind"] not in ("RayService", "ServiceMonitor")]
    assert {o["kind"] for o in checked} >= {"PodTemplate", "Service"}
    for obj in checked:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_kubernetes_check_refuses_bad_objects(rendered):
    svc = json.loads(json.dumps(by_kind(rendered("default"), "Service")[0]))
    svc["spec"]["ports"][0]["port"] = "eighty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(svc, K8S_VERSIONS[0], strict=True)


def _load_serve(rayservice: dict, tmp, name: str):
    path = tmp / f"serve-{name}.yaml"
    path.write_text(rayservice["spec"]["serveConfigV2"])
    return load_serve_file(path)  # ServeDeploySchema, then ServiceConfig on `args`


@pytest.mark.parametrize("case", SERVE_VALID)
def test_serve_config_valid(rendered, tmp, case):
    raw, (service,) = _load_serve(one(rendered(case), "RayService"), tmp, case)
    assert raw["applications"][0]["import_path"] == "segserve.deploy.app:build_app"
    assert raw["http_options"]["port"] == 8000 and raw["grpc_options"]["port"] == 9000
    assert all(p.tensor_parallel_size == 1 for p in service.pools)


def test_tp2_serve_config_accepted(rendered, tmp):
    _, (service,) = _load_serve(one(rendered("tp2"), "RayService"), tmp, "tp2")
    assert service.pools[0].tensor_parallel_size == 2


# --- what each case renders ----------------------------------------------------------------


def _devices(rs: dict) -> dict[str, str]:
    return {p["name"]: p["device"] for p in service_args(rs)["pools"]}


def test_default_renders_gpu_and_cpu_groups(rendered):
    rs = one(rendered("default"), "RayService")
    groups = worker_groups(rs)
    assert set(groups) == {"gpu-workers", "cpu-workers"}
    gpu = groups["gpu-workers"]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert gpu["image"] == "segserve:0.1.0-cuda"
    assert "num-gpus" not in groups["gpu-workers"]["rayStartParams"]  # KubeRay infers it
    cpu = groups["cpu-workers"]["template"]["spec"]["containers"][0]
    assert not any("gpu" in k for k in cpu["resources"]["limits"])
    assert _devices(rs) == {"gpu": "cuda", "cpu": "cpu"}
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert (groups["gpu-workers"]["minReplicas"], groups["gpu-workers"]["maxReplicas"]) == (0, 4)
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert cluster["authOptions"] == {"mode": "token"}


@pytest.mark.parametrize("case,group,pools", [
    ("gpu_only", "gpu-workers", {"gpu": "cuda"}),
    ("cpu_only", "cpu-workers", {"cpu": "cpu"}),
])  # fmt: skip
def test_one_group_only(rendered, case, group, pools):
    rs = one(rendered(case), "RayService")
    assert set(worker_groups(rs)) == {group}
    assert _devices(rs) == pools


def test_intel_gpu(rendered):
    rs = one(rendered("intel_gpu"), "RayService")
    group = worker_groups(rs)["gpu-workers"]
    res = group["template"]["spec"]["containers"][0]["resources"]
    assert res["limits"]["gpu.intel.com/i915"] == 1 and "nvidia.com/gpu" not in res["limits"]
    assert group["rayStartParams"]["num-gpus"] == "1"  # KubeRay does not infer it for Intel
    assert group["template"]["spec"]["containers"][0]["image"] == "segserve:0.1.0-xpu"
    assert _devices(rs)["gpu"] == "xpu"


def test_tp2_gives_each_gpu_pod_two_gpus(rendered):
    rs = one(rendered("tp2"), "RayService")
    res = worker_groups(rs)["gpu-workers"]["template"]["spec"]["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 2
    tps = {p["name"]: p["tensor_parallel_size"] for p in service_args(rs)["pools"]}
    assert tps == {"gpu": 2, "cpu": 1}


def test_api_key_secret_reaches_every_ray_container(rendered):
    objects = rendered("api_key")
    secret = one(objects, "Secret")
    assert base64.b64decode(secret["data"]["api-key"]).decode() == "s3cret"
    rs = one(objects, "RayService")
    assert service_args(rs)["ingress"]["api_key_env"] == "SEGSERVE_API_KEY"
    for where, c in _containers(rs):
        env = {e["name"]: e for e in c.get("env", [])}
        ref = env["SEGSERVE_API_KEY"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": secret["metadata"]["name"], "key": "api-key"}, where
    assert not by_kind(rendered("default"), "Secret")


def test_everything_on(rendered):
    objects = rendered("everything")
    rs = one(objects, "RayService")
    assert not by_kind(objects, "Secret")  # existingSecret
    args = service_args(rs)
    assert args["ingress"] == {"num_replicas": 2, "api_key_env": "LLM_KEY"}
    assert args["models"][0] == {"name": "smollm2", "path": "smollm2"}  # fetch is chart-only
    for where, template in pod_templates(rs).items():
        spec = template["spec"]
        (init,) = spec["initContainers"]
        assert "segserve fetch" in init["args"][0] and "smollm2" in init["args"][0], where
        vols = {v["name"]: v for v in spec["volumes"]}
        assert vols["models"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
        assert vols["cache"]["persistentVolumeClaim"]["claimName"] == "segserve-cache"
        env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"] == "disabled" and env["OMP_NUM_THREADS"] == "4"
    assert rs["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is False
    assert rs["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "disabled"}
    http, grpc = by_kind(objects, "Ingress")
    assert http["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["port"] == {
        "name": "http"}  # fmt: skip
    assert grpc["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["port"] == {
        "name": "grpc"}  # fmt: skip
    assert grpc["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"


@pytest.mark.parametrize("graces, expected", [
    ((None, None), "default"),  # ServiceConfig's default on both pools
    ((120, 900.5), 931),  # the largest, rounded up, plus 30 s
    ((0, None), "default"),  # an unset pool still has the default
])
def test_pods_wait_for_the_longest_drain(tmp, graces, expected):
    """Kubernetes must not kill a pod while its replicas may still drain: every Ray pod's
    terminationGracePeriodSeconds covers the largest graceful_shutdown_timeout_s plus 30 s."""
    from segserve.deploy.config import PoolConfig

    if expected == "default":
        expected = PoolConfig.model_fields["graceful_shutdown_timeout_s"].default + 30
    pools = [{"name": "gpu", "device": "gpu"}, {"name": "cpu", "device": "cpu"}]
    for pool, grace in zip(pools, graces, strict=True):
        if grace is not None:
            pool["graceful_shutdown_timeout_s"] = grace
    rs = one(render({"segserve": {"models": [{"name": "demo"}], "pools": pools}}, tmp),
             "RayService")  # fmt: skip
    templates = pod_templates(rs)
    assert set(templates) == {"head", "gpu-workers", "cpu-workers"}
    for group, template in templates.items():
        assert template["spec"]["terminationGracePeriodSeconds"] == expected, group
    serve_pools = {p["name"]: p for p in service_args(rs)["pools"]}
    for pool in pools:  # the drain itself is what the pools say
        if "graceful_shutdown_timeout_s" in pool:
            grace = serve_pools[pool["name"]]["graceful_shutdown_timeout_s"]
            assert grace == pool["graceful_shutdown_timeout_s"]


@pytest.mark.parametrize("mode", ["proxy", "haproxy"])
def test_serve_mode_env_reaches_every_ray_container(tmp, mode):
    """Every Ray process reads the mode's variables once, at start: each head and worker
    container carries exactly segserve serve's environment for that mode."""
    from segserve.deploy.launch import EVERY_MODE_ENV, SERVE_MODES

    rs = one(render({"serve": {"mode": mode}}, tmp), "RayService")
    want = {**SERVE_MODES[mode], **EVERY_MODE_ENV}
    names = set(SERVE_MODES["haproxy"]) | set(SERVE_MODES["proxy"]) | set(EVERY_MODE_ENV)
    for group, template in pod_templates(rs).items():
        env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
        assert {k: v for k, v in env.items() if k in names} == want, group
    assert "mode" not in serve_config(rs)  # Serve's own file has no such key


def test_unknown_serve_mode_is_refused(tmp):
    proc = render({"serve": {"mode": "direct"}}, tmp, check=False)
    assert proc.returncode != 0 and "mode" in proc.stderr, proc.stderr


def test_hostpath_model(rendered):
    rs = one(rendered("hostpath_gguf"), "RayService")
    for template in pod_templates(rs).values():
        vols = {v["name"]: v for v in template["spec"]["volumes"]}
        assert vols["models"]["hostPath"] == {"path": "/srv/models", "type": "Directory"}
        mounts = {m["name"]: m for m in template["spec"]["containers"][0]["volumeMounts"]}
        assert mounts["models"] == {"name": "models", "mountPath": "/models", "readOnly": True}
        assert "initContainers" not in template["spec"]  # nothing downloads


# --- hardening and wiring ------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_hardening(rendered, case):
    objects = rendered(case)
    rs = one(objects, "RayService")
    for group, template in pod_templates(rs).items():
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True, group
        mounts = {m["mountPath"] for m in template["spec"]["containers"][0]["volumeMounts"]}
        assert {"/tmp", "/dev/shm"} <= mounts, group  # where Ray writes
    containers = _containers(rs)
    autoscaler = rs["spec"]["rayClusterConfig"].get("autoscalerOptions")
    if autoscaler:
        containers.append(("autoscaler", autoscaler))
    for where, c in containers:
        assert c["resources"]["requests"] and c["resources"]["limits"], where
        sc = c["securityContext"]
        assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False, where
        assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == ["ALL"]
        assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, where  # writable
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and head["enableIngress"] is False
    for svc in by_kind(objects, "Service"):
        assert 8265 not in {p["port"] for p in svc["spec"]["ports"]}  # the dashboard
        assert svc["spec"]["type"] == "ClusterIP"


@pytest.mark.parametrize("case", ["default", "everything"])
def test_services_select_the_ray_pods(rendered, case):
    objects = rendered(case)
    rs = one(objects, "RayService")
    labels = [t["metadata"]["labels"] for t in pod_templates(rs).values()]
    services = {s["metadata"]["name"]: s for s in by_kind(objects, "Service")}
    main, metrics = services["rel-segserve"], services["rel-segserve-metrics"]
    for svc in (main, metrics):
        # KubeRay adds the ray.io/ labels (ray.io/serve: true on pods that serve) itself.
        ours = {k: v for k, v in svc["spec"]["selector"].items() if not k.startswith("ray.io/")}
        assert all(ours.items() <= pod.items() for pod in labels), svc["metadata"]["name"]
    assert main["spec"]["selector"]["ray.io/serve"] == "true"
    assert {p["name"]: p["port"] for p in main["spec"]["ports"]} == {"http": 8000, "grpc": 9000}
    assert {p["name"]: p["port"] for p in metrics["spec"]["ports"]} == {"metrics": 8080}
    for template in pod_templates(rs).values():
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert ports["serve"] == 8000 and ports["grpc"] == 9000 and ports["metrics"] == 8080
    for sm in by_kind(objects, "ServiceMonitor"):
        selects = sm["spec"]["selector"]["matchLabels"].items()
        assert selects <= metrics["metadata"]["labels"].items()
        assert not selects <= main["metadata"]["labels"].items()
        assert sm["spec"]["endpoints"][0]["port"] == "metrics"
        assert sm["metadata"]["labels"]["release"] == "prometheus"


def test_dashboard_configmap_ships_the_dashboard(rendered):
    cm = one(rendered("everything"), "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads(cm["data"]["segserve.json"])
    assert shipped == json.loads((REPO / "k8s" / "dashboards" / "segserve.json").read_text())


def test_notes_say_how_to_call(tmp):
    notes = render_notes({}, tmp)
    for needle in ("port-forward svc/rel-segserve 8000:8000 9000:9000", "curl http://localhost:8000",
                   "openai.OpenAI(base_url='http://localhost:8000/v1'",
                   "segserve client --grpc localhost:9000 --model demo"):  # fmt: skip
        assert needle in notes, notes
    assert "Authorization" not in notes
    keyed = render_notes(CASES["api_key"], tmp)
    assert 'Authorization: Bearer $SEGSERVE_API_KEY' in keyed and "--api-key" in keyed
    assert "get secret rel-segserve-api-key" in keyed
