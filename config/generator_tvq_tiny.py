# Texture-VQ predictor (TVQ&RAP, docs/method.md#texture-predictor) on a 2-core CPU in ~10 minutes,
# on the tokenizer of config/tokenizer_tvq_tiny.py: the sizes of config/generator_tiny.py.
# 128x128 HR crops -> 32x32 LR -> 16x16 texture logits (1024 each) and a 4x4 structure map;
# batch 8 -> 2048 texture tokens per step. No prior, as the paper's predictor (--use_prior=True
# adds HiTokSR's EfficientNet prior with SFT, CLS tokens and LoRA).
out_dir = 'out/generator_tvq'
tok_ckpt = 'out/tokenizer_tvq/ckpt.pt'   # python tokenizer.py config/tokenizer_tvq_tiny.py
method = 'tvq'
crop_size = 128
batch_size = 8
patch = 8                 # must equal the tokenizer's
width = 192
depth = 4
n_head = 4                # head size 48
stem_dim = 64
use_prior = False
struct_weight = 1.0       # Eq. 9: MSE of the structure map
ce_weight = 0.5           # Eq. 9: lambda_CE
l1_weight = 1.0           # reconstruction-aware terms through the straight-through one-hot
lpips_weight = 1.0
gan_weight = 0.75         # the paper's lambda_adv, off at this length: see gan_start
learning_rate = 5e-4
d_learning_rate = 1e-4
weight_decay = 0.01
warmup_iters = 50
max_iters = 100000        # the time budget ends the run
max_minutes = 10.0
eval_interval = 300
log_interval = 20
gan_start = 100000        # GAN off: 10 CPU minutes are too few for the adversarial game; --gan_start=N turns it on
