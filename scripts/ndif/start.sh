#!/usr/bin/env bash
# Start a local NDIF stack on 127.0.0.1 (installs it first if needed).
#   scripts/ndif/start.sh [--state DIR]      state (pids, ports, API key): DIR/state.json
# Then: eval "$(scripts/ndif/env.sh)"  and  scripts/ndif/deploy.sh CHECKPOINT_DIR
set -euo pipefail
cd "$(dirname "$0")/../.."
scripts/ndif/install.sh
exec "${NDIF_VENV:-.ndif-venv}/bin/python" scripts/ndif/stack.py start "$@"
