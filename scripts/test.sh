#!/usr/bin/env bash
# Set up the environment and run the test suite (what CI runs through .ci/run). Extra arguments go to pytest.
# Two pytest-xdist workers, one per core: tests run engines in-process on one OpenMP thread each. A module stays on
# one worker (--dist loadfile), so its module-scoped vanilla references are computed once. TEST_WORKERS=0 runs
# everything in this process.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" HF_HUB_OFFLINE=1
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest -q --durations=15 -n "${TEST_WORKERS:-2}" --dist loadfile "$@" tests
