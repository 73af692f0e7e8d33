# Stage 1 of the GPU recipe (bash run_gpu.sh: 1.75 + 1.75 + 0.5 minutes on one H100/H200).
# 256x256 crops / patch 8 = a 32x32 grid = 1024 tokens per image; batch 32 -> 32k tokens per step.
# A 21.6M-parameter tokenizer; its H100 run (speed, steps, reconstruction): docs/results.md,
# "On a GPU".
out_dir = 'out/tokenizer_gpu'
crop_size = 256
batch_size = 32
patch = 8
latent_dim = 32
groups = 4
codebook_size = 1024      # per group: 4 x 1024 codes of 8 dims
enc_width = 384
enc_depth = 6
enc_heads = 6             # head size 64
dec_width = 384
dec_depth = 6
dec_heads = 6
dec_overlap = True
learning_rate = 5e-4
d_learning_rate = 2.5e-4
warmup_iters = 200
max_iters = 1000000       # the time budget ends the run
max_minutes = 1.75
eval_interval = 500
log_interval = 50
gan_start = 1000000       # GAN off: 4 minutes are still far from a converged autoencoder
compile = False          # eager: in a 2-minute run compilation would eat the gain (bench.py measures both)
