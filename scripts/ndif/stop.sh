#!/usr/bin/env bash
# Stop the local NDIF stack started by start.sh: each service by the process id in its state.
#   scripts/ndif/stop.sh [--state DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${NDIF_VENV:-.ndif-venv}/bin/python" scripts/ndif/stack.py stop "$@"
