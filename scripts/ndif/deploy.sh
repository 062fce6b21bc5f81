#!/usr/bin/env bash
# Deploy a checkpoint directory (save_pretrained, with its tokenizer) on the local stack.
#   scripts/ndif/deploy.sh CHECKPOINT_DIR [--state DIR]     prints the model key
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${NDIF_VENV:-.ndif-venv}/bin/python" scripts/ndif/deploy.py "$@"
