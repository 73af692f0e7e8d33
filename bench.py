"""
Small benchmarks, one function per mode, one grep-able number each:

    python bench.py --mode=degrade --batch_size=16 --device=cuda
    python bench.py --mode=tokenizer --tok_config=config/tokenizer_paper.py --device=cuda
    python bench.py --mode=sr --tok_config=config/tokenizer_paper.py --gen_config=config/generator_paper.py

tokenizer mode times one full stage-1 training step (encode, grouped VQ, decode, L1 + LPIPS +
commitment, backward, AdamW; + discriminator and GAN terms with --tok_gan=True) on random crops
of the config's size, so it measures the model, not the data pipeline.
sr mode times inference (prior + generator + top-1 decode, model.super_resolve) of one LR image
per size in sr_sizes, for the models of tok_config + gen_config (random generator weights: the
time does not depend on them); peak memory is the CUDA allocator's peak on a GPU and the process's
peak resident set on a CPU (which includes the models and LPIPS-free start-up, so an upper bound).
"""
import os
import resource
import time

import torch
import torch.nn.functional as F

import data
import eval as ev
from common import autocast_ctx, maybe_compile, peak_flops, pick_device
from degradation import DegradeConfig, degrade
from model import (Generator, GeneratorConfig, PatchDiscriminator, Tokenizer, TokenizerConfig,
                   config_from_settings, count_params, flops_per_image, g_loss_hinge, hinge_d_loss,
                   resize_image, super_resolve)
from prior import build_sr_prior

# -----------------------------------------------------------------------------
mode = 'degrade'            # degrade | tokenizer
device = 'auto'             # auto | cpu | cuda | mps
threads = 0                 # torch CPU threads; 0 = torch's default
seed = 0
warmup_iters = 2            # untimed iterations (first-call allocation, kernel caches)
iters = 10                  # timed iterations
# degrade mode
batch_size = 8              # HR crops per degrade() call
crop = 256                  # HR crop side (LR side = crop / 4)
image_dir = 'assets/images/train'  # prepared by `python data.py`
deg_mode = 'realesrgan'     # realesrgan | bicubic
# tokenizer mode: tokenizer.py's settings with this config file applied (model sizes, crop, batch)
tok_config = 'config/tokenizer_tiny.py'
tok_gan = False             # include the discriminator step and the GAN term
dtype = 'auto'              # auto (bf16 on capable GPUs) | float32 | bfloat16
compile = False             # torch.compile the tokenizer / generator (CUDA only)
# sr mode: the chain of tok_config + gen_config (generator.py's settings with it applied)
gen_config = 'config/generator_tiny.py'
sr_sizes = (64, 128)        # LR 64 -> HR 256 and LR 128 -> HR 512
from configurator import configure, fail, script_settings
config = configure(globals())
# -----------------------------------------------------------------------------


def hr_batch(gen):
    """(batch_size, 3, crop, crop) HR crops of the training photos, or smooth random images."""
    try:
        sampler = data.PairSampler(image_dir, crop, batch_size, seed=seed, deg_cfg=DegradeConfig(mode='none'))
        return sampler.next()[0]
    except ValueError as e:
        print(f"note: {e}\nnote: timing on random smooth images instead")
        x = torch.rand(batch_size, 3, crop // 8, crop // 8, generator=gen)
        return F.interpolate(x, size=(crop, crop), mode='bicubic', align_corners=False).clamp(0, 1)


def bench_degrade(dev):
    gen = torch.Generator().manual_seed(seed)
    hr = hr_batch(gen).to(dev)
    cfg = DegradeConfig(mode=deg_mode)

    def step():
        _, lr = degrade(hr, cfg, gen)
        if dev.startswith('cuda'):
            torch.cuda.synchronize()
        return lr

    for _ in range(warmup_iters):
        step()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    dt = time.perf_counter() - t0
    pairs = iters * batch_size
    print(f"degrade: {pairs} pairs of {crop}x{crop} -> {crop // 4}x{crop // 4} ({deg_mode}) on {dev}, "
          f"batch {batch_size}")
    print(f"degrade_pairs_per_s: {pairs / dt:.1f}")
    print(f"degrade_ms_per_pair: {1000 * dt / pairs:.2f}")


def sync(dev):
    if dev.startswith('cuda'):
        torch.cuda.synchronize()


def bench_tokenizer(dev):
    settings = script_settings('tokenizer.py', [tok_config])
    cfg = config_from_settings(TokenizerConfig, settings)
    crop_, batch = settings['crop_size'], settings['batch_size']
    dt_name, ctx = autocast_ctx(dev, dtype)
    model = Tokenizer(cfg).to(dev)
    disc = PatchDiscriminator().to(dev)
    lpips_net = ev.load_lpips(dev)
    opt = torch.optim.AdamW(list(model.parameters()) + list(disc.parameters()), lr=1e-4)
    fwd = maybe_compile(model, compile, dev)
    x = torch.rand(batch, 3, crop_, crop_, device=dev)

    hier = settings['quantizer'] == 'msrq' and settings['hierarchical']
    scales = cfg.rq_scales if hier else (1.0,)

    def step():
        with ctx:
            if hier:  # Algorithm 1: one encode + decode per scale, each vs x resized
                decs, _, commit, _ = model.hierarchical(x, drop_B=torch.rand(batch, device=dev) < 0.5)
                pairs = [(d, resize_image(x, s)) for d, s in zip(decs, scales)]
            else:
                xrec, _, commit, _ = fwd(x)
                pairs = [(xrec, x)]
            loss = commit + sum((d.float() - t).abs().mean() + ev.lpips_dist(lpips_net, d.float(), t).mean()
                                for d, t in pairs)
            xrec = pairs[-1][0]
            if tok_gan:
                loss = loss + 0.8 * g_loss_hinge(disc(xrec))
                loss = loss + hinge_d_loss(disc(x), disc(xrec.detach()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev.startswith('cuda'):
            torch.cuda.synchronize()

    for _ in range(warmup_iters):
        step()
    if dev.startswith('cuda'):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    dt = (time.perf_counter() - t0) / iters
    print(f"tokenizer: {tok_config}, {count_params(model) / 1e6:.2f}M params, {settings['quantizer']} "
          f"{'hierarchical ' if hier else ''}quantizer, batch {batch} x {crop_}x{crop_}, {dt_name}, "
          f"compile={compile and dev.startswith('cuda') and not hier}, gan={tok_gan}, on {dev}")
    print(f"tokenizer_ms_per_iter: {1000 * dt:.1f}")
    print(f"tokenizer_img_per_s: {batch / dt:.1f}")
    if dev.startswith('cuda'):
        print(f"peak_mem_mb: {torch.cuda.max_memory_allocated() / 2**20:.0f}")
    peak = peak_flops(dev)
    flops = sum(flops_per_image(model.model_args, round(s * crop_), round(s * crop_)) for s in scales) * batch / dt
    print(f"tokenizer_tflops: {flops / 1e12:.2f}")  # encoder + decoder matmuls only (model.flops_per_image)
    print(f"mfu: {flops / peak:.3f}" if peak else "mfu: n/a (no datasheet peak for this device)")


@torch.no_grad()
def bench_sr(dev):
    tcfg = config_from_settings(TokenizerConfig, script_settings('tokenizer.py', [tok_config]))
    g = script_settings('generator.py', [gen_config])
    prior = None
    if g['use_prior']:
        prior = build_sr_prior(dict(name=g['prior_name'], feat_tap=g['prior_feat_tap'], lora_rank=g['lora_rank'],
                                    lora_alpha=g['lora_alpha']))
    else:  # as generator.py: no prior switches off what needs it
        g.update(use_sft=False, cls_tokens='none')
    gcfg = config_from_settings(GeneratorConfig, g, patch=tcfg.patch, scale=4, groups=tcfg.groups,
                                codebook_size=tcfg.codebook_size, feat_dim=prior.feat_dim if prior else 0,
                                pooled_dims=tuple(prior.pooled_dims) if prior else ())
    dt_name, ctx = autocast_ctx(dev, dtype)
    tok = Tokenizer(tcfg).to(dev).eval()
    gen = Generator(gcfg).to(dev).eval()
    if prior is not None:
        prior.to(dev).eval()
    if compile and dev.startswith('cuda'):
        gen, tok.decoder = torch.compile(gen), torch.compile(tok.decoder)
    n = sum(count_params(m) for m in (tok.decoder, gen, prior) if m is not None)
    print(f"tokenizer: {count_params(tok) / 1e6:.2f}M params; generator: {count_params(gen) / 1e6:.2f}M params")
    print(f"sr: {tok_config} + {gen_config}, {n / 1e6:.1f}M params used at inference (decoder + generator "
          f"+ prior), {dt_name}, compile={compile and dev.startswith('cuda')}, batch 1, on {dev}")
    for side in sr_sizes:
        lr = torch.rand(1, 3, side, side, device=dev)
        with ctx:
            for _ in range(warmup_iters):
                super_resolve(lr, tok, gen, prior)
            sync(dev)
            if dev.startswith('cuda'):
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(iters):
                super_resolve(lr, tok, gen, prior)
            sync(dev)
        dt = (time.perf_counter() - t0) / iters
        tag = f"{side}_to_{4 * side}"
        print(f"sr_ms_per_image_{tag}: {1000 * dt:.1f}")
        if dev.startswith('cuda'):
            print(f"sr_peak_mem_mb_{tag}: {torch.cuda.max_memory_allocated() / 2**20:.0f}")
    if not dev.startswith('cuda'):
        print(f"process_peak_rss_mb: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")


MODES = {'degrade': bench_degrade, 'tokenizer': bench_tokenizer, 'sr': bench_sr}

if __name__ == '__main__':
    if mode not in MODES:
        raise ValueError(f"unknown mode '{mode}'; valid modes: {', '.join(MODES)}")
    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(device)
    print(f"torch {torch.__version__}, threads: {torch.get_num_threads()}, cpus: {os.cpu_count()}, device: {dev}")
    try:
        MODES[mode](dev)
    except ValueError as e:  # ConfigError of a config file, or a model setting out of range
        fail(f"bench.py: {e}")
