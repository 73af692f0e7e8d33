# Stage 1 on a 2-core CPU in ~9 minutes: a small ViT on 64x64 crops with patch 8
# (an 8x8 grid = 64 tokens per image; batch 16 -> 1024 tokens per step). It encodes any size
# (2D RoPE), so the 256-px validation crops and stage 2's 128-px crops need no change.
# Patch 8 instead of the paper's 16 so that a small decoder still has few pixels per token.
# 64-px crops, batch 16: twice the images per step in the same time and fewer tokens per image, against
# the patch grid; random hues: colours the 26 training photos lack; no edge loss (grad_weight = 0): it
# delays the grid's removal. L1 + 0.5 LPIPS: at this length the L1 term teaches the perceptual metric
# as much as LPIPS does. 2 encoder + 4 decoder blocks (same width and cost as 3 + 3): the decoder has
# more to do than the encoder, which only picks codes. Each was chosen against the alternative at
# equal time, two seeds each (docs/results.md).
out_dir = 'out/tokenizer'
crop_size = 64
batch_size = 16
hue_aug = 0.5             # half the crops get a random hue: colours the 26 training photos lack
patch = 8
latent_dim = 32
groups = 4
codebook_size = 256       # per group: 4 x 256 = 1024 codewords in all (the G=1 ablation uses 1 x 1024)
enc_width = 128           # encoder and decoder of the same width; the decoder has the blocks
enc_depth = 2
enc_heads = 4
dec_width = 128
dec_depth = 4
dec_heads = 4
lpips_weight = 0.5        # L1 + 0.5 LPIPS (the paper: 1 + 1)
learning_rate = 1e-3
d_learning_rate = 5e-4
warmup_iters = 50
max_iters = 100000        # the time budget ends the run
max_minutes = 9.0
eval_interval = 400
log_interval = 20
gan_start = 100000        # GAN off: 10 CPU minutes is far from a converged autoencoder; --gan_start=N turns it on
