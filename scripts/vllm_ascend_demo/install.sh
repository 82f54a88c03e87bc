#!/usr/bin/env bash
# Install vllm 0.23.0 + vllm-ascend 0.23.0.post1 beside mc2-emu on a CPU-only machine.
#   bash scripts/vllm_ascend_demo/install.sh [VENV]     (default .venv-vllm-ascend)
# then: VENV/bin/torchrun --nproc-per-node 4 -m emu.npu.run scripts/vllm_ascend_demo/demo.py
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${1:-$repo/.venv-vllm-ascend}"
python3 -m venv "$venv"
pip="$venv/bin/pip"
"$pip" install -q torch==2.13.0 numpy                      # the CPU build first, never upgraded after
"$pip" install -q --no-deps -r "$here/requirements.txt"    # vllm's pure-Python imports, pinned
"$pip" install -q --no-deps vllm==0.23.0
COMPILE_CUSTOM_KERNELS=0 SOC_VERSION=ascend910_9391 \
  "$pip" install -q --no-deps --no-build-isolation vllm-ascend==0.23.0.post1
"$pip" install -q --no-deps -e "$repo"
"$venv/bin/python" -c "import torch, vllm, vllm_ascend; print('torch', torch.__version__, 'vllm', vllm.__version__)"
