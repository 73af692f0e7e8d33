# H-VAR on top of a size file: a multi-scale residual quantizer (docs/method.md#multi-scale-rq: one
# shared codebook and 10 residual steps instead of 4 groups), its hierarchical fine-tuning
# (#hierarchical-tokenization) and a next-scale generator on its tokens (#next-scale-generator).
# On a 2-core CPU (row (c') of Table 1a in docs/results.md):
#   python tokenizer.py config/tiny.py config/hvar.py      # (a) plain multi-scale RQ -> out/tokenizer_hrq
#   python tokenizer.py config/tiny.py config/hvar.py --hierarchical=True --freeze_encoder=True \
#       --init_from=out/tokenizer_hrq/ckpt.pt --out_dir=out/tokenizer_hrq_ft --max_minutes=4   # (c) Algorithm 1
#   python generator.py config/tiny.py config/hvar.py      # on out/tokenizer_hrq_ft
#   python generator.py config/tiny.py config/hvar.py --dpo=False --out_dir=out/generator_hvar_nodpo
#   python generator.py config/tiny.py config/hvar.py --hvar_tokens=plain --out_dir=out/generator_hvar_plain
# At the paper's size the tokenizer's settings are the hierarchical fine-tuning of a plain RQ run:
#   python tokenizer.py config/paper.py config/hvar.py --hierarchical=False --out_dir=out/tokenizer_rq_paper
#   python tokenizer.py config/paper.py config/hvar.py --init_from=out/tokenizer_rq_paper/ckpt.pt
#   python generator.py config/paper.py config/hvar.py
# The size is told by the size file's crop_size: 64 (tokenizer) / 128 (generator) tiny, 512 paper.

if stage == 'tokenizer':
    out_dir = out_dir.replace('tokenizer', 'tokenizer_hrq')   # out/tokenizer_hrq, out/tokenizer_hrq_paper
    quantizer = 'msrq'
    groups = 1
    codebook_size = 4096      # one shared codebook
    if crop_size == 64:       # config/tiny.py: its 8x8 grid is too coarse for 10 steps
        # 128x128 crops / patch 8 = a 16x16 grid; steps 1..4 make the 32 px image (scale 0.25), 5..7
        # the 64 px one (0.5), 8..10 the 128 px one: 1+4+9+16 | 25+36+64 | 100+169+256 = 680 tokens
        # per image x 12 bits = 8160 bits, the grouped tiny's 1024 x 8 bits at this size. Batch 8,
        # 3 + 3 blocks, no hue augmentation, L1 + LPIPS 1:1: the recipe every tokenizer of ablate.py shares.
        crop_size = 128
        batch_size = 8
        enc_depth = 3
        dec_depth = 3
        hue_aug = 0.0
        lpips_weight = 1.0
        max_minutes = 10.0
    # step sides on the token grid, the last one the grid itself: 16x16 (tiny), 32x32 (gpu, paper: VAR's
    # list; steps 1-3 -> 128 px, 1-6 -> 256 px, 1-10 -> 512 px at the paper's size)
    rq_steps = {16: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 32: (4, 6, 8, 10, 14, 16, 20, 24, 28, 32)}[crop_size // patch]
    if crop_size == 512:      # config/paper.py: the H-VAR paper fine-tunes a pretrained RQ-VAE
        # for 25k steps (batch 384, AdamW lr 2.5e-4, weight decay 0.05, l2 + 5 LPIPS, quantization
        # dropout 0.5 (the default)); here on a plain RQ run of this file (see the commands above)
        hierarchical = True
        learning_rate = 2.5e-4
        weight_decay = 0.05
        betas = (0.9, 0.95)
        l1_weight = 0.0
        l2_weight = 1.0
        lpips_weight = 5.0
        max_iters = 25000
        eval_interval = 1000
        warmup_iters = 500
        gan_start = 5000
        compile = False

if stage == 'generator':
    out_dir = out_dir.replace('generator', 'generator_hvar')     # out/generator_hvar, out/generator_hvar_paper
    tok_ckpt = tok_ckpt.replace('tokenizer', 'tokenizer_hrq')   # the tokenizer above
    learning_rate = 1e-3      # the paper's
    weight_decay = 0.005
    if crop_size == 128:      # config/tiny.py
        # 128x128 HR crops (the tokenizer's native size: 16 x patch 8) <- 32x32 LR; sequence = 256
        # condition tokens + 680 image tokens (steps 1,2,3,4,5,6,8,10,13,16; x1 = steps 1-4 at 32 px,
        # x2 = 1-7 at 64 px, x4 = all at 128 px). Larger images are tiled at this size (sr.py, eval).
        # head 'codebook' (config/tiny.py's): residual regression onto the tokenizer's codes, starting
        # from the LR's own tokens (docs/method.md#next-scale-generator); 'linear' is VAR's classifier.
        tok_ckpt = 'out/tokenizer_hrq_ft/ckpt.pt'   # the hierarchical fine-tuning (c) above
        hue_aug = 0.0
        warmup_iters = 20
        max_minutes = 14.0
        eval_interval = 1000
    if crop_size == 512:      # config/paper.py: H-VAR Sec. 4
        # 512x512 crops / patch 16 = a 32x32 grid; 1024 condition tokens + 3452 image tokens (steps
        # 4,6,8,10,14,16,20,24,28,32). 16 blocks of width 1024, 16 heads: 306M params (the paper's VAR
        # d16 has ~310M; its AdaLN parameters go to a wider SwiGLU here, mlp_ratio 7); VAR's linear
        # classifier head, as the paper. Batch 384 = batch_size x grad_accum on one GPU (the paper: 24
        # A100s); lower batch_size and raise grad_accum if memory runs out. The paper starts from VAR
        # d16's weights; we cannot (no offline checkpoint) and start from scratch.
        batch_size = 16
        grad_accum = 24           # 16 x 24 = 384 images per optimizer step
        width = 1024
        depth = 16
        n_head = 16
        mlp_ratio = 7.0
    # not read by the next-scale generator (no prior, no discriminator): generator.py's defaults, so
    # that its saved config does not show the size file's HiTokSR values
    stem_dim = 128
    sft_hidden = 128
    d_learning_rate = 1e-5
    gan_start = 5000
