#!/usr/bin/env bash
# One command per system, on the embedded default data, on this machine's CPU (each ~30 minutes on 2 cores
# with set-up); every stage runs the tiny size (config/tiny.py) with a wall-clock budget:
#   bash run.sh        HiTokSR, the main job: set-up -> data -> bicubic baselines -> stage 1 tokenizer
#                      -> stage 2 generator -> stage 3 decoder fine-tuning -> one evaluation table of the
#                      whole chain -> sr.py on images (9 + 10 + 4 minutes of training)
#   bash run.sh hvar   H-VAR (config/hvar.py): multi-scale RQ tokenizer -> its hierarchical fine-tuning
#                      (Algorithm 1, encoder frozen) -> next-scale generator -> the x1 / x2 / x4 table
#                      -> sr.py --scales=1,2,4 (7 + 4 + 10 minutes)
#   bash run.sh tvq    TVQ&RAP (config/tvq.py): texture-VQ tokenizer -> texture predictor -> the table
#                      -> sr.py (9 + 10 minutes)
# Extra arguments go to every training stage script, e.g. `bash run.sh --device=cuda` or
# `bash run.sh hvar --threads=2`. Each job retrains its stages from scratch, so a second run replaces
# the first one's checkpoints (--overwrite=True; the stage scripts refuse that otherwise).
set -euo pipefail
cd "$(dirname "$0")"
job=hitoksr
case "${1:-}" in
    hvar|tvq) job=$1; shift ;;
    ''|--*) ;;
    *) echo "usage: bash run.sh [hvar|tvq] [--key=value ...]" >&2; exit 2 ;;
esac
bash setup.sh
PY=.venv/bin/python
t0=$(date +%s)
if [ "$job" = hitoksr ]; then
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
    report=out/eval/index.html
    echo "== sr.py: super-resolve the degraded validation LR images =="
    $PY sr.py --input=assets/val_pairs/lr --out_dir=out/sr --decoder_ckpt=out/finetune_decoder/ckpt.pt
    results="out/eval/chain.json (bicubic, stages 1-3); out/{tokenizer,generator,finetune_decoder}/; out/sr/"
elif [ "$job" = hvar ]; then
    echo "== H-VAR tokenizer: plain multi-scale RQ (config/tiny.py config/hvar.py) =="
    $PY tokenizer.py config/tiny.py config/hvar.py --overwrite=True "$@"
    echo "== H-VAR tokenizer: hierarchical fine-tuning (Algorithm 1, encoder frozen) =="
    $PY tokenizer.py config/tiny.py config/hvar.py --hierarchical=True --freeze_encoder=True \
        --init_from=out/tokenizer_hrq/ckpt.pt --out_dir=out/tokenizer_hrq_ft --max_minutes=4 --overwrite=True "$@"
    echo "== H-VAR next-scale generator (config/tiny.py config/hvar.py) =="
    $PY generator.py config/tiny.py config/hvar.py --overwrite=True "$@"
    echo "== x1 / x2 / x4 of the chain on the degraded validation pairs =="
    $PY eval.py --sr=chain --gen_ckpt=out/generator_hvar/ckpt.pt --out_json=out/eval/chain_hvar.json \
        --report=out/eval/index_hvar.html
    report=out/eval/index_hvar.html
    echo "== sr.py --scales=1,2,4: the degraded validation LR images =="
    $PY sr.py --input=assets/val_pairs/lr --out_dir=out/sr_hvar --gen_ckpt=out/generator_hvar/ckpt.pt --scales=1,2,4
    results="out/eval/chain_hvar.json (x1, x2, x4); out/{tokenizer_hrq,tokenizer_hrq_ft,generator_hvar}/; out/sr_hvar/"
else
    echo "== texture-VQ tokenizer (config/tiny.py config/tvq.py) =="
    $PY tokenizer.py config/tiny.py config/tvq.py --overwrite=True "$@"
    echo "== texture predictor (config/tiny.py config/tvq.py) =="
    $PY generator.py config/tiny.py config/tvq.py --overwrite=True "$@"
    echo "== the chain on the degraded validation pairs =="
    $PY eval.py --sr=chain --gen_ckpt=out/generator_tvq/ckpt.pt --out_json=out/eval/chain_tvq.json \
        --report=out/eval/index_tvq.html
    report=out/eval/index_tvq.html
    echo "== sr.py: super-resolve the degraded validation LR images =="
    $PY sr.py --input=assets/val_pairs/lr --out_dir=out/sr_tvq --gen_ckpt=out/generator_tvq/ckpt.pt
    results="out/eval/chain_tvq.json; out/{tokenizer_tvq,generator_tvq}/; out/sr_tvq/"
fi
echo
echo "done in $(( ($(date +%s) - t0) / 60 )) min after set-up. Results: $results"
echo "(each out/ stage folder: log.txt, summary.json, samples_*.png, curves.png, ckpt.pt)"
echo "The report, every validation image and every row side by side: open $report in a browser"
