# Multi-scale residual quantization (H-VAR) on a 2-core CPU: the tiny tokenizer of
# config/tokenizer_tiny.py with one shared codebook and 10 residual steps instead of 4 groups.
# 128x128 crops / patch 8 = a 16x16 grid; steps 1..4 make the 32 px image (scale 0.25), 5..7 the
# 64 px one (0.5), 8..10 the 128 px one: 1+4+9+16 | 25+36+64 | 100+169+256 = 680 tokens per image.
# Stage (a), plain multi-scale RQ (decodes only at full size):
#   python tokenizer.py config/tokenizer_hrq_tiny.py
# Stage (c), the hierarchical fine-tuning of (a) (Algorithm 1, quantization dropout, l2 + 5 LPIPS):
#   python tokenizer.py config/tokenizer_hrq_tiny.py --hierarchical=True --init_from=out/tokenizer_hrq/ckpt.pt \
#       --out_dir=out/tokenizer_hrq_ft --l1_weight=0 --l2_weight=1 --lpips_weight=5 --max_minutes=5
out_dir = 'out/tokenizer_hrq'
quantizer = 'msrq'
rq_steps = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
rq_scales = (0.25, 0.5, 1.0)
crop_size = 128
batch_size = 8
patch = 8
latent_dim = 32
groups = 1
codebook_size = 4096      # 680 tokens x 12 bits = 8160 bits per image, the grouped tiny's 1024 x 8 bits
enc_width = 128
enc_depth = 3
enc_heads = 4
dec_width = 128
dec_depth = 3
dec_heads = 4
learning_rate = 1e-3
d_learning_rate = 5e-4
warmup_iters = 50
max_iters = 100000        # the time budget ends the run
max_minutes = 10.0
eval_interval = 400
log_interval = 20
gan_start = 100000        # GAN off at this length
