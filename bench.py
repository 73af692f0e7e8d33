"""
Small benchmarks, one function per mode, one grep-able number each:

    python bench.py --mode=degrade --batch_size=16 --device=cuda
    python bench.py --mode=tokenizer --tok_config=config/tokenizer_paper.py --device=cuda
    python bench.py --mode=sr --tok_config=config/tokenizer_paper.py --gen_config=config/generator_paper.py
    python bench.py --mode=sr --device=cuda --compile=True --cuda_graphs=True
    python bench.py --mode=sr_large --side=4000

tokenizer mode times one full stage-1 training step (encode, grouped VQ, decode, L1 + LPIPS +
commitment, backward, AdamW; + discriminator and GAN terms with --tok_gan=True) on random crops
of the config's size, so it measures the model, not the data pipeline.
sr mode times inference (prior + generator + top-1 decode, model.super_resolve) per LR size in
sr_sizes: ms per image at batch 1 and images/s at batch sr_batch, eager and, with --compile=True,
compiled (--cuda_graphs=True: CUDA graphs). The models of tok_config + gen_config have random
weights (the time does not depend on them); peak memory is the CUDA allocator's peak on a GPU and
the process's peak resident set on a CPU (which includes the models and start-up, so an upper bound).
sr_large mode runs sr.py's streamed tiling (sr.tiled_sr, load and PNG write included) on one
side x side LR image, a validation photo resized, with the same random-weight chain: time and peak
memory of a large input, not image quality.
"""
import os
import resource
import tempfile
import time

import torch
import torch.nn.functional as F

import data
import eval as ev
from common import autocast_ctx, maybe_compile, peak_flops, pick_device, save_png
from degradation import DegradeConfig, degrade
from model import (Generator, GeneratorConfig, PatchDiscriminator, Tokenizer, TokenizerConfig,
                   config_from_settings, count_params, flops_per_image, g_loss_hinge, hinge_d_loss,
                   sr_function)
from prior import build_sr_prior

# -----------------------------------------------------------------------------
mode = 'degrade'            # degrade | tokenizer | sr | sr_large
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
compile = False             # torch.compile: the tokenizer (CUDA only); sr mode adds compiled rows (on a CPU: minutes)
# sr mode: the chain of tok_config + gen_config (generator.py's settings with it applied)
gen_config = 'config/generator_tiny.py'
sr_sizes = (64, 128)        # LR 64 -> HR 256 and LR 128 -> HR 512
sr_batch = 16               # images per pass of the throughput rows (batch 1 rows: latency)
batch_iters = 3             # timed iterations at sr_batch
cuda_graphs = False         # the compiled rows with CUDA graphs (compile mode 'reduce-overhead'; plain compile off CUDA)
# sr_large mode: sr.py's tiling of one side x side LR image, with the sr-mode chain
side = 4000                 # LR side in pixels (the output is 4x)
photo = 'assets/images/val/ColorfulCups.png'  # resized (bicubic) to side x side
tile = 64                   # sr.py's tile, overlap and batch_size
overlap = 16
tile_batch = 1
sr_fn = 'chain'             # chain | bicubic: the tiling's own time and memory, without the models
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

    def step():
        with ctx:
            xrec, _, commit, _ = fwd(x)
            loss = (xrec.float() - x).abs().mean() + ev.lpips_dist(lpips_net, xrec.float(), x).mean() + commit
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
    print(f"tokenizer: {tok_config}, {count_params(model) / 1e6:.2f}M params, batch {batch} x {crop_}x{crop_}, "
          f"{dt_name}, compile={compile and dev.startswith('cuda')}, gan={tok_gan}, on {dev}")
    print(f"tokenizer_ms_per_iter: {1000 * dt:.1f}")
    print(f"tokenizer_img_per_s: {batch / dt:.1f}")
    if dev.startswith('cuda'):
        print(f"peak_mem_mb: {torch.cuda.max_memory_allocated() / 2**20:.0f}")
    peak = peak_flops(dev)
    flops = flops_per_image(model.model_args, crop_, crop_) * batch / dt
    print(f"tokenizer_tflops: {flops / 1e12:.2f}")  # encoder + decoder matmuls only (model.flops_per_image)
    print(f"mfu: {flops / peak:.3f}" if peak else "mfu: n/a (no datasheet peak for this device)")


def random_chain(dev):
    """Tokenizer, generator and prior of tok_config + gen_config, random weights except the prior's
    ImageNet ones, in eval mode on dev, the prior channels-last as model.load_sr_chain makes it."""
    tcfg = config_from_settings(TokenizerConfig, script_settings('tokenizer.py', [tok_config]))
    g = script_settings('generator.py', [gen_config])
    prior = None
    if g['use_prior']:
        prior = build_sr_prior(dict(name=g['prior_name'], feat_tap=g['prior_feat_tap'], lora_rank=g['lora_rank'],
                                    lora_alpha=g['lora_alpha']))
        prior.to(dev, memory_format=torch.channels_last).eval().requires_grad_(False)
    else:  # as generator.py: no prior switches off what needs it
        g.update(use_sft=False, cls_tokens='none')
    gcfg = config_from_settings(GeneratorConfig, g, patch=tcfg.patch, scale=4, groups=tcfg.groups,
                                codebook_size=tcfg.codebook_size, feat_dim=prior.feat_dim if prior else 0,
                                pooled_dims=tuple(prior.pooled_dims) if prior else ())
    tok = Tokenizer(tcfg).to(dev).eval().requires_grad_(False)
    gen = Generator(gcfg).to(dev).eval().requires_grad_(False)
    n = sum(count_params(m) for m in (tok.decoder, gen, prior) if m is not None)
    print(f"chain: {tok_config} + {gen_config}, {n / 1e6:.1f}M params used at inference (decoder "
          f"{count_params(tok.decoder) / 1e6:.2f}M + generator {count_params(gen) / 1e6:.2f}M + prior), random weights")
    return tok, gen, prior


def time_calls(fn, x, n, dev):
    for _ in range(warmup_iters):
        fn(x)
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(n):
        fn(x)
    sync(dev)
    return (time.perf_counter() - t0) / n


@torch.no_grad()
def bench_sr(dev):
    tok, gen, prior = random_chain(dev)
    dt_name, ctx = autocast_ctx(dev, dtype)
    variants = [('', sr_function(tok, gen, prior, dev))]
    if compile or cuda_graphs:  # each input shape compiles (and with CUDA graphs, captures) once, in the warm-up
        variants.append(('_compiled', sr_function(tok, gen, prior, dev, compile=True, cuda_graphs=cuda_graphs)))
    print(f"sr: {dt_name}, batch 1 and {sr_batch}, compiled rows: {bool(compile or cuda_graphs)}, "
          f"cuda_graphs: {cuda_graphs and dev.startswith('cuda')}, on {dev}")
    for side in sr_sizes:
        tag = f"{side}_to_{4 * side}"
        for suffix, fn in variants:
            for batch, n in ((1, iters), (sr_batch, batch_iters)):
                if dev.startswith('cuda'):
                    torch.cuda.reset_peak_memory_stats()
                with ctx:
                    dt = time_calls(fn, torch.rand(batch, 3, side, side, device=dev), n, dev)
                b = '' if batch == 1 else f"_b{batch}"
                if batch == 1:
                    print(f"sr_ms_per_image_{tag}{suffix}: {1000 * dt:.1f}")
                else:
                    print(f"sr_img_per_s{b}_{tag}{suffix}: {batch / dt:.1f}")
                if dev.startswith('cuda'):
                    print(f"sr_peak_mem_mb{b}_{tag}{suffix}: {torch.cuda.max_memory_allocated() / 2**20:.0f}")
    if not dev.startswith('cuda'):
        print(f"process_peak_rss_mb: {peak_rss_mb():.0f}")


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


@torch.no_grad()
def bench_sr_large(dev):
    """sr.py's path for one large image: load, streamed tiles, PNG (written to a temporary folder)."""
    from PIL import Image
    from sr import _starts, tile_warning, tiled_sr
    if sr_fn not in ('chain', 'bicubic'):
        raise ValueError(f"sr_fn={sr_fn!r}: expected chain | bicubic")
    dt_name, ctx = autocast_ctx(dev, dtype)
    if sr_fn == 'chain':
        tok, gen, prior = random_chain(dev)
        chain = sr_function(tok, gen, prior, dev, compile, cuda_graphs)
        multiple = gen.config.patch // gen.config.scale
    else:
        chain = lambda x: F.interpolate(x, scale_factor=4, mode='bicubic', align_corners=False).clamp(0, 1)
        multiple = 2

    def fn(x):
        with ctx:
            return chain(x)
    if tile_warning(tile, overlap):
        print(tile_warning(tile, overlap))
    with tempfile.TemporaryDirectory() as tmp:
        with Image.open(photo) as im:
            im.convert('RGB').resize((side, side), Image.Resampling.BICUBIC).save(os.path.join(tmp, 'lr.png'))
        print(f"process_peak_rss_mb_before_image: {peak_rss_mb():.0f}")
        t0 = time.perf_counter()
        lr = data.load_image(os.path.join(tmp, 'lr.png'))[None].to(dev)  # as sr.py reads it
        sync(dev)
        t1 = time.perf_counter()
        sr = tiled_sr(lr, fn, 4, tile, overlap, multiple, tile_batch)[0]  # (H, W, 3) uint8
        t2 = time.perf_counter()
        save_png(sr, os.path.join(tmp, 'sr.png'))
        t3 = time.perf_counter()
        png_mb = os.path.getsize(os.path.join(tmp, 'sr.png')) / 2**20
    n_tiles = len(_starts(side + (-side) % multiple, tile, tile - overlap)) ** 2 if tile > 0 else 1
    print(f"sr_large: {side}x{side} ({photo} resized) -> {sr.shape[0]}x{sr.shape[1]}, "
          f"{n_tiles} tiles of {tile} (overlap {overlap}), {tile_batch} per pass, SR by {sr_fn}, {dt_name}, on {dev}")
    print(f"sr_large_output_mb: {sr.nbytes / 2**20:.0f}")  # the uint8 image sr.py holds
    print(f"sr_large_load_s: {t1 - t0:.1f}")
    print(f"sr_large_tiles_s: {t2 - t1:.1f}")
    print(f"sr_large_ms_per_tile: {1000 * (t2 - t1) / n_tiles:.1f}")
    print(f"sr_large_png_s: {t3 - t2:.1f} ({png_mb:.0f} MB file)")
    if dev.startswith('cuda'):
        print(f"cuda_peak_mem_mb: {torch.cuda.max_memory_allocated() / 2**20:.0f}")
    print(f"process_peak_rss_mb: {peak_rss_mb():.0f}")


MODES = {'degrade': bench_degrade, 'tokenizer': bench_tokenizer, 'sr': bench_sr, 'sr_large': bench_sr_large}

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
