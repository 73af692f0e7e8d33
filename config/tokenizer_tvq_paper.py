# Texture VQ at the paper's sizes (TVQ&RAP Sec. 4.1 and appendix B; docs/method.md#texture-vq), for
# one GPU. 512x512 crops / patch 8 = a 64x64 texture grid of 256-dim vectors, one codebook of 1024;
# structure map 64 channels at H/32 (16x16), aligned to the code of an autoencoder of x
# downsampled 8x (64x64 px, patch 4). Batch 16 -> 64k texture tokens per step. The paper's
# tokenizer is convolutional with attention layers; here the project's ViTs.
out_dir = 'out/tokenizer_tvq_paper'
quantizer = 'tvq'
crop_size = 512
batch_size = 16
patch = 8
latent_dim = 256          # texture channels C_H
groups = 1
codebook_size = 1024      # texture codebook
tvq_struct_dim = 64       # C_L
tvq_struct_pool = 4       # H_L = H/32
tvq_down = 8              # X_down = X downsampled 8x
tvq_down_width = 256
tvq_down_depth = 4
tvq_down_heads = 4
enc_width = 768
enc_depth = 12
enc_heads = 12
dec_width = 768
dec_depth = 12
dec_heads = 12
l1_weight = 0.0           # Eq. 7: MSE + perceptual + 0.75 adversarial + codebook + commitment
l2_weight = 1.0
lpips_weight = 1.0
gan_weight = 0.75
commit_weight = 1.0
beta = 0.25
align_weight = 1.0
down_weight = 1.0         # Eq. 8: the structure autoencoder's MSE
learning_rate = 1e-4
d_learning_rate = 5e-5
max_iters = 100000        # the paper trains 450k iterations
eval_interval = 2000
warmup_iters = 1000
gan_start = 20000
compile = True
