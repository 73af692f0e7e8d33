# H-VAR on top of a size file: a multi-scale residual quantizer (docs/method.md#multi-scale-rq: one
# shared codebook and residual steps instead of 4 groups), its hierarchical fine-tuning
# (#hierarchical-tokenization) and a next-scale generator on its tokens (#next-scale-generator).
# On a 2-core CPU (bash run.sh hvar runs these four, then the x1 / x2 / x4 table and sr.py):
#   python tokenizer.py config/tiny.py config/hvar.py      # (a) plain multi-scale RQ -> out/tokenizer_hrq
#   python tokenizer.py config/tiny.py config/hvar.py --hierarchical=True --freeze_encoder=True \
#       --init_from=out/tokenizer_hrq/ckpt.pt --out_dir=out/tokenizer_hrq_ft --max_minutes=4   # (c) Algorithm 1
#   python generator.py config/tiny.py config/hvar.py      # on out/tokenizer_hrq_ft
#   python generator.py config/tiny.py config/hvar.py --dpo=True --out_dir=out/generator_hvar_dpo   # + the paper's DPO
#   python generator.py config/tiny.py config/hvar.py --hvar_tokens=plain --out_dir=out/generator_hvar_plain
# At the paper's size the tokenizer's settings are the hierarchical fine-tuning of a plain RQ run:
#   python tokenizer.py config/paper.py config/hvar.py --hierarchical=False --freeze_encoder=False \
#       --out_dir=out/tokenizer_rq_paper
#   python tokenizer.py config/paper.py config/hvar.py --init_from=out/tokenizer_rq_paper/ckpt.pt
#   python generator.py config/paper.py config/hvar.py
# The size is told by the size file's crop_size: 64 (tokenizer) / 128 (generator) tiny, 512 paper.

if stage == 'tokenizer':
    out_dir = out_dir.replace('tokenizer', 'tokenizer_hrq')   # out/tokenizer_hrq, out/tokenizer_hrq_paper
    quantizer = 'msrq'
    groups = 1
    codebook_size = 4096      # one shared codebook
    # step sides on the token grid, the last one the grid itself: 8x8 (tiny), 32x32 (paper: VAR's list;
    # steps 1-3 -> 128 px, 1-6 -> 256 px, 1-10 -> 512 px at the paper's size)
    rq_steps = {8: (1, 2, 3, 4, 6, 8), 32: (4, 6, 8, 10, 14, 16, 20, 24, 28, 32)}[crop_size // patch]
    if crop_size == 64:       # config/tiny.py: its 64x64 crops / patch 8 = an 8x8 grid
        # steps 1-2 make the 16 px image (scale 0.25), 3-4 the 32 px one (0.5), 5-6 the 64 px one:
        # 1+4 | 9+16 | 36+64 = 130 tokens per image x 12 bits = 1560 bits (the grouped tiny's: 64 x 4 x 8
        # = 2048). The rest is config/tiny.py's tokenizer (batch 16, 2 + 4 blocks, random hues, L1 + 0.5
        # LPIPS). The training LPIPS (VGG16) takes the 16 px decode of the fine-tuning.
        max_minutes = 7.0     # bash run.sh hvar: 7 + 4 (the fine-tuning) + 10 (the generator) minutes
        lpips_batch = 0       # LPIPS on every crop: with config/tiny.py's 4 of 16 in both stages (2x the steps) the
                              # decodes were a little better, the generator's x4 no better (docs/results.md)
    if crop_size == 512:      # config/paper.py: the H-VAR paper fine-tunes a pretrained RQ-VAE
        # for 25k steps (batch 384, AdamW lr 2.5e-4, weight decay 0.05, l2 + 5 LPIPS, quantization
        # dropout 0.5 (the default)); here on a plain RQ run of this file (see the commands above).
        # Encoder frozen: the paper fine-tunes only the vocabulary and the decoder, so that Algorithm 1
        # tokenizes the same features the plain RQ was trained on.
        hierarchical = True
        freeze_encoder = True
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
    l1_weight = 0.0           # no pixel terms (the paper's losses: CE + DPO); --l1_weight / --lpips_weight add
    lpips_weight = 0.0        # HiTokSR's on the decode of the predicted tokens (docs/method.md#pixel-terms-for-h-var)
    if crop_size == 128:      # config/tiny.py
        # 64x64 HR crops (the tokenizer's native size: 8 x patch 8) <- 16x16 LR; sequence = 64 condition
        # tokens + 130 image tokens (steps 1,2,3,4,6,8; x1 = steps 1-2 at 16 px, x2 = 1-4 at 32 px, x4 =
        # all at 64 px). Larger images are tiled at this size (sr.py, eval). head 'codebook' (config/tiny.py's):
        # residual regression onto the tokenizer's codes, starting from the LR's own tokens
        # (docs/method.md#codebook-head); 'linear' is VAR's classifier. Width 96, 4 blocks, batch 8 (0.45M
        # parameters): small enough for 1500 or more steps, each with DPO's second sequence, in the
        # 10-minute budget on 2 cores.
        # The code regression alone (reg_weight; docs/method.md#codebook-head): top-1 is the code nearest
        # to the regressed residual. At this size CE alone, CE + either DPO form and CE + the regression
        # end worse than or level with the untrained start; the regression alone ends below it at two
        # seeds (docs/results.md, 2026-12-07, Table 1b). --ce_weight=1 adds CE back, --dpo=True the DPO.
        ce_weight = 0.0
        dpo = False
        reg_weight = 1.0
        tok_ckpt = 'out/tokenizer_hrq_ft/ckpt.pt'   # the hierarchical fine-tuning (c) above
        crop_size = 64
        width = 96
        depth = 4
        n_head = 3                # head size 32
        hue_aug = 0.0
        warmup_iters = 20
        max_minutes = 10.0
        eval_interval = 1000      # each evaluation of the 11 validation pairs costs about 10-20 s of the budget
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
