#!/usr/bin/env bash
# Create .venv-mergekit: mergekit-moe 0.1.5 (with the same CPU torch), to make published merges in tests.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv-mergekit/bin/mergekit-moe ]; then
    exit 0
fi
python3 -m venv .venv-mergekit
.venv-mergekit/bin/python -m pip install -q --upgrade pip
.venv-mergekit/bin/python -m pip install -q torch==2.13.0
.venv-mergekit/bin/python -m pip install -q -r envs/requirements-mergekit.txt
