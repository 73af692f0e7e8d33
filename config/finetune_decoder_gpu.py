# Stage 3 of the GPU recipe, on the chain of config/generator_gpu.py: 256x256 crops, batch 32,
# decoder inputs sampled from the generator's top-5, the paper's learning rate. Its H100 run (steps,
# SR scores): docs/results.md, "On a GPU".
out_dir = 'out/finetune_decoder_gpu'
gen_ckpt = 'out/generator_gpu/ckpt.pt'
crop_size = 256
batch_size = 32
mode = 'topk'
top_k = 5
learning_rate = 5e-5
d_learning_rate = 1e-5
warmup_iters = 50
max_iters = 1000000       # the time budget ends the run
max_minutes = 0.5
eval_interval = 200
log_interval = 50
gan_start = 1000000       # GAN off at this length
compile = False          # eager (bench.py measures compiled speed)
