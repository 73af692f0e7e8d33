# H-VAR's next-scale generator at the paper's size (H-VAR Sec. 4), on the hierarchical tokenizer of
# config/tokenizer_hrq_paper.py: 512x512 crops / patch 16 = a 32x32 grid; 1024 condition tokens +
# 3452 image tokens (steps 4,6,8,10,14,16,20,24,28,32). 16 blocks of width 1024, 16 heads: 306M
# params (the paper's VAR d16 has ~310M; its AdaLN parameters go to a wider SwiGLU here, mlp_ratio 7).
# Batch 384 = batch_size x grad_accum on one GPU (the paper: 24 A100s); lower batch_size and raise
# grad_accum if memory runs out. The paper starts from VAR d16's weights; we cannot (no offline
# checkpoint) and start from scratch.
#   python generator.py config/generator_hvar_paper.py
method = 'hvar'
out_dir = 'out/generator_hvar_paper'
tok_ckpt = 'out/tokenizer_hrq_paper/ckpt.pt'
crop_size = 512
batch_size = 16
grad_accum = 24           # 16 x 24 = 384 images per optimizer step
patch = 16
width = 1024
depth = 16
n_head = 16
mlp_ratio = 7.0
head = 'linear'           # VAR's classifier, as the paper
learning_rate = 1e-3
betas = (0.9, 0.95)
weight_decay = 0.005
warmup_iters = 1000
max_iters = 100000
eval_interval = 2000
log_interval = 10
compile = True
