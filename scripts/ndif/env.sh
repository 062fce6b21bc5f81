#!/usr/bin/env bash
# Print NDIF_HOST and NDIF_API_KEY for the running local stack: eval "$(scripts/ndif/env.sh)"
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${NDIF_VENV:-.ndif-venv}/bin/python" scripts/ndif/stack.py env "$@"
