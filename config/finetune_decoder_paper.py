# Stage 3 at the paper's sizes (HiTokSR, docs/method.md#decoder-fine-tuning), for one GPU, on the chain of
# config/generator_paper.py: 512x512 crops, batch 64, AdamW lr 5e-5 / D 1e-5, 50k iterations,
# L1 + LPIPS + 0.5 vanilla GAN, decoder inputs sampled from the generator's top-5.
out_dir = 'out/finetune_decoder_paper'
gen_ckpt = 'out/generator_paper/ckpt.pt'
crop_size = 512
batch_size = 64
mode = 'topk'
top_k = 5
learning_rate = 5e-5
d_learning_rate = 1e-5
l1_weight = 1.0
lpips_weight = 1.0
gan_weight = 0.5
gan_start = 0
max_iters = 50000
warmup_iters = 500
eval_interval = 2000
compile = True
