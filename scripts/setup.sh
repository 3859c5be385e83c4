#!/usr/bin/env bash
# Creates .venv (if missing) and installs the package with its test extras.
# torch is installed first and pinned so no dependency pulls a multi-GB CUDA build on a
# CPU-only machine; set BROWNOUT_TORCH to choose another version. The package is installed
# in editable mode, so a second run only reinstalls when pyproject.toml or the torch pin changed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.brownout-setup
want="$(python -c 'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())') torch==${BROWNOUT_TORCH:-2.13.0}"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && python -c "import brownout, torch" 2>/dev/null; then
  exit 0
fi
python -m pip install -q --upgrade pip
python -m pip install -q "torch==${BROWNOUT_TORCH:-2.13.0}"
python -m pip install -q -e ".[test]"
echo "$want" > "$stamp"
