#!/usr/bin/env bash
# The GPU recipe: the three stages of config/gpu.py (1.75 + 1.75 + 0.5 minutes of one H100/H200), the
# chain's evaluation table on the degraded validation pairs and sr.py on their LR images.
# Extra arguments go to every stage script (e.g. --dtype=float32). Outputs under out/*_gpu.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-.venv/bin/python}
if [ ! -x "$PY" ]; then bash setup.sh; fi
t0=$(date +%s)
$PY tokenizer.py config/gpu.py "$@"
$PY generator.py config/gpu.py "$@"
$PY finetune_decoder.py config/gpu.py "$@"
$PY eval.py --sr=chain --device=cuda --gen_ckpt=out/generator_gpu/ckpt.pt \
    --decoder_ckpt=out/finetune_decoder_gpu/ckpt.pt --out_json=out/eval/chain_gpu.json --report=out/eval/index_gpu.html
$PY sr.py --input=assets/val_pairs/lr --out_dir=out/sr_gpu --gen_ckpt=out/generator_gpu/ckpt.pt \
    --decoder_ckpt=out/finetune_decoder_gpu/ckpt.pt
echo "done in $(( ($(date +%s) - t0) / 60 )) min after set-up: out/eval/chain_gpu.json, out/sr_gpu/"
echo "the report: out/eval/index_gpu.html (open it in a browser)"
