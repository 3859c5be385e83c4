#!/usr/bin/env bash
# Set up (idempotent), install chromium for the browser tests where missing (as root), check
# that no large file is tracked outside brownout/assets/, then run the whole test suite on the
# CPU, plus the import-layer contracts.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The dashboard's browser tests need Debian's chromium: install it where it is missing and we
# are root; otherwise (or if the install fails) those tests skip and say why.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium for the dashboard's browser tests" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
        || echo "chromium could not be installed: the browser tests will skip" >&2
fi
. .venv/bin/activate
python scripts/check_tree.py
lint-imports
python -m pytest -q -p no:cacheprovider "$@"
