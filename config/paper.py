# The papers' sizes, for one GPU (HiTokSR: docs/method.md#grouped-vq, #generator,
# #decoder-fine-tuning): 512x512 crops / patch 16 (the scripts' default) = a 32x32 grid = 1024
# tokens per image; ViTs of width 768, 12 blocks, 12 heads (the defaults). Outputs under out/*_paper.
#   python tokenizer.py config/paper.py
#   python generator.py config/paper.py
#   python finetune_decoder.py config/paper.py
#   torchrun --standalone --nproc_per_node=8 tokenizer.py config/paper.py   # 8 GPUs (DDP)
out_dir = f'out/{stage}_paper'  # out/tokenizer_paper, out/generator_paper, out/finetune_decoder_paper
crop_size = 512
eval_interval = 2000
compile = True

if stage == 'tokenizer':
    # 4 x 4096 codes of 8 dims; L1 + LPIPS + 0.8 hinge GAN (the defaults); batch 32 -> 32k tokens per step
    batch_size = 32
    max_iters = 100000
    warmup_iters = 1000
    gan_start = 20000

if stage == 'generator':
    # On the tokenizer above; LR 128x128, 4 LR pixels per token side; batch 64 -> 64k tokens per step.
    # CE + REPA + L1 + LPIPS + 0.5 vanilla GAN, lr 5e-5 / D 1e-5 (the defaults).
    # Memory: the straight-through one-hot is (B, G, h, w, K) = 64 x 4 x 1024 x 4096 floats = 4.3 GB,
    # plus its gradient and the softmax; lower batch_size if the GPU runs out.
    tok_ckpt = 'out/tokenizer_paper/ckpt.pt'
    batch_size = 64
    max_iters = 100000
    warmup_iters = 1000
    gan_start = 20000

if stage == 'finetune_decoder':
    # On the chain above: batch 64, AdamW lr 5e-5 / D 1e-5, 50k iterations, L1 + LPIPS + 0.5 vanilla
    # GAN, decoder inputs sampled from the generator's top-5 (the defaults).
    gen_ckpt = 'out/generator_paper/ckpt.pt'
    batch_size = 64
