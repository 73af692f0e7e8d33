"""
Stage 1: train the coarse-to-fine grouped-VQ tokenizer (HiTokSR; docs/method.md#grouped-vq).

    python tokenizer.py config/tiny.py                           # 2-core CPU, ~9 minutes
    python tokenizer.py config/tiny.py config/tvq.py             # texture VQ (TVQ&RAP), 2-core CPU
    python tokenizer.py config/paper.py                          # paper sizes, one GPU
    python tokenizer.py config/tiny.py --init_from=resume        # continue exactly
    torchrun --standalone --nproc_per_node=8 tokenizer.py config/paper.py   # 8 GPUs (DDP)

Each step encodes an HR crop, quantizes every group against its own codebook, keeps a random
prefix of k of the G groups (group masking), decodes, and compares the result with the Haar
low-pass of the crop at level G-k (frequency-matched target), so the first groups learn the
coarse image and later groups add detail. Loss (docs/method.md#tokenizer-loss):
L1 + LPIPS + hinge GAN + commitment.
Ablations of the paper's Table 3 / Table 7 are one flag away:
    --groups=1 --codebook_size=1024      vanilla VQ with the same total codewords (4 x 256)
    --group_masking=False                no masking (always all groups)
    --dwt_targets=False                  masked decodes still compared with the full image
"""
import copy
import math
import os
import time
from dataclasses import asdict

import torch

import data
import metrics
from common import (Logger, Ranks, Timer, TrainStep, autocast_ctx, check_before_save, checkpoint_to_resume,
                    claim_out_dir, count_params, ddp_cleanup, ddp_setup, ddp_wrap, learning_rate_at,
                    load_checkpoint, load_state, maybe_compile, mean_items, no_sync, param_groups,
                    rank0_number, rank_states, save_curves, save_grid, save_state, set_learning_rate,
                    setting_problems, stop_if_diverged, summary, time_left, write_json)
from configurator import config_from_settings, configure, fail
from degradation import DegradeConfig
from model import Tokenizer, TokenizerConfig, resize_image
from losses import (PatchDiscriminator, adaptive_gan_weight, discriminator_step, frequency_targets,
                    g_loss_hinge, gradient_l1, hinge_d_loss, perceptual_fn, sample_active_groups, step_usage,
                    usage_stats)
from chain import scale_decodes  # an RQ tokenizer's decodes at every scale
from wavelets import lowpass  # prefix-decode targets at eval

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out/tokenizer'
init_from = 'scratch'     # 'scratch' | 'resume' (from out_dir/ckpt.pt: weights, optimizers, RNG, data)
                          # | PATH of a tokenizer ckpt.pt to fine-tune (its weights; optimizer and step anew)
overwrite = False         # True: a scratch run may replace an earlier run's out_dir/ckpt.pt (else refused)
eval_interval = 250       # steps between evaluations (metrics, PNG grid, checkpoint)
log_interval = 10         # steps between log lines
max_iters = 2000          # total optimizer steps
max_minutes = 0.0         # wall-clock budget in minutes (0 = none); the LR decay then follows time
decay_iters = 0           # length of the cosine decay in steps (0 = max_iters)
# data
train_dir = 'assets/images/train'   # any folder of images (data.py prepares the default one)
val_dir = 'assets/val_pairs'        # HR crops of the fixed validation pairs
crop_size = 256           # HR training crop side, a multiple of patch
batch_size = 8            # per process (DDP: each of the N ranks draws its own batch)
grad_accum = 1            # micro-batches per optimizer step (images per step = batch_size * grad_accum * N)
hue_aug = 0.0             # P(a training crop gets a random hue), data.PairSampler (docs/results.md "Image quality")
# model: the fields of model.TokenizerConfig, paper sizes (docs/method.md#grouped-vq)
patch = 16                # HR pixels per token side
latent_dim = 32           # C
groups = 4                # G codebooks of latent_dim/groups channels each
codebook_size = 4096      # K codes per group
enc_width = 768           # ViT encoder: width, blocks, heads
enc_depth = 12
enc_heads = 12
dec_width = 768           # ViT decoder: width, blocks, heads
dec_depth = 12
dec_heads = 12
dec_head = 'conv'         # x2 resize + conv steps from the token grid to pixels (docs/method.md#conv-decoder-head)
dec_conv_ch = 64          # head 'conv': channels at full resolution, doubled per coarser level up to dec_width
dec_conv_blocks = 1       # head 'conv': residual blocks (two 3x3 convs each) per level
dec_conv_up = 'bilinear'  # head 'conv': the x2 resizes and the colour path, bilinear | 'nearest' (VQGAN, LlamaGen;
                          # the colours bicubic): nearest leaves a period-p pattern (docs/method.md#conv-decoder-head)
dec_overlap = False       # head 'linear': each token paints a 2p x 2p patch, tent-blended with its neighbours
mlp_ratio = 4.0           # SwiGLU hidden = 2/3 * mlp_ratio * width
rope_base = 10000.0       # 2D RoPE frequency base
beta = 0.25               # commitment weight inside L_commit (docs/method.md#grouped-vq)
vq_data_init = True       # codebook remedy 1: initialise codes from encoder outputs of batch 1
vq_restart_dead = True    # codebook remedy 2: re-seed codes unused for a while from the batch
vq_restart_every = 100    # training calls (micro-batches) per dead-code window
vq_dead_threshold = 1.0   # a code chosen fewer times than this in a window is dead
# coarse-to-fine training (the paper's Table 3 ablations)
group_masking = True      # keep a random prefix of k groups
p_full = 0.9              # P(k = G); otherwise k ~ U{1..G-1}
dwt_targets = True        # target for k groups = Haar lowpass(x, G-k); False: always x
# multi-scale residual quantization (H-VAR; docs/method.md#multi-scale-rq); group masking and DWT
# targets above apply to the grouped quantizer only
quantizer = 'grouped'     # 'grouped' (HiTokSR: G codebooks) | 'msrq' (one codebook, L residual steps)
rq_steps = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # step sides on the training grid; last = crop_size / patch
rq_scales = (0.25, 0.5, 1.0)  # target scales of the hierarchical tokenization (Algorithm 1)
rq_phi = 4                # shared 3x3 convs of phi, VAR's default (0: phi is the identity)
rq_phi_ratio = 0.5        # r in phi(h) = (1 - r) h + r conv3x3(h)
hierarchical = False      # msrq: train on Algorithm 1's tokens, one decode per scale vs the resized image
quant_dropout = 0.5       # hierarchical: P(a sample's decoder gets the unquantized encoder features)
freeze_encoder = False    # train codebook, phi and decoder only (fine-tuning from init_from=PATH)
# texture VQ (TVQ&RAP; docs/method.md#texture-vq): quantizer='tvq' with groups=1; latent_dim is then
# the texture map's channels (paper 256) and codebook_size the texture codebook (paper 1024)
tvq_struct_dim = 64       # C_L, channels of the continuous structure map F_L (paper 64)
tvq_struct_pool = 4       # F_L cell = 4 x 4 tokens: H/32 with patch 8 (paper)
tvq_down = 8              # the structure autoencoder sees x downsampled 8x (paper)
tvq_down_width = 128      # its two small ViTs (E_down, D_down): width, blocks, heads
tvq_down_depth = 2
tvq_down_heads = 4
align_weight = 1.0        # mean (F_L - sg[F_down])^2 (the paper gives no weight)
down_weight = 1.0         # mean (D_down(F_down) - x_down)^2, the structure autoencoder's own loss (Eq. 8)
# loss weights (the paper's 1, 1, 0.8, 1)
l1_weight = 1.0
l2_weight = 0.0           # H-VAR's hierarchical fine-tuning: l2 1, LPIPS 5, l1 0
lpips_weight = 1.0
perceptual = 'vgg'        # LPIPS network of the loss: 'vgg' (VGG16) | 'alex' (the evaluation metric's own: it then
                          # measures what was optimised; docs/method.md#metrics)
lpips_batch = 0           # > 0: LPIPS on the first N crops of each micro-batch only (the crops are random, so a
                          # random subset; L1 keeps all): VGG16 is ~85% of a tiny CPU step (bench.py)
grad_weight = 0.0         # edge loss: L1 of the neighbour differences (losses.gradient_l1; docs/results.md "Image quality")
gan_weight = 0.8          # hinge GAN weight
adaptive_gan = False      # VQGAN's adaptive GAN weight (gradient-norm ratio at the decoder's last layer)
commit_weight = 1.0
gan_start = 5000          # step at which the discriminator and the GAN term switch on
# optimizers (AdamW as in the paper; betas as in VQGAN)
learning_rate = 1e-4      # autoencoder (peak of the schedule)
d_learning_rate = 5e-5    # discriminator, follows the same schedule
betas = (0.5, 0.9)
weight_decay = 1e-4
grad_clip = 1.0
collapse_db = 5.0         # a checkpoint is never replaced by one whose PSNR-Y is lower by more than this (0 = off)
ema_decay = 0.0           # > 0: keep an exponential moving average of the weights (e.g. 0.99); it is
                          # what evaluation, the PNGs and the next stages use
warmup_iters = 500
learning_rate_floor = 0.1  # the cosine decay ends at this fraction of the peak
# system
device = 'auto'           # auto | cpu | cuda | mps
dtype = 'auto'            # auto (bf16 on GPUs that support it, fp32 on CPU) | float32 | bfloat16
compile = False           # torch.compile (used on CUDA only)
seed = 1337
threads = 0               # torch CPU threads (0 = torch's default)
config = configure(globals())
# -----------------------------------------------------------------------------


def check_config():
    problems = setting_problems(config)
    if not 0.0 <= p_full <= 1.0:
        problems.append(f"p_full={p_full} must be in [0, 1]")
    if init_from not in ('scratch', 'resume') and not os.path.isfile(init_from):
        problems.append(f"init_from={init_from!r} must be 'scratch', 'resume' or an existing tokenizer ckpt.pt")
    if quantizer == 'msrq' and rq_steps and rq_steps[-1] != crop_size // patch:
        problems.append(f"rq_steps={tuple(rq_steps)}: the last side must be the grid side crop_size/patch = "
                        f"{crop_size // patch}")
    if hierarchical and quantizer != 'msrq':
        problems.append("hierarchical=True needs quantizer='msrq'")
    if hierarchical and any((s * crop_size) % patch for s in rq_scales):
        problems.append(f"crop_size={crop_size} at every scale in rq_scales={tuple(rq_scales)} must be a "
                        f"multiple of patch={patch}")
    min_px = 32 if perceptual == 'alex' else 16  # the smallest input of the LPIPS network (AlexNet, VGG16)
    if hierarchical and lpips_weight > 0 and min(rq_scales) * crop_size < min_px:
        problems.append(f"crop_size={crop_size} x the smallest scale {min(rq_scales)} is below {min_px} px, "
                        f"too small for LPIPS (perceptual={perceptual!r}): use larger crops or lpips_weight=0")
    if quantizer == 'tvq' and crop_size % (patch * tvq_struct_pool):
        problems.append(f"crop_size={crop_size} must be a multiple of patch x tvq_struct_pool = "
                        f"{patch * tvq_struct_pool} (the structure map's cell)")
    if not 0.0 <= quant_dropout <= 1.0:
        problems.append(f"quant_dropout={quant_dropout} must be in [0, 1]")
    if problems:
        fail('tokenizer.py: ' + '; '.join(problems))


check_config()
try:  # validates G | C, K >= 2, head sizes ... before any data is loaded
    tcfg = config_from_settings(TokenizerConfig, config)
except ValueError as e:
    fail(f"tokenizer.py: {e}")
model_args = asdict(tcfg)
rank, local_rank, world, device = ddp_setup(device)  # (0, 0, 1, device) without torchrun
master = rank == 0  # evaluates and writes every file; the other ranks only train
notes = claim_out_dir(out_dir, init_from, overwrite) if master else []  # lock, no silent replacement
seed_r = seed + 1000 * rank  # this rank's data and mask streams (rank 0: those of a single run)
if threads:
    torch.set_num_threads(threads)
dtype, ctx = autocast_ctx(device, dtype)
torch.manual_seed(seed)
ckpt_path, ckpt = checkpoint_to_resume(out_dir, init_from, 'tokenizer', model_args=model_args)
msrq, tvq = quantizer == 'msrq', quantizer == 'tvq'
if init_from not in ('scratch', 'resume'):  # fine-tuning: the weights of another run, same model
    try:
        init = load_checkpoint(init_from, '--init_from', kind='tokenizer')
    except ValueError as e:
        fail(f"tokenizer.py: {e}")
    if init['model_args'] != model_args:
        diff = {k: (init['model_args'].get(k), v) for k, v in model_args.items() if init['model_args'].get(k) != v}
        fail(f"tokenizer.py: --init_from={init_from} has other model settings (saved, now): {diff}")
log = Logger(out_dir, config, notes) if master else (lambda msg: None)

# data: HR crops only (the tokenizer never sees LR images)
try:
    sampler = data.PairSampler(train_dir, crop_size, batch_size, seed=seed_r, device=device,
                               deg_cfg=DegradeConfig(mode='none'), hue_prob=hue_aug)
    val = data.load_val_pairs(val_dir)
except ValueError as e:  # a missing or incomplete folder
    fail(f"tokenizer.py: {e}")
val_hr = val['hr']                                              # (N, 3, 256, 256) in [0, 1]
cell = patch * tvq_struct_pool if tvq else patch
if val_hr.shape[-1] % cell or val_hr.shape[-2] % cell:
    fail(f"validation crops {tuple(val_hr.shape[-2:])} are not a multiple of {cell} (patch{' x tvq_struct_pool' * tvq})")
mask_gen = torch.Generator().manual_seed(seed_r + 1)  # group-masking / quantization-dropout draws

# model, discriminator (frozen between its own steps), LPIPS (frozen, real ImageNet AlexNet)
model = Tokenizer(tcfg).to(device)
if world > 1:
    model.quantizer.ranks = Ranks()  # code hits, replacement pools and draws shared by all ranks
if init_from not in ('scratch', 'resume'):
    model.load_state_dict(init.get('ema') or init['model'])
    init = None
model.encoder.requires_grad_(not freeze_encoder)
disc = PatchDiscriminator().to(device).requires_grad_(False)
lpips_net = metrics.load_lpips(device)            # the metric (evaluation only)
lpips_fn = perceptual_fn(metrics.load_lpips(device, net=perceptual), lpips_batch)  # the perceptual loss
optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=learning_rate, betas=betas)
d_optimizer = torch.optim.AdamW(disc.parameters(), lr=d_learning_rate, betas=betas, weight_decay=weight_decay)
ema = copy.deepcopy(model).requires_grad_(False) if ema_decay > 0 else None
train_step = ddp_wrap(TrainStep(model))  # DDP: the training forward; gradients averaged in backward
train_disc = ddp_wrap(disc.requires_grad_(True))  # the discriminator's, in discriminator_step
disc.requires_grad_(False)
if rank > 0:
    torch.manual_seed(seed_r)  # its own global-RNG draws (the quantizer's restarts use rank 0's)
# everything an exact resume needs, declared once: saved by save_state, restored by load_state
state = dict(model=model, disc=disc, optimizer=optimizer, d_optimizer=d_optimizer, sampler=sampler,
             mask_gen=mask_gen, **({'ema': ema} if ema is not None else {}))
step, elapsed_before = load_state(ckpt, state) if ckpt is not None else (0, 0.0)
history = (ckpt or {}).get('history', dict(train=[], eval=[]))  # what curves.png shows, kept on resume
saved_scores = (ckpt or {}).get('metrics')  # the evaluation of the checkpoint a save replaces
log(f"resumed from {ckpt_path} at step {step}" if ckpt is not None else f"training from scratch into {out_dir}")
ckpt = None  # free the loaded tensors
train_model = maybe_compile(model, compile, device)
codes = (f"multi-scale RQ: {codebook_size} codes x {latent_dim} dims, steps {tuple(rq_steps)}, "
         f"{'hierarchical over scales ' + str(tuple(rq_scales)) if hierarchical else 'plain'}" if msrq else
         f"texture VQ: {codebook_size} codes x {latent_dim} dims at H/{patch}, structure map {tvq_struct_dim} "
         f"channels at H/{patch * tvq_struct_pool} aligned to an autoencoder of x/{tvq_down}" if tvq else
         f"{groups} groups x {codebook_size} codes x {latent_dim // groups} dims")
log(f"tokenizer: {count_params(model) / 1e6:.2f}M params ({count_params(model, True) / 1e6:.2f}M trained), "
    f"{codes}, grid {crop_size // patch}x{crop_size // patch}, device {device}, {dtype}"
    + (f", DDP over {world} processes" if world > 1 else '')
    + (f", fine-tuning {init_from}" if init_from not in ('scratch', 'resume') else ''))


@torch.no_grad()
def evaluate_msrq(net, tag):
    """Multi-scale RQ: decode the validation HR crops at every target scale from the tokens this
    run trains on (Algorithm 1's if hierarchical, else the plain full-size tokens)."""
    scales, idx = scale_decodes(net, val_hr, 'hierarchical' if hierarchical else 'plain', device, ctx)
    out, rows, labels = {}, [], []
    for s, dec, target in scales:
        m = metrics.evaluate(dec, target, crop_border=max(1, round(4 * s)), lpips_net=lpips_net, patch=patch)
        key = 'r_' if s == 1 else f'x{s:g}_'  # full size: the same r_* keys as the grouped tokenizer
        out.update({key + 'psnr_y': m['psnr_y'], key + 'ssim_y': m['ssim_y'], key + 'lpips': m['lpips']})
        rows += [target[:6], dec[:6]]
        labels += [f'HR resized to {s:g}x', f'decode of the steps of scales <= {s:g}']
    out.update(r_grid=m['grid'], r_periodic=m['periodic'], r_color_err=m['color_err'])
    stats = step_usage(idx, codebook_size)                     # per step, then all steps: (L + 1,)
    use, ppl = stats['util'], stats['perplexity']
    out.update(code_usage_min=float(use[:-1].min()), code_usage_mean=float(use[-1]),
               perplexity_min=float(ppl[:-1].min()))
    save_grid(rows, os.path.join(out_dir, f'samples_{tag}.png'), labels)
    return out, use, ppl


@torch.no_grad()
def evaluate(tag):
    """Reconstruct the validation HR crops with all groups and with every prefix k < G."""
    net = ema if ema is not None else model
    net.eval()
    if msrq:
        out = evaluate_msrq(net, tag)
        net.train(net is model)
        return out
    recs, idxs, struct = [], [], []
    for i in range(0, len(val_hr), 4):
        x = val_hr[i:i + 4].to(device)
        with ctx:
            xrec, idx, _, _ = net(x)
            if tvq:  # the structure branch: alignment of F_L, the small autoencoder's reconstruction
                align, down, _ = net.structure_losses(x, net.encode_tvq(x)[4])
                struct.append(torch.stack([align, down]).float().cpu() * len(x))
        recs.append(xrec.float().clamp(0, 1).cpu())
        idxs.append(idx.cpu())
    rec, idx = torch.cat(recs), torch.cat(idxs)                # (N,3,H,W), (N,G,h,w)
    m = metrics.evaluate(rec, val_hr, crop_border=4, lpips_net=lpips_net, patch=patch)
    stats = usage_stats(idx, codebook_size)
    use, ppl = stats['util'], stats['perplexity']              # (G,), (G,)
    out = dict(r_psnr_y=m['psnr_y'], r_ssim_y=m['ssim_y'], r_lpips=m['lpips'], r_grid=m['grid'],
               r_lpips_vgg=m['lpips_vgg'], r_periodic=m['periodic'], r_color_err=m['color_err'],
               code_usage_min=float(use.min()), code_usage_mean=float(use.mean()),
               perplexity_min=float(ppl.min()))
    if tvq:
        align, down = (sum(struct) / len(val_hr)).tolist()
        out.update(val_align=align, down_psnr=-10 * math.log10(max(down, 1e-10)))
    rows, labels = [val_hr[:6], rec[:6]], ['HR', 'reconstruction (all groups)']
    for k in range(1, groups):  # prefix decodes vs their Haar low-pass targets (Table 3)
        dec = torch.cat([net.decode_indices(idx[i:i + 4].to(device), k).float().clamp(0, 1).cpu()
                         for i in range(0, len(idx), 4)])
        target = lowpass(val_hr, groups - k)
        out[f'prefix_psnr_k{k}'] = float(metrics.psnr(dec, target, crop_border=4).mean())
        rows += [dec[:6], target[:6]]
        labels += [f'decode with k={k} groups', f'target lowpass(x, {groups - k})']
    save_grid(rows, os.path.join(out_dir, f'samples_{tag}.png'), labels)
    net.train(net is model)  # the EMA copy stays in eval mode: no dead-code restarts of its own
    return out, use, ppl


def reconstructions(x):
    """The quantizer's training decodes: -> [(decode, target)], commit loss, structure-branch losses.
    grouped: one decode with a random prefix of k groups vs its frequency-matched target;
    msrq: the full-size decode vs x, or with hierarchical one decode per scale vs x resized;
    tvq: D(F_H^vq, F_L) vs x, and the alignment and x_down losses of the structure branch."""
    zero = torch.zeros((), device=x.device)
    if msrq and hierarchical:
        drop = torch.rand(x.shape[0], generator=mask_gen).to(x.device) < quant_dropout
        decs, _, commit, _ = model.hierarchical(x, drop_B=drop)
        return [(d, resize_image(x, s)) for d, s in zip(decs, rq_scales)], commit, (zero, zero)
    if msrq:
        xrec, _, commit, _ = train_model(x)
        return [(xrec, x)], commit, (zero, zero)
    if tvq:  # the structure autoencoder trains jointly; the alignment does not move it (sg[F_down])
        zq, _, commit, _, f_l = model.encode_tvq(x)
        align, down, _ = model.structure_losses(x, f_l)
        return [(model.decode(zq, f_l), x)], commit, (align, down)
    k = sample_active_groups(x.shape[0], groups, p_full if group_masking else 1.0, generator=mask_gen).to(x.device)
    xrec, _, commit, _ = train_model(x, k)  # all groups quantized, groups > k zeroed before decoding
    return [(xrec, frequency_targets(x, k, groups) if dwt_targets else x)], commit, (zero, zero)


timer, start_step = Timer(), step  # this run's pace (a resumed run counts from its resume)
minutes = lambda: elapsed_before + timer.minutes()
decay_steps = decay_iters or max_iters
scores, t_log, imgs_since_log = {}, time.time(), 0
while True:
    # under DDP rank 0's clock decides, so that all ranks stop together and share the learning rate
    out_of_time = max_minutes > 0 and rank0_number(minutes()) >= max_minutes
    done = step >= max_iters or out_of_time
    if step % eval_interval == 0 or done:
        if master:  # the other ranks wait in rank_states
            scores, use, ppl = evaluate(f'{step:06d}')
            log(f"eval step {step}: " + ' '.join(f"{k} {v:.4f}" for k, v in scores.items())
                + f" | usage per {'step, all steps' if msrq else 'group'} "
                + ' '.join(f"{u:.2f}" for u in use.tolist())
                + ' | ppl ' + ' '.join(f"{p:.0f}" for p in ppl.tolist()))
            history['eval'].append(dict(step=step, **scores))
            save_curves(history, os.path.join(out_dir, 'curves.png'))
        per_rank = rank_states(state, ('sampler', 'mask_gen'))  # DDP: every rank's data and RNG state
        if master and (step > 0 or done):
            check_before_save(step, log, state, scores, saved_scores, collapse_db)  # never a broken one
            save_state(ckpt_path, state, 'tokenizer', model_args=model_args, config=config, step=step,
                       minutes=minutes(), metrics=scores, history=history, **per_rank)
            saved_scores = scores
    if done:
        break

    progress = rank0_number(minutes()) / max_minutes if max_minutes > 0 else step / decay_steps
    rate = learning_rate_at(step, progress, learning_rate, warmup_iters, learning_rate_floor)
    set_learning_rate(optimizer, rate)
    set_learning_rate(d_optimizer, rate * d_learning_rate / learning_rate)
    gan_on = gan_weight > 0 and step >= gan_start
    optimizer.zero_grad(set_to_none=True)
    for micro in range(grad_accum):  # micro-batches; their mean gradient (over the ranks too) makes one step
        x, _ = sampler.next()                                  # (B, 3, crop, crop)
        B = x.shape[0]
        # generator (autoencoder) step on the (decode, target) pairs of the chosen quantizer
        with no_sync(train_step, micro == grad_accum - 1):  # DDP: one gradient all-reduce per step
            with ctx:
                pairs, commit, (align, down) = train_step(reconstructions, x)
                n = len(pairs)                                   # each loss: the mean over the pairs
                l1 = sum((d.float() - t).abs().mean() for d, t in pairs) / n
                l2 = sum((d.float() - t).pow(2).mean() for d, t in pairs) / n
                edge = sum(gradient_l1(d.float(), t) for d, t in pairs) / n if grad_weight > 0 else l1 * 0
                lp = sum(lpips_fn(d.float(), t).mean() for d, t in pairs) / n if lpips_weight > 0 else l1 * 0
                xrec, target = pairs[-1]                         # full size: the GAN's pair
                g = g_loss_hinge(disc(xrec)) if gan_on else l1 * 0
                rec_loss = l1_weight * l1 + l2_weight * l2 + lpips_weight * lp + grad_weight * edge
                g_scale = adaptive_gan_weight(rec_loss, g, model.last_layer) if gan_on and adaptive_gan else 1.0
                loss = (rec_loss + commit_weight * commit + gan_weight * g_scale * g
                        + align_weight * align + down_weight * down)
            (loss / grad_accum).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    stop_if_diverged(step, log, grad_norm, loss=loss, l1=l1, l2=l2, edge=edge, lpips=lp, commit=commit, g=g,
                     align=align, down=down)
    optimizer.step()
    if ema is not None:  # ema <- decay * ema + (1 - decay) * weights; buffers (code hits) copied
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - ema_decay)
            for e, b in zip(ema.buffers(), model.buffers()):
                e.copy_(b)

    # discriminator step: the frequency-matched target is "real" for its decode (the last micro-batch's)
    d = discriminator_step(train_disc, d_optimizer, hinge_d_loss, target, xrec, ctx) if gan_on else torch.zeros(())

    step += 1
    imgs_since_log += B * grad_accum * world
    if step % log_interval == 0:
        dt = time.time() - t_log
        parts = mean_items(dict(loss=loss, l1=l1, l2=l2, edge=edge, lpips=lp, commit=commit, g=g, d=d,
                                **(dict(align=align, down=down) if tvq else {})))  # DDP: of all ranks
        history['train'].append(dict(step=step, **parts, rate=rate))
        log(f"step {step} | " + ' '.join(f"{k} {v:.4f}" for k, v in parts.items()) + f" | rate {rate:.2e} | "
            f"{1000 * dt / log_interval:.0f} ms/iter {imgs_since_log / dt:.1f} img/s | {minutes():.1f} min, "
            f"{time_left(step, max_iters, minutes(), max_minutes, start_step, elapsed_before)}")
        t_log, imgs_since_log = time.time(), 0

if master:
    names = [f'step{i + 1}' for i in range(len(rq_steps))] + ['all'] if msrq else [f'g{g_}' for g_ in range(groups)]
    final = dict(scores, steps=step, minutes=round(minutes(), 2),
                 **{f'code_usage_{n}': float(u) for n, u in zip(names, use.tolist())})
    write_json(final, os.path.join(out_dir, 'summary.json'))
    log(summary('tokenizer', final))
ddp_cleanup()
