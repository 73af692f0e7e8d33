# H-VAR's next-scale generator on a 2-core CPU in ~15 minutes, on the hierarchical tokenizer of
# config/tokenizer_hrq_tiny.py: plain multi-scale RQ, then its hierarchical fine-tuning with L1 + LPIPS
# (row (c') of Table 1a in docs/results.md):
#   python tokenizer.py config/tokenizer_hrq_tiny.py
#   python tokenizer.py config/tokenizer_hrq_tiny.py --hierarchical=True --freeze_encoder=True \
#       --init_from=out/tokenizer_hrq/ckpt.pt --out_dir=out/tokenizer_hrq_ft --max_minutes=4
# 128x128 HR crops (the tokenizer's native size: 16 x patch 8) <- 32x32 LR; sequence = 256
# condition tokens + 680 image tokens (steps 1,2,3,4,5,6,8,10,13,16; x1 = steps 1-4 at 32 px,
# x2 = 1-7 at 64 px, x4 = all at 128 px). Larger images are tiled at this size (sr.py, eval).
#   python generator.py config/generator_hvar_tiny.py
#   python generator.py config/generator_hvar_tiny.py --dpo=False --out_dir=out/generator_hvar_nodpo
#   python generator.py config/generator_hvar_tiny.py --hvar_tokens=plain --out_dir=out/generator_hvar_plain
method = 'hvar'
out_dir = 'out/generator_hvar'
tok_ckpt = 'out/tokenizer_hrq_ft/ckpt.pt'
crop_size = 128
batch_size = 8
patch = 8                 # must equal the tokenizer's
width = 192
depth = 4
n_head = 4                # head size 48
head = 'codebook'         # residual regression onto the tokenizer's codes, starting from the LR's own
                          # tokens (docs/method.md#next-scale-generator); 'linear' is VAR's classifier
learning_rate = 1e-3         # the paper's
weight_decay = 0.005
warmup_iters = 20
max_iters = 100000        # the time budget ends the run
max_minutes = 14.0
eval_interval = 1000
log_interval = 20
