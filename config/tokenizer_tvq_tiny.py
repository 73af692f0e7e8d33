# Texture VQ (TVQ&RAP, docs/method.md#texture-vq) on a 2-core CPU in ~9 minutes: the sizes of
# config/tokenizer_tiny.py with one texture codebook and a structure branch instead of 4 groups.
# 128x128 crops / patch 8 = a 16x16 texture grid (256 tokens of 32 dims, 1 codebook of 1024);
# structure map F_L: 16 channels on a 4x4 grid (H/32), aligned to the code of a small autoencoder
# of the crop downsampled 8x (16x16 px, patch 4 -> 4x4). Batch 8 -> 2048 texture tokens per step.
out_dir = 'out/tokenizer_tvq'
quantizer = 'tvq'
crop_size = 128
batch_size = 8
patch = 8
latent_dim = 32           # texture channels (paper 256)
groups = 1
codebook_size = 1024      # the paper's texture codebook; the same 1024 codewords as the grouped tiny's 4 x 256
tvq_struct_dim = 16       # structure channels (paper 64)
tvq_struct_pool = 4       # H/32
tvq_down = 8              # x_down = 16x16 px
tvq_down_width = 64       # E_down and D_down: one small ViT each
tvq_down_depth = 1
tvq_down_heads = 2
enc_width = 128           # encoder and decoder as config/tokenizer_tiny.py
enc_depth = 3
enc_heads = 4
dec_width = 128
dec_depth = 3
dec_heads = 4
l1_weight = 0.0           # MSE + LPIPS (+ GAN) as the paper's Eq. 7
l2_weight = 1.0
lpips_weight = 1.0
gan_weight = 0.75         # the paper's lambda_adv (hinge here), off at this length: see gan_start
align_weight = 1.0
down_weight = 1.0
learning_rate = 1e-3
d_learning_rate = 5e-4
warmup_iters = 50
max_iters = 100000        # the time budget ends the run
max_minutes = 9.0
eval_interval = 400
log_interval = 20
gan_start = 100000        # GAN off: 10 CPU minutes is far from a converged autoencoder; --gan_start=N turns it on
