#!/usr/bin/env bash
# The main job on a fresh machine: set up the environment, prepare SmolLM2-135M-Instruct (once, into
# ~/.cache/vllm-eagle), and generate with EAGLE speculation using the shipped head; prints text, tokens/s and tau.
# Extra arguments go to `vllm-eagle generate` (e.g. --compare, -k 5, --prompt "...").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" HF_HUB_OFFLINE=1
exec "$ROOT/.venv/bin/vllm-eagle" generate "$@"
