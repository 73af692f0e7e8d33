#!/usr/bin/env bash
# The test command: set-up (idempotent) then the whole pytest suite (~10 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
exec .venv/bin/python -m pytest -q "$@"
