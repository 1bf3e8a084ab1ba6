#!/usr/bin/env bash
# The main job for now: the index at work (see README). Installs Redis when
# missing, builds in release mode and runs `kvroute-loadtest demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_rust
ensure_redis
cargo run --release --locked -q -p kvroute-loadtest -- demo "$@"
