"""
Small benchmarks, one function per mode, one grep-able number each:

    python bench.py --mode=degrade --batch_size=16 --device=cuda --jpeg_impl=torch
    python bench.py --mode=generator --device=cpu
    python bench.py --mode=tokenizer --configs=config/paper.py --device=cuda
    python bench.py --mode=sr --configs=config/paper.py
    python bench.py --mode=sr --device=cuda --compile=True --cuda_graphs=True
    python bench.py --mode=sr --configs="config/tiny.py config/hvar.py"
    python bench.py --mode=sr_large --side=4000

degrade mode times degradation.degrade on a batch of training crops already on the device, with
the JPEG of jpeg_impl ('torch': batched on the device; 'pil': libjpeg on the CPU, per image).
generator mode times one full stage-2 training step of the generator of `configs` on its tokenizer
(tokenizer targets, prior + LoRA, generator, losses.generator_losses, backward, AdamW; + the
discriminator step with --gen_gan=True) three ways: the data alone (data.PairSampler: crops, host
-> device, degradation), the step on a fresh batch from the sampler (what generator.py does) and
the step on one pre-made batch; the difference of the last two is what the data costs the step.
tokenizer mode times one full stage-1 training step (encode, grouped VQ, decode, L1 + LPIPS +
commitment, backward, AdamW; + discriminator and GAN terms with --tok_gan=True) on random crops
of the config's size, so it measures the model, not the data pipeline.
sr mode times inference (prior + generator + top-1 decode, chain.super_resolve) per LR size in
sr_sizes: ms per image at batch 1 and images/s at batch sr_batch, eager and, with --compile=True,
compiled (--cuda_graphs=True: CUDA graphs); an H-VAR chain (configs with config/hvar.py)
is timed at its native LR size, with and without the KV cache. The models of the chain have random
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
import metrics
from common import (autocast_ctx, count_params, flops_per_image, maybe_compile, param_groups, peak_flops, pick_device,
                    save_png)
from degradation import DegradeConfig, degrade
from model import Generator, NextScaleGenerator, TextureGenerator, Tokenizer, TokenizerConfig, resize_image
from losses import (PatchDiscriminator, discriminator_step, g_loss_hinge, generator_losses, hinge_d_loss, perceptual_fn,
                    hvar_losses, vanilla_d_loss)
from chain import METHODS, sr_function, stage2_models

# -----------------------------------------------------------------------------
mode = 'degrade'            # degrade | generator | tokenizer | sr | sr_large
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
jpeg_impl = 'torch'         # the degradation's JPEG (degrade and generator modes): torch | pil
# the chain of tokenizer, sr and generator modes: config files (a size file, optionally a method file;
# space-separated) read as tokenizer.py and generator.py read them: model sizes; tokenizer mode also
# crop and batch; generator mode also crop, batch, degradation and loss weights
configs = 'config/tiny.py'
# tokenizer mode
tok_args = ''               # more tokenizer.py settings on top, e.g. '--hierarchical=True --lpips_weight=5'
tok_gan = False             # include the discriminator step and the GAN term
dtype = 'auto'              # auto (bf16 on capable GPUs) | float32 | bfloat16
compile = False             # torch.compile: tokenizer / generator (CUDA only); sr mode adds compiled rows (on a CPU: minutes)
# sr and generator modes
gen_gan = False             # generator mode: include the GAN term and the discriminator step
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
from configurator import config_from_settings, configure, fail, script_settings
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
    cfg = DegradeConfig(mode=deg_mode, jpeg_impl=jpeg_impl)

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
    print(f"degrade: {pairs} pairs of {crop}x{crop} -> {crop // 4}x{crop // 4} ({deg_mode}, jpeg {jpeg_impl}) "
          f"on {dev}, batch {batch_size}")
    print(f"degrade_pairs_per_s: {pairs / dt:.1f}")
    print(f"degrade_ms_per_pair: {1000 * dt / pairs:.2f}")


def sync(dev):
    if dev.startswith('cuda'):
        torch.cuda.synchronize()


def counted_flops(fn):
    """FLOPs of one call of fn as torch's FlopCounterMode counts them: every matmul, convolution and
    attention of the forward and backward passes of all the models that run (LPIPS and the prior
    included); elementwise ops, norms, the code lookup and the optimizer are not counted. Run eagerly
    (compiled graphs are not seen by the counter)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def print_mfu(prefix, flops_per_iter, dt, dev):
    peak = peak_flops(dev)
    print(f"{prefix}_gflop_per_iter: {flops_per_iter / 1e9:.1f}")
    print(f"{prefix}_tflops: {flops_per_iter / dt / 1e12:.2f}")
    print(f"{prefix}_mfu: {flops_per_iter / dt / peak:.3f}" if peak else
          f"{prefix}_mfu: n/a (no datasheet peak for this device)")


def bench_tokenizer(dev):
    settings = script_settings('tokenizer.py', [*configs.split(), *tok_args.split()])
    cfg = config_from_settings(TokenizerConfig, settings)
    crop_, batch = settings['crop_size'], settings['batch_size']
    dt_name, ctx = autocast_ctx(dev, dtype)
    model = Tokenizer(cfg).to(dev)
    disc = PatchDiscriminator().to(dev)
    lpips_fn = perceptual_fn(metrics.load_lpips(dev, net=settings['perceptual']), settings['lpips_batch'])  # as tokenizer.py
    opt = torch.optim.AdamW(list(model.parameters()) + list(disc.parameters()), lr=1e-4)
    fwd = maybe_compile(model, compile, dev)
    x = torch.rand(batch, 3, crop_, crop_, device=dev)

    hier = settings['quantizer'] == 'msrq' and settings['hierarchical']
    scales = cfg.rq_scales if hier else (1.0,)
    k = min(settings['lpips_batch'] or batch, batch)  # the crops LPIPS sees (for the log line)

    def step(net=fwd):
        with ctx:
            if hier:  # Algorithm 1: one encode + decode per scale, each vs x resized
                decs, _, commit, _ = model.hierarchical(x, drop_B=torch.rand(batch, device=dev) < 0.5)
                pairs = [(d, resize_image(x, s)) for d, s in zip(decs, scales)]
            elif cfg.quantizer == 'tvq':  # texture VQ: the structure branch's two losses too, as tokenizer.py
                zq, _, commit, _, f_l = model.encode_tvq(x)
                pairs = [(model.decode(zq, f_l), x)]
                commit = commit + sum(model.structure_losses(x, f_l)[:2])
            else:
                xrec, _, commit, _ = net(x)
                pairs = [(xrec, x)]
            loss = commit + sum((d.float() - t).abs().mean() + lpips_fn(d.float(), t).mean()
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

    counted = counted_flops(lambda: step(model))  # one eager step
    for _ in range(warmup_iters):
        step()
    if dev.startswith('cuda'):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    dt = (time.perf_counter() - t0) / iters
    print(f"tokenizer: {configs} {tok_args}, {count_params(model) / 1e6:.2f}M params, {settings['quantizer']} "
          f"{'hierarchical ' if hier else ''}quantizer, batch {batch} x {crop_}x{crop_}, {dt_name}, "
          f"LPIPS on {k} crops, compile={compile and dev.startswith('cuda') and not hier}, gan={tok_gan}, on {dev}")
    print(f"tokenizer_ms_per_iter: {1000 * dt:.1f}")
    print(f"tokenizer_img_per_s: {batch / dt:.1f}")
    if dev.startswith('cuda'):
        print(f"peak_mem_mb: {torch.cuda.max_memory_allocated() / 2**20:.0f}")
    # counted: every matmul / conv / attention of the step (LPIPS included); model: the encoder and
    # decoder alone, from the formula of model.flops_per_image (a check of that formula, too)
    print_mfu('tokenizer', counted, dt, dev)
    print_mfu('tokenizer_model', sum(flops_per_image(model.model_args, round(s * crop_), round(s * crop_))
                                     for s in scales) * batch, dt, dev)


def build_chain(dev):
    """The tokenizer, generator and prior of `configs` on dev, built as generator.py
    builds them (random tokenizer and generator weights: the time does not depend on them; the
    prior has its ImageNet weights) -> (tokenizer, generator, prior or None, generator settings)."""
    tcfg = config_from_settings(TokenizerConfig, script_settings('tokenizer.py', [*configs.split(), *tok_args.split()]))
    g = script_settings('generator.py', configs.split())
    g['method'] = METHODS[tcfg.quantizer]  # as generator.py: the tokens decide
    _, prior, gcfg = stage2_models(tcfg, g)
    gen = {'hvar': NextScaleGenerator, 'tvq': TextureGenerator}.get(g['method'], Generator)(gcfg).to(dev)
    tok = Tokenizer(tcfg).to(dev)
    if gcfg.head == 'codebook':  # a frozen copy of the codes, as generator.py
        gen.codes.tie_codebook(tok.quantizer.codebook)
    return tok, gen, prior.to(dev) if prior is not None else None, g


def bench_generator(dev):
    tok, gen, prior, g = build_chain(dev)
    tok.eval().requires_grad_(False)  # frozen, as in generator.py
    crop_, batch = g['crop_size'], g['batch_size']
    sampler = data.PairSampler(image_dir, crop_, batch, seed=seed, device=dev,
                               deg_cfg=DegradeConfig(mode=g['degradation'], jpeg_impl=jpeg_impl))
    dt_name, ctx = autocast_ctx(dev, dtype)
    disc = PatchDiscriminator().to(dev).requires_grad_(False)
    lpips_fn = perceptual_fn(metrics.load_lpips(dev, net=g['perceptual']), g['lpips_batch'])  # as generator.py
    groups_ = param_groups(gen, g['weight_decay']) + (param_groups(prior, g['weight_decay']) if prior else [])
    opt = torch.optim.AdamW([p for p in groups_ if p['params']], lr=g['learning_rate'], betas=g['betas'])
    d_opt = torch.optim.AdamW(disc.parameters(), lr=g['d_learning_rate'], betas=g['d_betas'],
                              weight_decay=g['weight_decay'])
    trainable = [p for group in opt.param_groups for p in group['params']]
    fwd = maybe_compile(gen, compile, dev)

    hvar = g['method'] == 'hvar'
    weights = {k: g[k] for k in ('ce_weight', 'repa_weight', 'l1_weight', 'lpips_weight', 'gan_weight', 'struct_weight')}
    if g['lora_rank'] == 0:  # as generator.py: REPA trains nothing without LoRA
        weights['repa_weight'] = 0.0

    def step(hr, lr, net=fwd):  # generator.py's step, without logging and the schedule
        if hvar:  # the classes and a zeroed condition do not change the work
            with ctx:
                loss = hvar_losses(tok, net, hr, lr, torch.zeros(len(hr), dtype=torch.long, device=dev),
                                   **{k: g[k] for k in ('ce_weight', 'dpo', 'dpo_weight', 'dpo_beta')})[0]
            sr = None
        else:
            with torch.no_grad():                     # (B, G, h, w) targets [, texture VQ: F_L]
                _, q_hr, _, _, *f_l_hr = tok.encode_tvq(hr) if g['method'] == 'tvq' else tok.encode(hr)
            with ctx:
                loss, _, _, sr = generator_losses(tok, net, prior, hr, lr, q_hr, *f_l_hr, **weights, disc=disc,
                                                  train_prior=g['lora_rank'] > 0, lpips_fn=lpips_fn, gan_on=gen_gan)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, g['grad_clip'] if g['grad_clip'] > 0 else float('inf'))
        opt.step()
        if gen_gan and not hvar:
            discriminator_step(disc, d_opt, vanilla_d_loss, hr, sr, ctx)
        sync(dev)

    def timed(fn):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(dev)
        return (time.perf_counter() - t0) / iters

    premade = sampler.next()                          # (B, 3, crop, crop), (B, 3, crop/4, crop/4)
    counted = counted_flops(lambda: step(*premade, net=gen))   # one eager step
    for _ in range(warmup_iters):
        step(*sampler.next())
    t_data = timed(sampler.next)
    t_fresh = timed(lambda: step(*sampler.next()))
    t_premade = timed(lambda: step(*premade))
    print(f"generator: {configs}, {count_params(gen) / 1e6:.2f}M params, batch {batch} x "
          f"{crop_}x{crop_}, degradation {g['degradation']} (jpeg {jpeg_impl}), {dt_name}, "
          f"compile={compile and dev.startswith('cuda')}, gan={gen_gan}, on {dev}")
    print(f"generator_data_ms_per_batch: {1000 * t_data:.1f}")
    print(f"generator_ms_per_iter: {1000 * t_fresh:.1f}")
    print(f"generator_ms_per_iter_premade: {1000 * t_premade:.1f}")
    print(f"generator_img_per_s: {batch / t_fresh:.1f}")
    print(f"generator_img_per_s_premade: {batch / t_premade:.1f}")
    print(f"data_share_of_step: {max(0.0, 1 - t_premade / t_fresh):.2f}")
    print_mfu('generator', counted, t_fresh, dev)  # tokenizer targets, prior + LoRA, generator, LPIPS


def random_chain(dev):
    """build_chain in eval mode, frozen, the prior channels-last as chain.load_sr_chain makes it."""
    tok, gen, prior, _ = build_chain(dev)
    for m in (tok, gen):
        m.eval().requires_grad_(False)
    if prior is not None:
        prior.to(memory_format=torch.channels_last).eval().requires_grad_(False)
    cond = tok.encoder if isinstance(gen, NextScaleGenerator) else prior   # what conditions the generator
    n = sum(count_params(m) for m in (tok.decoder, gen, cond) if m is not None)
    print(f"chain: {configs}, {n / 1e6:.1f}M params used at inference (decoder "
          f"{count_params(tok.decoder) / 1e6:.2f}M + generator {count_params(gen) / 1e6:.2f}M + "
          f"{'encoder' if cond is tok.encoder else 'prior'}), random weights")
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


def sr_rows(fn, side, tag, suffix, ctx, dev):
    """Print the rows of one SR variant at one LR side: ms per image at batch 1, img/s at sr_batch
    (and the CUDA allocator's peak on a GPU)."""
    for batch, n in ((1, iters), (sr_batch, batch_iters)):
        if dev.startswith('cuda'):
            torch.cuda.reset_peak_memory_stats()
        with ctx:
            dt = time_calls(fn, torch.rand(batch, 3, side, side, device=dev), n, dev)
        b = '' if batch == 1 else f"_b{batch}"
        print(f"sr_ms_per_image_{tag}{suffix}: {1000 * dt:.1f}" if batch == 1 else
              f"sr_img_per_s{b}_{tag}{suffix}: {batch / dt:.1f}")
        if dev.startswith('cuda'):
            print(f"sr_peak_mem_mb{b}_{tag}{suffix}: {torch.cuda.max_memory_allocated() / 2**20:.0f}")


@torch.no_grad()
def bench_sr_hvar(dev, tok, gen):
    """H-VAR: one pass (x1, x2, x4) on LR images of the generator's native size, with and without
    the KV cache (without: step i reruns the masked forward over the whole prefix)."""
    dt_name, ctx = autocast_ctx(dev, dtype)
    side = gen.config.hr_size // gen.config.scale
    tag = f"{side}_to_{4 * side}"
    print(f"sr (H-VAR, x1 + x2 + x4 in one pass, top-1): {dt_name}, batch 1 and {sr_batch}, "
          f"{gen.n_cond} condition + {sum(gen.sizes[1:])} image tokens, on {dev}")
    for suffix, kv in (('_kv_cache', True), ('_no_kv_cache', False)):
        sr_rows(sr_function(tok, gen, None, dev, compile, kv_cache=kv), side, tag, suffix, ctx, dev)
    if not dev.startswith('cuda'):
        print(f"process_peak_rss_mb: {peak_rss_mb():.0f}")


@torch.no_grad()
def bench_sr(dev):
    tok, gen, prior = random_chain(dev)
    if isinstance(gen, NextScaleGenerator):
        return bench_sr_hvar(dev, tok, gen)
    dt_name, ctx = autocast_ctx(dev, dtype)
    variants = [('', sr_function(tok, gen, prior, dev))]
    if compile or cuda_graphs:  # each input shape compiles (and with CUDA graphs, captures) once, in the warm-up
        variants.append(('_compiled', sr_function(tok, gen, prior, dev, compile=True, cuda_graphs=cuda_graphs)))
    print(f"sr: {dt_name}, batch 1 and {sr_batch}, compiled rows: {bool(compile or cuda_graphs)}, "
          f"cuda_graphs: {cuda_graphs and dev.startswith('cuda')}, on {dev}")
    for side in sr_sizes:
        tag = f"{side}_to_{4 * side}"
        for suffix, fn in variants:
            sr_rows(fn, side, tag, suffix, ctx, dev)
    if not dev.startswith('cuda'):
        print(f"process_peak_rss_mb: {peak_rss_mb():.0f}")


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


@torch.no_grad()
def bench_sr_large(dev):
    """sr.py's path for one large image: load, streamed tiles, PNG (written to a temporary folder)."""
    from PIL import Image
    from chain import _starts, tile_warning, tiled_sr
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


MODES = {'degrade': bench_degrade, 'generator': bench_generator, 'tokenizer': bench_tokenizer, 'sr': bench_sr,
         'sr_large': bench_sr_large}

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
