# Stage 3 on a 2-core CPU in ~4 minutes, on the chain of config/generator_tiny.py (tokenizer patch 8,
# G 4, K 256): 128x128 HR crops, batch 8; only the small decoder (3 blocks, width 128) trains.
out_dir = 'out/finetune_decoder'
gen_ckpt = 'out/generator/ckpt.pt'   # python generator.py config/generator_tiny.py
crop_size = 128
batch_size = 8
mode = 'topk'
top_k = 5
learning_rate = 5e-5                 # the paper's (compared with 2e-4 at equal time: docs/results.md, stage 3)
d_learning_rate = 5e-5
warmup_iters = 20
max_iters = 100000        # the time budget ends the run
max_minutes = 4.0
eval_interval = 100
log_interval = 10
gan_start = 100000        # GAN off: 4 CPU minutes are too few for the adversarial game; --gan_start=0 turns it on
