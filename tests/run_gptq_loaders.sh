#!/usr/bin/env bash
# The GPTQModel/transformers loader check (tests/test_gptq_loaders.py) in its own venv:
#   python3.11 -m venv /work/venvs/gptqmodel
#   /work/venvs/gptqmodel/bin/pip install torch==2.14.1 gptqmodel==7.7.0 optimum pytest
# (about 9 minutes and 6 GB; gptqmodel needs torch >= 2.14.1, which the system env must not get).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${GPTQMODEL_VENV:-/work/venvs/gptqmodel}"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
export CTFORMAT_LOADER_CHECKS=1          # the outside_ci check runs here, and a missing peer is an error
exec nice -n 10 timeout "${TIMEOUT:-3000}" "$venv/bin/python" -m pytest -q -p no:cacheprovider \
    "$here/tests/test_gptq_loaders.py" "$@"
