#!/usr/bin/env bash
# The test command: set-up (idempotent) then the whole pytest suite, in 2 worker processes (pytest-xdist):
# most tests run the stage scripts as subprocesses with one thread each, so 2 workers keep 2 cores busy.
# Extra arguments go to pytest (e.g. `bash test.sh tests/test_model.py`, or `-n 0` for one process).
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
exec .venv/bin/python -m pytest -q -n 2 "$@"
