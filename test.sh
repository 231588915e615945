#!/usr/bin/env bash
# README command 2: the test suite (creates the environment first when missing).
# Two pytest workers (pytest-xdist; an idle worker steals queued tests): the multi-process tests spend
# much of their time starting interpreters and waiting on each other, which the second worker
# fills. FSSDP_TEST_WORKERS=0 runs everything in one process; extra arguments go to pytest
# (e.g. ./test.sh -m "not slow", the quick subset).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/env.sh
ruff check .
exec python -m pytest tests -n "${FSSDP_TEST_WORKERS:-2}" --dist worksteal "$@"
