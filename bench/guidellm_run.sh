#!/usr/bin/env bash
# A short streaming guidellm run against segserve (not part of the test suite).
#
#   pip install guidellm          # not a segserve dependency: it pins click/multidict versions
#   bench/guidellm_run.sh         # starts `segserve serve` on the demo model (CPU, ports 8000
#                                 # and 9000), runs guidellm, stops the service
#   TARGET=http://host:8000 MODEL=llama TOKENIZER=/models/llama bench/guidellm_run.sh
#                                 # against a service that is already running
#
# guidellm streams every request with stream_options.continuous_usage_stats (usage in every
# chunk) and reads TTFT, ITL and throughput from the chunks. The run: synthetic prompts of
# PROMPT_TOKENS, OUTPUT_TOKENS each, at STREAMS concurrent streams (1, then 4), REQUESTS
# requests per level. Results go to $OUT (guidellm's JSON) and the console.
set -euo pipefail

MODEL=${MODEL:-demo}
PROMPT_TOKENS=${PROMPT_TOKENS:-64}
OUTPUT_TOKENS=${OUTPUT_TOKENS:-32}
REQUESTS=${REQUESTS:-16}
OUT=${OUT:-guidellm-results.json}

started=""
if [[ -z "${TARGET:-}" ]]; then
    TARGET=http://127.0.0.1:8000
    export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
    config=$(mktemp --suffix=.yaml)
    cat > "$config" <<EOF
proxy_location: HeadOnly
http_options: {host: 127.0.0.1, port: 8000}
grpc_options:
  port: 9000
  grpc_servicer_functions: [segserve.proto.servicer.add_SegServeServicer_to_server]
applications:
  - name: segserve
    route_prefix: /
    import_path: segserve.deploy.app:build_app
    args:
      models: [{name: demo, path: demo, dtype: float32}]
      pools: [{name: cpu, device: cpu, num_replicas: 1, kv_cache_memory_gb: 0.5,
               max_num_batched_tokens: 2048, max_num_seqs: 64, max_queue_len: 256}]
EOF
    # SEGSERVE: how to start segserve's CLI (e.g. "python -m segserve.deploy.cli" for a checkout)
    ${SEGSERVE:-segserve} serve "$config" > guidellm-serve.log 2>&1 &
    started=$!
    trap 'kill "$started" 2>/dev/null || true; wait "$started" 2>/dev/null || true; rm -f "$config"' EXIT
    for _ in $(seq 1 180); do
        curl -sf "$TARGET/health" > /dev/null 2>&1 && break
        sleep 1
    done
    curl -sf "$TARGET/health" > /dev/null || { echo "the service did not come up; see guidellm-serve.log"; exit 1; }
fi
if [[ -z "${TOKENIZER:-}" ]]; then  # the demo checkpoint's directory (built on first use)
    TOKENIZER=$(python -c "from segserve.models.demo import ensure_demo_model; print(ensure_demo_model())")
fi

scenario=$(mktemp --suffix=.json)
cat > "$scenario" <<EOF
{
  "spec": {
    "backend": {"kind": "openai_http", "target": "$TARGET", "model": "$MODEL",
                "request_format": "/v1/completions"},
    "profile": {"kind": "concurrent"},
    "tokenizer": {"kind": "huggingface_auto", "model": "$TOKENIZER"},
    "data": [{"kind": "synthetic_text", "prompt_tokens": $PROMPT_TOKENS,
              "output_tokens": $OUTPUT_TOKENS}],
    "constraints": [{"kind": "max_requests", "count": $REQUESTS}]
  },
  "benchmarks": [{"profile.streams": 1}, {"profile.streams": 4}]
}
EOF
guidellm run --scenario "$scenario" --output "kind=json,path=$OUT" --output kind=console \
    --disable-progress
rm -f "$scenario"
