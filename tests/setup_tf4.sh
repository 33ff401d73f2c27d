#!/usr/bin/env bash
# Create .venv-tf4: transformers 4.x (with the same CPU torch) for the compatibility tests.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv-tf4/bin/python ] && .venv-tf4/bin/python -c "import transformers, sys; sys.exit(not transformers.__version__.startswith('4.'))" 2>/dev/null; then
    exit 0
fi
python3 -m venv .venv-tf4
.venv-tf4/bin/python -m pip install -q --upgrade pip
.venv-tf4/bin/python -m pip install -q torch==2.13.0
.venv-tf4/bin/python -m pip install -q -r envs/requirements-tf4.txt
