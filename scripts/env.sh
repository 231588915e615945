#!/usr/bin/env bash
# Create .venv and install what is missing. torch is pinned and installed FIRST: a later
# requirement that admits torch 2.13.0 is then satisfied and pip never pulls another torch.
# Sourced by train.sh and test.sh; safe to run again (it only installs what is missing).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[env] creating $VENV"
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  echo "[env] installing $TORCH_PIN (CPU wheel where one is available locally)"
  "$VENV/bin/pip" install -q "$TORCH_PIN"
fi
stamp="$VENV/.fssdp-installed"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  echo "[env] installing fssdp and its dependencies (editable, with the dev extra)"
  "$VENV/bin/pip" install -q -e "$ROOT[dev]"
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
