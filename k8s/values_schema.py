"""Keep the chart's values.schema.json in step with segserve's config schema.

The chart's ``segserve:`` values are the ``args`` of a deploy/ config, so their JSON schema is
``segserve.deploy.config.ServiceConfig``'s own (pydantic), plus the chart's additions: a pool's
``device`` may be ``gpu``, a model may say ``fetch``. This rewrites ``properties.segserve`` and
``$defs`` of k8s/segserve/values.schema.json; the rest of that file (the chart's own keys) is
written by hand. tests/test_helm_chart.py fails while the file is stale.

    python k8s/values_schema.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).parent / "segserve" / "values.schema.json"
# Models an init step can fetch (`segserve fetch NAME`).
FETCHABLE = ["smollm2"]


def _strip_titles(node: Any) -> Any:
    # pydantic's titles repeat the key names; descriptions stay.
    if isinstance(node, dict):
        return {k: _strip_titles(v) for k, v in node.items() if k != "title"}
    if isinstance(node, list):
        return [_strip_titles(v) for v in node]
    return node


def segserve_schema() -> dict[str, Any]:
    """ServiceConfig's JSON schema with the chart's additions (``$defs`` inside)."""
    from segserve.deploy.config import ServiceConfig

    schema = _strip_titles(ServiceConfig.model_json_schema())
    defs = schema["$defs"]
    device = defs["PoolConfig"]["properties"]["device"]
    device["enum"] = [*device["enum"], "gpu"]
    device["description"] = "cpu, cuda, xpu, or gpu: cuda or xpu by gpu.vendor"
    defs["ModelConfig"]["properties"]["fetch"] = {
        "enum": FETCHABLE,
        "description": "chart only: an init step runs `segserve fetch NAME` into the model cache",
    }
    schema["description"] = (
        "the `args` of a deploy/configs/*.yaml (segserve.deploy.config.ServiceConfig)"
    )
    return schema


def updated(values_schema: dict[str, Any]) -> dict[str, Any]:
    """``values_schema`` with its segserve part regenerated."""
    generated = segserve_schema()
    out = dict(values_schema)
    out["$defs"] = generated.pop("$defs")
    out["properties"] = {**values_schema["properties"], "segserve": generated}
    return out


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2) + "\n"


def main() -> None:
    current = json.loads(SCHEMA_PATH.read_text())
    SCHEMA_PATH.write_text(render(updated(current)))
    print(f"wrote {SCHEMA_PATH}")


if __name__ == "__main__":
    main()
