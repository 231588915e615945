#!/usr/bin/env bash
# README command 2: the test suite (creates the environment first when missing).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/env.sh
ruff check .
exec python -m pytest tests "$@"
