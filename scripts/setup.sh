#!/usr/bin/env bash
# Creates .venv (if missing) and installs the package with its test extras.
# torch is installed first and pinned so no dependency pulls a multi-GB CUDA build on a
# CPU-only machine; set BROWNOUT_TORCH to choose another version.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==${BROWNOUT_TORCH:-2.13.0}"
python -m pip install -q -e ".[test]"
