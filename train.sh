#!/usr/bin/env bash
# README command 1: the default job — a tiny MoE on the Python stdlib corpus, 2 CPU ranks.
# Extra arguments are hydra overrides, e.g. ./train.sh train.steps=50 model=gpt_moe_tiny
set -euo pipefail
cd "$(dirname "$0")"
source scripts/env.sh
NPROC="${NPROC:-2}"
exec torchrun --standalone --nproc_per_node "$NPROC" -m launch.train experiment=default_job "$@"
