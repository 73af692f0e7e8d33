# Texture VQ (TVQ&RAP) on top of a size file: one texture codebook and a continuous structure map in
# the tokenizer instead of 4 groups (docs/method.md#texture-vq), and a predictor of both
# (#texture-predictor). No prior, as the paper's predictor (--use_prior=True adds HiTokSR's
# EfficientNet prior with SFT, CLS tokens and LoRA); no stage 3.
#   python tokenizer.py config/tiny.py config/tvq.py       # -> out/tokenizer_tvq
#   python generator.py config/tiny.py config/tvq.py       # -> out/generator_tvq
#   python tokenizer.py config/paper.py config/tvq.py      # -> out/tokenizer_tvq_paper
#   python generator.py config/paper.py config/tvq.py
# The size is told by the size file's crop_size: 64 (tokenizer) / 128 (generator) tiny, 512 paper.

if stage == 'tokenizer':
    out_dir = out_dir.replace('tokenizer', 'tokenizer_tvq')   # out/tokenizer_tvq, out/tokenizer_tvq_paper
    quantizer = 'tvq'
    groups = 1
    codebook_size = 1024      # the paper's texture codebook
    l1_weight = 0.0           # Eq. 7: MSE + perceptual + 0.75 adversarial + codebook + commitment
    l2_weight = 1.0
    lpips_weight = 1.0
    gan_weight = 0.75         # lambda_adv (hinge here); align_weight and down_weight (Eq. 8): the defaults
    if crop_size == 64:       # config/tiny.py: its crops are too small for a structure map at H/32
        # 128x128 crops / patch 8 = a 16x16 texture grid (256 tokens of 32 dims, the same 1024
        # codewords as the grouped tiny's 4 x 256); structure map F_L: 16 channels on a 4x4 grid (H/32),
        # aligned to the code of a small autoencoder of the crop downsampled 8x (16x16 px, patch 4 ->
        # 4x4). Batch 8 -> 2048 texture tokens per step; 3 + 3 blocks, no hue augmentation: the recipe
        # every tokenizer of ablate.py shares.
        crop_size = 128
        batch_size = 8
        enc_depth = 3
        dec_depth = 3
        hue_aug = 0.0
        lpips_batch = 0       # LPIPS on every crop: config/tiny.py's subset was measured on HiTokSR's only
        tvq_struct_dim = 16       # structure channels (paper 64)
        tvq_down_width = 64       # E_down and D_down: one small ViT each
        tvq_down_depth = 1
        tvq_down_heads = 2
    if crop_size == 512:      # config/paper.py: Sec. 4.1 and appendix B
        # 512x512 crops / patch 8 = a 64x64 texture grid of 256-dim vectors; structure map 64 channels
        # at H/32 (16x16), aligned to the code of an autoencoder of x downsampled 8x (64x64 px, patch
        # 4). Batch 16 -> 64k texture tokens per step. The paper's tokenizer is convolutional with
        # attention layers, here the project's ViTs; the paper trains 450k iterations.
        batch_size = 16
        patch = 8
        latent_dim = 256          # texture channels C_H
        tvq_down_width = 256
        tvq_down_depth = 4

if stage == 'generator':
    out_dir = out_dir.replace('generator', 'generator_tvq')     # out/generator_tvq, out/generator_tvq_paper
    tok_ckpt = tok_ckpt.replace('tokenizer', 'tokenizer_tvq')   # the tokenizer above
    use_prior = False
    ce_weight = 0.5           # Eq. 9: lambda_CE; struct_weight (Eq. 9), l1_weight, lpips_weight: the defaults
    gan_weight = 0.75         # lambda_adv of Eq. 7
    if crop_size == 128:      # config/tiny.py: 128x128 HR crops -> 32x32 LR -> 16x16 texture logits
        # (1024 each) and a 4x4 structure map; batch 8 -> 2048 texture tokens per step
        hue_aug = 0.0
        head = 'linear'           # the texture predictor keeps the linear head
        sft_hidden = 128          # with --use_prior=True: generator.py's default
    if crop_size == 512:      # config/paper.py
        # 512x512 crops / patch 8 = a 64x64 texture grid (4096 tokens, 1024 logits each) and a 16x16
        # structure map; LR 128x128, 2 LR pixels per token. Memory: the straight-through one-hot is
        # (B, 1, h, w, K) = 16 x 4096 x 1024 floats = 268 MB. The paper's predictor is 12 Swin blocks;
        # here 12 global-attention blocks.
        batch_size = 16
        patch = 8
