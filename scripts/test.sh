#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite on the CPU, plus the import-layer contracts.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
lint-imports
python -m pytest -q -p no:cacheprovider "$@"
