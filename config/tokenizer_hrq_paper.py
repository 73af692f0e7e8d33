# Hierarchical multi-scale RQ tokenizer at the H-VAR paper's size: 512x512 crops / patch 16 = a 32x32
# grid, 10 steps (VAR's list), steps 1-3 -> 128 px, 1-6 -> 256 px, 1-10 -> 512 px; one codebook of
# 4096 codes x 32 dims. The paper fine-tunes a pretrained RQ-VAE for 25k steps (batch 384, AdamW
# lr 2.5e-4, weight decay 0.05, l2 + 5 LPIPS, quantization dropout 0.5). Here: first train plain RQ
#   python tokenizer.py config/tokenizer_hrq_paper.py --hierarchical=False --out_dir=out/tokenizer_rq_paper
# then fine-tune it hierarchically (this file's defaults):
#   python tokenizer.py config/tokenizer_hrq_paper.py --init_from=out/tokenizer_rq_paper/ckpt.pt
out_dir = 'out/tokenizer_hrq_paper'
quantizer = 'msrq'
rq_steps = (4, 6, 8, 10, 14, 16, 20, 24, 28, 32)
rq_scales = (0.25, 0.5, 1.0)
hierarchical = True
quant_dropout = 0.5
crop_size = 512
batch_size = 32
patch = 16
latent_dim = 32
groups = 1
codebook_size = 4096
learning_rate = 2.5e-4
weight_decay = 0.05
betas = (0.9, 0.95)
l1_weight = 0.0
l2_weight = 1.0
lpips_weight = 5.0
max_iters = 25000
eval_interval = 1000
