# Stage 2 at the paper's sizes (HiTokSR, docs/method.md#generator), for one GPU, on the tokenizer of
# config/tokenizer_paper.py: 512x512 crops / patch 16 = a 32x32 grid = 1024 tokens per image,
# batch 64 -> 64k tokens per step; LR 128x128, 4 LR pixels per token side.
# Memory: the straight-through one-hot is (B, G, h, w, K) = 64 x 4 x 1024 x 4096 floats = 4.3 GB,
# plus its gradient and the softmax; lower batch_size if the GPU runs out.
out_dir = 'out/generator_paper'
tok_ckpt = 'out/tokenizer_paper/ckpt.pt'
crop_size = 512
batch_size = 64
patch = 16
width = 768
depth = 12
n_head = 12
stem_dim = 128
sft_hidden = 128
use_prior = True
use_sft = True
cls_tokens = 'multi'
lora_rank = 4
learning_rate = 5e-5
d_learning_rate = 1e-5
ce_weight = 1.0
repa_weight = 1.0
l1_weight = 1.0
lpips_weight = 1.0
gan_weight = 0.5          # vanilla GAN
gan_start = 20000
max_iters = 100000
eval_interval = 2000
warmup_iters = 1000
compile = True
