# The tiny size: every stage on a 2-core CPU in minutes (bash run.sh: 9 + 10 + 4), each run ended by
# its time budget. Patch 8 instead of the paper's 16, so that a small decoder still has few pixels
# per token. HiTokSR (grouped VQ, 4 groups) needs no method file; H-VAR and TVQ&RAP add theirs:
#   python tokenizer.py config/tiny.py
#   python generator.py config/tiny.py
#   python finetune_decoder.py config/tiny.py
#   python tokenizer.py config/tiny.py config/hvar.py     # or config/tvq.py
max_iters = 100000        # the time budget ends the run
gan_start = 100000        # GAN off: minutes on a CPU are too few for the adversarial game; --gan_start=N turns it on

if stage == 'tokenizer':
    # A small ViT on 64x64 crops with patch 8 (an 8x8 grid = 64 tokens per image; batch 16 -> 1024
    # tokens per step). It encodes any size (2D RoPE), so the 256-px validation crops and stage 2's
    # 128-px crops need no change. 64-px crops, batch 16: twice the images per step in the same time
    # and fewer tokens per image, against the patch grid; random hues: colours the 26 training photos
    # lack; no edge loss (grad_weight = 0): it delays the grid's removal. L1 + 0.5 LPIPS: at this
    # length the L1 term teaches the perceptual metric as much as LPIPS does. 2 encoder + 4 decoder
    # blocks (same width and cost as 3 + 3): the decoder has more to do than the encoder, which only
    # picks codes. LPIPS on 4 of the 16 crops: VGG16 is ~85% of a step, and 2.4x the steps with the
    # subset beat every crop's LPIPS. Each was chosen against the alternative at equal time, two seeds
    # each (docs/results.md).
    crop_size = 64
    batch_size = 16
    hue_aug = 0.5             # half the crops get a random hue
    patch = 8
    codebook_size = 256       # per group: 4 x 256 = 1024 codewords in all (the G=1 ablation uses 1 x 1024)
    enc_width = 128           # encoder and decoder of the same width; the decoder has the blocks
    enc_depth = 2
    enc_heads = 4
    dec_width = 128
    dec_depth = 4
    dec_heads = 4
    dec_conv_ch = 16          # the conv head's channels at 64 px (32 at 32 px, 64 at 16 px, 128 on the 8x8 grid)
    lpips_weight = 0.5        # L1 + 0.5 LPIPS (the paper: 1 + 1)
    lpips_batch = 4           # LPIPS on 4 of the 16 crops (L1 on all 16)
    learning_rate = 1e-3
    d_learning_rate = 5e-4
    warmup_iters = 50
    max_minutes = 9.0
    eval_interval = 400
    log_interval = 20

if stage == 'generator':
    # On the tokenizer above (out/tokenizer: patch 8, G 4, K 256). 128x128 HR crops -> 32x32 LR ->
    # a 16x16 token grid (patch 8 = 2 LR pixels per token side); batch 8 -> 2048 tokens per step. The
    # prior sees LR upsampled to 128x128. The codebook head (docs/method.md#codebook-head) starts from
    # the tokens of the upsampled LR, so the untrained generator is already the LR's round trip
    # through the tokenizer and the few hundred CPU steps only have to improve on it; a linear head
    # starts from uniform logits. Random hues on half the training pairs: colours the 26 training
    # photos lack. Both were chosen against the alternative at equal time, two seeds each
    # (docs/results.md).
    crop_size = 128
    hue_aug = 0.5             # half the HR crops get a random hue before they are degraded (data.PairSampler)
    patch = 8                 # must equal the tokenizer's
    width = 192
    depth = 4
    n_head = 4                # head size 48
    stem_dim = 64
    sft_hidden = 64
    head = 'codebook'         # the paper's is 'linear'
    learning_rate = 5e-4
    d_learning_rate = 1e-4
    weight_decay = 0.01
    warmup_iters = 50
    max_minutes = 10.0
    eval_interval = 300
    log_interval = 20

if stage == 'finetune_decoder':
    # On the chain above (out/generator): 128x128 HR crops, batch 8; only the small decoder (4 blocks,
    # width 128) trains, at the paper's learning rate (compared with 2e-4 at equal time:
    # docs/results.md, stage 3), decoder inputs sampled from the generator's top-5.
    crop_size = 128
    d_learning_rate = 5e-5
    warmup_iters = 20
    max_minutes = 4.0
    eval_interval = 100
