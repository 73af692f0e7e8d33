# Texture-VQ predictor at the paper's sizes (TVQ&RAP; docs/method.md#texture-predictor), for one GPU,
# on the tokenizer of config/tokenizer_tvq_paper.py: 512x512 crops / patch 8 = a 64x64 texture
# grid (4096 tokens, 1024 logits each) and a 16x16 structure map; LR 128x128, 2 LR pixels per token.
# Memory: the straight-through one-hot is (B, 1, h, w, K) = 16 x 4096 x 1024 floats = 268 MB.
# The paper's predictor is 12 Swin blocks without a pretrained prior; here 12 global-attention
# blocks (--use_prior=True adds HiTokSR's prior).
out_dir = 'out/generator_tvq_paper'
tok_ckpt = 'out/tokenizer_tvq_paper/ckpt.pt'
method = 'tvq'
crop_size = 512
batch_size = 16
patch = 8
width = 768
depth = 12
n_head = 12
stem_dim = 128
use_prior = False
struct_weight = 1.0       # Eq. 9
ce_weight = 0.5           # Eq. 9: lambda_CE
l1_weight = 1.0
lpips_weight = 1.0
gan_weight = 0.75         # lambda_adv of Eq. 7
learning_rate = 5e-5
d_learning_rate = 1e-5
gan_start = 20000
max_iters = 100000
eval_interval = 2000
warmup_iters = 1000
compile = True
