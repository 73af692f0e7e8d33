# Stage 1 at the paper's sizes (HiTokSR, SPEC.md section 1), for one GPU.
# 512x512 crops / patch 16 = a 32x32 grid = 1024 tokens per image; batch 32 -> 32k tokens per step.
out_dir = 'out/tokenizer_paper'
crop_size = 512
batch_size = 32
patch = 16
latent_dim = 32
groups = 4
codebook_size = 4096      # per group: 4 x 4096 codes of 8 dims
width = 768
depth = 12
n_head = 12
lr = 1e-4
d_lr = 5e-5
gan_weight = 0.8          # hinge
lpips_weight = 1.0
beta = 0.25
max_iters = 100000
eval_interval = 2000
warmup_iters = 1000
gan_start = 20000
compile = True
