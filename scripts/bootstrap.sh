#!/usr/bin/env bash
# Create .venv and install nemoforge into it, on a fresh machine.
#   bash scripts/bootstrap.sh        # the package (what `nemoforge run` needs)
#   bash scripts/bootstrap.sh test   # plus the test tools (pytest, moto's S3 server, ruff)
# torch goes in first and pinned: with no torch present, a resolver would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${NEMOFORGE_TORCH:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "$TORCH_SPEC"
extras=""
[ "${1:-}" = "test" ] && extras="[test]"
.venv/bin/python -m pip install -q -e ".${extras}"
.venv/bin/python -c "import torch, nemoforge, kfp, mlflow; print('nemoforge', nemoforge.__version__, '| torch', torch.__version__, '| kfp', kfp.__version__, '| mlflow', mlflow.__version__)"
