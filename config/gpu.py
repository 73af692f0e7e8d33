# The GPU size: the three stages on one H100/H200 in 1.75 + 1.75 + 0.5 minutes (bash run_gpu.sh),
# outputs under out/*_gpu. 256x256 crops / patch 8 = a 32x32 token grid; batch 32. Its H100 run
# (speed, steps, reconstruction, SR scores): docs/results.md, "On a GPU".
#   python tokenizer.py config/gpu.py
#   python generator.py config/gpu.py
#   python finetune_decoder.py config/gpu.py
out_dir = f'out/{stage}_gpu'  # out/tokenizer_gpu, out/generator_gpu, out/finetune_decoder_gpu
batch_size = 32
max_iters = 1000000       # the time budget ends the run
gan_start = 1000000       # GAN off at this length
log_interval = 50
compile = False           # eager: in a 2-minute run compilation would eat the gain (bench.py measures both)

if stage == 'tokenizer':
    # 1024 tokens per image -> 32k tokens per step; a 21.6M-parameter tokenizer
    patch = 8
    codebook_size = 1024      # per group: 4 x 1024 codes of 8 dims
    enc_width = 384
    enc_depth = 6
    enc_heads = 6             # head size 64
    dec_width = 384
    dec_depth = 6
    dec_heads = 6
    learning_rate = 5e-4
    d_learning_rate = 2.5e-4
    warmup_iters = 200
    max_minutes = 1.75
    eval_interval = 500

if stage == 'generator':
    # On the tokenizer above (patch 8, G 4, K 1024): 256x256 HR crops -> 64x64 LR -> a 32x32 token
    # grid; the degradation's JPEG in torch on the GPU, so the batch never goes back to the host.
    tok_ckpt = 'out/tokenizer_gpu/ckpt.pt'
    patch = 8                 # must equal the tokenizer's
    width = 384
    depth = 8
    n_head = 6                # head size 64
    stem_dim = 64
    learning_rate = 3e-4
    d_learning_rate = 1e-4
    weight_decay = 0.01
    warmup_iters = 100
    max_minutes = 1.75
    eval_interval = 300

if stage == 'finetune_decoder':
    # On the chain above: 256x256 crops, decoder inputs sampled from the generator's top-5, the
    # paper's learning rate.
    gen_ckpt = 'out/generator_gpu/ckpt.pt'
    warmup_iters = 50
    max_minutes = 0.5
    eval_interval = 200
