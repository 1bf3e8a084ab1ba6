#!/usr/bin/env bash
# Installs what the tests need (idempotently) and runs every check CI runs:
# formatting, clippy with warnings as errors, and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ensure_rust
ensure_redis
ensure_openssl
ensure_nextest
ensure_python_venv

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
log "tests"
cargo nextest run --workspace --locked --no-fail-fast "$@"
