# Stage 2 on a 2-core CPU in ~10 minutes, on the tokenizer of config/tokenizer_tiny.py (patch 8,
# G 4, K 256). 128x128 HR crops -> 32x32 LR -> a 16x16 token grid (patch 8 = 2 LR pixels per
# token side); batch 8 -> 2048 tokens per step. The prior sees LR upsampled to 128x128.
# The codebook head (docs/method.md#codebook-head) starts from the tokens of the upsampled LR, so the
# untrained generator is already the LR's round trip through the tokenizer and the few hundred CPU
# steps only have to improve on it; a linear head starts from uniform logits. Random hues on half
# the training pairs: colours the 26 training photos lack. Both were chosen against the alternative
# at equal time, two seeds each (docs/results.md).
out_dir = 'out/generator'
tok_ckpt = 'out/tokenizer/ckpt.pt'   # python tokenizer.py config/tokenizer_tiny.py
crop_size = 128
batch_size = 8
hue_aug = 0.5             # half the HR crops get a random hue before they are degraded (data.PairSampler)
patch = 8                 # must equal the tokenizer's
width = 192
depth = 4
n_head = 4                # head size 48
stem_dim = 64
sft_hidden = 64
lora_rank = 4
head = 'codebook'         # the paper's is 'linear'
learning_rate = 5e-4
d_learning_rate = 1e-4
weight_decay = 0.01
warmup_iters = 50
max_iters = 100000        # the time budget ends the run
max_minutes = 10.0
eval_interval = 300
log_interval = 20
gan_start = 100000        # GAN off: 10 CPU minutes are too few for the adversarial game; --gan_start=N turns it on
