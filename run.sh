#!/usr/bin/env bash
# The main job on the embedded default data, on this machine's CPU (~15 minutes):
#   set-up -> data -> bicubic baselines on the validation pairs -> stage-1 tokenizer (tiny config).
# Stages 2 and 3 (generator, decoder fine-tuning) join this script when they land.
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
PY=.venv/bin/python
echo "== bicubic baselines on the validation pairs =="
$PY eval.py --sr=bicubic --lr_kind=bicubic --out_json=out/eval/bicubic_clean.json
$PY eval.py --sr=bicubic --lr_kind=degraded --out_json=out/eval/bicubic_degraded.json
echo "== stage 1: tokenizer (config/tokenizer_tiny.py, 10-minute budget) =="
$PY tokenizer.py config/tokenizer_tiny.py "$@"
echo
echo "results: out/eval/*.json (baselines), out/tokenizer/summary.json, log.txt and samples_*.png"
