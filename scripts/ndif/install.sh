#!/usr/bin/env bash
# Install a local NDIF server stack for development and the `remote` tests.
#
#   scripts/ndif/install.sh          idempotent; a no-op when the stamp is current
#
# What it installs (nothing listens on anything but 127.0.0.1 once started):
#   * Debian's redis-server and postgresql (apt-get, needs root; skipped when present)
#     PostgreSQL holds the API keys: with it, the API checks keys as NDIF does
#   * a virtual environment NDIF_VENV (default .ndif-venv) WITHOUT this package:
#     ndif[api,ray] (the server), moto[server] (an S3-compatible object store),
#     CPU torch, and the nnsight/transformers versions of constraints.txt
#
# ndif 0.1.2 declares Python >= 3.12; it runs on 3.11, so pip is told
# --ignore-requires-python. numpy is pinned to a release with a cp311 wheel (binary only),
# torch to the CPU build.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="$PWD"
VENV="${NDIF_VENV:-$ROOT/.ndif-venv}"
PY="$VENV/bin/python"
STAMP="$VENV/.installed"
NDIF_VERSION="0.1.2"
SELF="scripts/ndif/install.sh"

log() { printf '[ndif-install] %s\n' "$*" >&2; }

pin() {  # the version of a package in constraints.txt
  sed -n "s/^$1==//p" constraints.txt | head -1
}

pg_bin() {  # the directory of PostgreSQL's server binaries, if installed
  local d
  for d in /usr/lib/postgresql/*/bin; do
    [[ -x "$d/initdb" ]] && { echo "$d"; return; }
  done
}

install_servers() {
  local wanted=()
  command -v redis-server >/dev/null 2>&1 || wanted+=(redis-server)
  [[ -n "$(pg_bin)" ]] || wanted+=(postgresql)
  if [[ ${#wanted[@]} == 0 ]]; then
    return
  fi
  if [[ "$(id -u)" != 0 ]]; then
    log "missing: ${wanted[*]}; this is not root: run 'sudo apt-get install -y ${wanted[*]}'"
    exit 1
  fi
  log "installing ${wanted[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${wanted[@]}" >/dev/null
  # the packages may start system services; ours are started by start.sh on 127.0.0.1
  local svc
  for svc in redis-server postgresql; do
    if command -v systemctl >/dev/null 2>&1; then
      systemctl disable --now "$svc" >/dev/null 2>&1 || true
    fi
    service "$svc" stop >/dev/null 2>&1 || true
  done
}

install_servers

if [[ -f "$STAMP" && "$STAMP" -nt "$SELF" && "$STAMP" -nt constraints.txt ]]; then
  log "up to date: $VENV"
  exit 0
fi

if [[ ! -x "$PY" ]]; then
  base="${PYTHON:-python3}"
  "$base" -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is needed"'
  log "creating $VENV"
  "$base" -m venv "$VENV"
fi
PIP=("$PY" -m pip install --quiet --disable-pip-version-check --no-compile)
TORCH="$(pin torch)"; TORCH="${TORCH:-2.13.0}"
NNSIGHT="$(pin nnsight)"; NNSIGHT="${NNSIGHT:-0.8.1}"
TRANSFORMERS="$(pin transformers)"
NUMPY="2.4.6"
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
{
  echo "torch==$TORCH"
  echo "numpy==$NUMPY"
  echo "nnsight==$NNSIGHT"
  [[ -n "$TRANSFORMERS" ]] && echo "transformers==$TRANSFORMERS"
} >"$pins"
log "installing torch $TORCH (CPU), numpy $NUMPY"
"${PIP[@]}" "torch==$TORCH"
"${PIP[@]}" --only-binary numpy "numpy==$NUMPY"
log "installing ndif[api,ray,postgres]==$NDIF_VERSION, nnsight $NNSIGHT, moto[server]"
"${PIP[@]}" --ignore-requires-python --only-binary numpy -c "$pins" \
  "ndif[api,ray,postgres]==$NDIF_VERSION" "nnsight==$NNSIGHT" "moto[server]"
if "$PY" -I -c 'import interventions' >/dev/null 2>&1; then
  log "error: 'interventions' is importable in $VENV; the server must not have it"
  exit 1
fi
"$PY" -c 'import ndif, nnsight, ray, moto, torch; print("ndif stack:", "nnsight", nnsight.__version__, "ray", ray.__version__, "torch", torch.__version__)'
touch "$STAMP"
log "done: $VENV"
