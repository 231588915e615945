#!/usr/bin/env bash
# README command 1: the default job — a tiny MoE on the Python stdlib corpus, 2 CPU ranks.
# Extra arguments are hydra overrides, e.g. ./train.sh train.steps=50 model=gpt_moe_tiny
# --help, --hydra-help, --cfg job (and an unknown option's one-line error) are answered once, by
# one process, before torchrun starts any worker; -m (a sweep) runs under torchrun, every rank
# running the same list of runs.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/env.sh
for arg in "$@"; do
  case "$arg" in
    -m|--multirun) ;;
    -*) exec python -m launch.train experiment=default_job "$@" ;;
  esac
done
NPROC="${NPROC:-2}"
exec torchrun --standalone --nproc_per_node "$NPROC" -m launch.train experiment=default_job "$@"
