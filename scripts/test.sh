#!/usr/bin/env bash
# Set up the environment and run the test suite (what CI runs through .ci/run). Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" HF_HUB_OFFLINE=1
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest -q --durations=15 "$@" tests
