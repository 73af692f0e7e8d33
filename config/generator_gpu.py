# Stage 2 of the GPU recipe, on config/tokenizer_gpu.py (patch 8, G 4, K 1024).
# 256x256 HR crops -> 64x64 LR -> a 32x32 token grid; batch 32; the degradation's JPEG in torch on
# the GPU, so the batch never goes back to the host. Its H100 run (speed, steps, SR scores):
# docs/results.md, "On a GPU".
out_dir = 'out/generator_gpu'
tok_ckpt = 'out/tokenizer_gpu/ckpt.pt'
crop_size = 256
batch_size = 32
patch = 8
width = 384
depth = 8
n_head = 6                # head size 64
stem_dim = 64
sft_hidden = 128
lora_rank = 4
learning_rate = 3e-4
d_learning_rate = 1e-4
weight_decay = 0.01
warmup_iters = 100
max_iters = 1000000       # the time budget ends the run
max_minutes = 1.75
eval_interval = 300
log_interval = 50
gan_start = 1000000       # GAN off at this length
compile = False          # eager: in a 2-minute run compilation would eat the gain (bench.py measures both)
