#!/usr/bin/env bash
# Set up (idempotent), check that no large file is tracked outside brownout/assets/, then run the
# whole test suite on the CPU, plus the import-layer contracts.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python scripts/check_tree.py
lint-imports
python -m pytest -q -p no:cacheprovider "$@"
