#!/usr/bin/env bash
# Set up (idempotent) and run the main job: the simulated H200 headline, then the bursty-load
# demo on the embedded model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec brownout demo "$@"
