#!/usr/bin/env bash
# The main job on the embedded default data, on this machine's CPU (~30 minutes on 2 cores):
#   set-up -> data -> bicubic baselines -> stage 1 tokenizer -> stage 2 generator
#   -> stage 3 decoder fine-tuning -> one evaluation table of the whole chain -> sr.py on images.
# Each stage runs the tiny size (config/tiny.py) with a wall-clock budget; extra arguments
# go to every stage script, e.g. `bash run.sh --device=cuda`. The main job retrains every stage from
# scratch, so a second `bash run.sh` replaces the first one's checkpoints (--overwrite=True; the
# stage scripts refuse that otherwise).
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
PY=.venv/bin/python
t0=$(date +%s)
echo "== bicubic baselines on the validation pairs =="
$PY eval.py --sr=bicubic --lr_kind=bicubic --out_json=out/eval/bicubic_clean.json | tail -4
$PY eval.py --sr=bicubic --lr_kind=degraded --out_json=out/eval/bicubic_degraded.json | tail -4
echo "== stage 1: tokenizer (config/tiny.py) =="
$PY tokenizer.py config/tiny.py --overwrite=True "$@"
echo "== stage 2: generator (config/tiny.py) =="
$PY generator.py config/tiny.py --overwrite=True "$@"
echo "== stage 3: decoder fine-tuning (config/tiny.py) =="
$PY finetune_decoder.py config/tiny.py --overwrite=True "$@"
echo "== the whole chain on the degraded validation pairs =="
$PY eval.py --sr=chain --gen_ckpt=out/generator/ckpt.pt --decoder_ckpt=out/finetune_decoder/ckpt.pt \
    --out_json=out/eval/chain.json
echo "== sr.py: super-resolve the degraded validation LR images =="
$PY sr.py --input=assets/val_pairs/lr --out_dir=out/sr --decoder_ckpt=out/finetune_decoder/ckpt.pt
echo
echo "done in $(( ($(date +%s) - t0) / 60 )) min after set-up. Results:"
echo "  out/eval/chain.json                          the table above (bicubic, stage 1, stage 2, stage 3)"
echo "  out/eval/index.html                          the report: open it in a browser (every validation image, every row)"
echo "  out/{tokenizer,generator,finetune_decoder}/  log.txt, summary.json, samples_*.png, curves.png, ckpt.pt"
echo "  out/sr/                                      4x outputs of sr.py"
