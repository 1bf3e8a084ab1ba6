#!/usr/bin/env bash
# The main job: kvroute against round-robin, random and an oracle on a live
# fleet. Installs what is missing (Redis, the Python venv with Envoy), builds
# the ingester, the scorer and the load test in release mode, then runs
# `kvroute-loadtest live`: per workload and policy a local Redis, 8 simulated
# vLLM pods (OpenAI API on 127.0.0.11-18:8000, KV events over ZeroMQ), the
# real kvroute-ingester, two kvroute-scorer replicas and Envoy; the seeded
# workloads "repeated" (one ~1,000-token chat prompt) and "tenants"
# (tenants sharing long system prompts) replayed in real time. Everything it
# starts stops when it ends, also on Ctrl-C. Extra arguments go to `live`
# (see `kvroute-loadtest live --help`); the index walkthrough of earlier
# versions is `kvroute-loadtest demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_rust
ensure_redis
ensure_python_venv
log "building kvroute-ingester, kvroute-scorer and kvroute-loadtest (release)"
cargo build --release --locked -q -p kvroute-ingester -p kvroute-scorer -p kvroute-loadtest
exec "$CARGO_TARGET_DIR/release/kvroute-loadtest" live \
  --workload repeated,tenants --requests 300 --rate 20 --pods 8 --scorers 2 \
  --policies kvroute,round-robin,random,oracle --out-dir kvroute-report "$@"
