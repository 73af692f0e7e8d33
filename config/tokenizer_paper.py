# Stage 1 at the paper's sizes (HiTokSR, docs/method.md#grouped-vq), for one GPU.
# 512x512 crops / patch 16 = a 32x32 grid = 1024 tokens per image; batch 32 -> 32k tokens per step.
out_dir = 'out/tokenizer_paper'
crop_size = 512
batch_size = 32
patch = 16
latent_dim = 32
groups = 4
codebook_size = 4096      # per group: 4 x 4096 codes of 8 dims
enc_width = 768           # encoder and decoder of the same size
enc_depth = 12
enc_heads = 12
dec_width = 768
dec_depth = 12
dec_heads = 12
learning_rate = 1e-4
d_learning_rate = 5e-5
gan_weight = 0.8          # hinge
lpips_weight = 1.0
beta = 0.25
max_iters = 100000
eval_interval = 2000
warmup_iters = 1000
gan_start = 20000
compile = True
