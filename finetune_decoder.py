"""
Stage 3: fine-tune the tokenizer's decoder on the generator's own (imperfect) tokens
(HiTokSR; docs/method.md#decoder-fine-tuning).

    python finetune_decoder.py config/tiny.py                      # 2-core CPU, ~4 minutes
    python finetune_decoder.py config/paper.py                     # paper sizes, one GPU
    python finetune_decoder.py config/tiny.py --init_from=resume   # continue exactly
    torchrun --standalone --nproc_per_node=8 finetune_decoder.py config/paper.py   # 8 GPUs

The stage-1 decoder was trained on the tokens of clean HR images; at inference it receives the
stage-2 generator's predictions from degraded LR images, which are often wrong. Here the generator,
the prior and the codebooks are frozen and only the decoder trains: at every position and group
its input index is drawn from the generator's top-K candidates in proportion to their renormalised
probabilities (model.sample_topk), so the decoder learns to turn plausible-but-wrong tokens into
good images. Loss: l1_weight * L1 + lpips_weight * LPIPS + gan_weight * GAN_vanilla against HR.
--lr_guide=True (our option, docs/method.md#lr-guided-decoder) also gives the conv head the LR image,
bicubically upsampled, through a zero-initialised conv per level: edges where the LR has them,
not where the token grid puts them.
Inference (evaluation, sr.py, eval.py) always uses the top-1 tokens. The paper's Table 5 rows:
    --mode=frozen        no training: the stage-1 decoder, evaluated (and saved) as is
    --mode=top1          inputs are the generator's argmax tokens
    --mode=topk          inputs sampled from the top_k candidates (default top_k = 5)
"""
import math
import os
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F

import data
import metrics
from common import (Logger, Timer, autocast_ctx, batched, check_before_save, checkpoint_to_resume,
                    claim_out_dir, count_params, ddp_cleanup, ddp_setup, ddp_wrap, learning_rate_at,
                    load_state, maybe_compile, mean_items, no_sync, param_groups, path_record, rank0_number,
                    rank_states, save_curves, save_grid, save_state, set_learning_rate, setting_problems,
                    stop_if_diverged, summary, time_left, weights_id, write_json)
from configurator import configure, fail
from degradation import DegradeConfig, bicubic_upsample
from model import lr_anchor, sample_topk
from losses import (PatchDiscriminator, adaptive_gan_weight, discriminator_step, g_loss_vanilla, perceptual_fn,
                    vanilla_d_loss)
from chain import load_sr_chain, onepass_chain_rows, super_resolve
from prior import upsample_for_prior

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out/finetune_decoder'
init_from = 'scratch'     # 'scratch' | 'resume' (from out_dir/ckpt.pt: weights, optimizers, RNG, data)
overwrite = False         # True: a scratch run may replace an earlier run's out_dir/ckpt.pt (else refused)
gen_ckpt = 'out/generator/ckpt.pt'  # frozen stage-2 generator (it records its stage-1 tokenizer)
eval_interval = 250       # steps between evaluations (metrics, PNG grid, checkpoint)
log_interval = 10         # steps between log lines
max_iters = 50000         # total optimizer steps (the paper: 50k)
max_minutes = 0.0         # wall-clock budget in minutes (0 = none); the LR decay then follows time
decay_iters = 0           # length of the cosine decay in steps (0 = max_iters)
# data
train_dir = 'assets/images/train'
val_dir = 'assets/val_pairs'        # fixed DEGRADED validation pairs (lr 64x64 -> hr 256x256)
crop_size = 256           # HR training crop side, a multiple of the tokenizer's patch
batch_size = 8            # per process (DDP: each of the N ranks draws its own batch)
grad_accum = 1            # micro-batches per optimizer step (images per step = batch_size * grad_accum * N)
hue_aug = 0.0             # P(a training crop gets a random hue), data.PairSampler (docs/results.md "Image quality")
degradation = 'realesrgan'  # 'realesrgan' (docs/method.md#degradation) | 'bicubic'
jpeg_impl = 'torch'       # its JPEG (docs/method.md#jpeg): 'torch' (batched, on the device) | 'pil' (libjpeg)
# what the decoder sees (the paper's Table 5)
mode = 'topk'             # 'frozen' (no training) | 'top1' | 'topk'
top_k = 5                 # candidates per position and group in mode 'topk'
lr_guide = False          # True: the conv head also sees the upsampled LR (docs/method.md#lr-guided-decoder)
guide_lr_mult = 20.0      # the guide's convs start at zero: their learning rate is this multiple of the decoder's
# loss weights (the paper's L1 + LPIPS + 0.5 GAN_vanilla)
l1_weight = 1.0
lpips_weight = 1.0
lpips_batch = 0           # > 0: LPIPS on the first N crops of each micro-batch only (L1 keeps all; tokenizer.py)
perceptual = 'vgg'        # LPIPS network of the loss: 'vgg' (VGG16) | 'alex' (the evaluation metric's own: it then
                          # measures what was optimised; docs/method.md#metrics)
gan_weight = 0.5
gan_start = 0             # step at which the discriminator and the GAN term switch on
adaptive_gan = False      # VQGAN's adaptive weight: gan_weight x ||grad rec|| / ||grad GAN|| at the decoder's last layer
# optimizers (AdamW; the discriminator with VQGAN's betas)
learning_rate = 5e-5      # decoder (peak of the schedule)
d_learning_rate = 1e-5    # discriminator, follows the same schedule
betas = (0.9, 0.95)
d_betas = (0.5, 0.9)
weight_decay = 0.01
grad_clip = 1.0
collapse_db = 5.0         # a checkpoint is never replaced by one whose PSNR-Y is lower by more than this (0 = off)
warmup_iters = 500
learning_rate_floor = 0.1  # the cosine decay ends at this fraction of the peak
# system
device = 'auto'           # auto | cpu | cuda | mps
dtype = 'auto'            # auto (bf16 on GPUs that support it, fp32 on CPU) | float32 | bfloat16
compile = False           # torch.compile of the decoder (used on CUDA only)
seed = 1337
threads = 0               # torch CPU threads (0 = torch's default)
config = configure(globals())
# -----------------------------------------------------------------------------


def check_config():
    problems = setting_problems(config)
    if init_from not in ('scratch', 'resume'):
        problems.append(f"init_from={init_from!r} must be 'scratch' or 'resume'")
    if mode not in ('frozen', 'top1', 'topk'):
        problems.append(f"mode={mode!r} must be 'frozen', 'top1' or 'topk'")
    if top_k < 1:
        problems.append(f"top_k={top_k} must be >= 1")
    if guide_lr_mult <= 0:
        problems.append(f"guide_lr_mult={guide_lr_mult} must be > 0")
    if mode != 'frozen' and l1_weight == lpips_weight == gan_weight == 0:
        problems.append("every loss weight is 0: nothing would train the decoder (use --mode=frozen)")
    if not os.path.isfile(gen_ckpt):
        problems.append(f"gen_ckpt='{gen_ckpt}' not found: train stage 2 first "
                        f"(python generator.py config/tiny.py) or pass --gen_ckpt=PATH")
    if problems:
        fail('finetune_decoder.py: ' + '; '.join(problems))


check_config()
rank, local_rank, world, device = ddp_setup(device)  # (0, 0, 1, device) without torchrun
master = rank == 0  # evaluates and writes every file; the other ranks only train
notes = claim_out_dir(out_dir, init_from, overwrite) if master else []  # lock, no silent replacement
seed_r = seed + 1000 * rank  # this rank's data and top-K streams (rank 0: those of a single run)
k_train = {'frozen': 0, 'top1': 1, 'topk': top_k}[mode]
if threads:
    torch.set_num_threads(threads)
dtype, ctx = autocast_ctx(device, dtype)
torch.manual_seed(seed)
try:  # the whole chain, frozen and in eval mode; the tokenizer comes from the generator's checkpoint
    tokenizer, generator, prior = load_sr_chain(gen_ckpt, device)
except (ValueError, FileNotFoundError, KeyError) as e:
    fail(f"finetune_decoder.py: cannot load the stage-1/2 chain from {gen_ckpt}: {e}")
tcfg, gcfg = tokenizer.config, generator.config
if tcfg.quantizer != 'grouped':
    fail(f"finetune_decoder.py: {gen_ckpt} is a chain on a quantizer='{tcfg.quantizer}' tokenizer; stage 3 "
         f"fine-tunes the decoder of a grouped-VQ chain (method='hitoksr') only")
if crop_size % tcfg.patch:
    fail(f"finetune_decoder.py: crop_size={crop_size} must be a multiple of the tokenizer's patch={tcfg.patch}")
if lr_guide and tcfg.dec_head != 'conv':
    fail(f"finetune_decoder.py: lr_guide=True needs a conv decoder head; the tokenizer of {gen_ckpt} has "
         f"dec_head='{tcfg.dec_head}'")
# the chain this decoder is fine-tuned for, by the weights' ids (a resume must use the same chain;
# chain.load_sr_chain refuses this decoder for any other tokenizer): the stage-1 weights, before any guide
chain = dict(tok_id=weights_id(tokenizer.state_dict()), gen_id=weights_id(generator.state_dict()),
             tok_model_args=asdict(tcfg), gen_model_args=asdict(gcfg), mode=mode, top_k=k_train, lr_guide=lr_guide)
decoder = tokenizer.decoder.add_lr_guide() if lr_guide else tokenizer.decoder
decoder.requires_grad_(True)  # the only trainable module (mode 'frozen' never takes a step)
ckpt_path, ckpt = checkpoint_to_resume(out_dir, init_from, 'decoder', **chain)
log = Logger(out_dir, config, notes) if master else (lambda msg: None)

# data: (HR crop, degraded LR) pairs; the fixed degraded validation pairs
try:
    sampler = data.PairSampler(train_dir, crop_size, batch_size, seed=seed_r, device=device,
                               deg_cfg=DegradeConfig(mode=degradation, jpeg_impl=jpeg_impl), hue_prob=hue_aug)
    val = data.load_val_pairs(val_dir)
except ValueError as e:  # a missing or incomplete folder
    fail(f"finetune_decoder.py: {e}")
val_hr, val_lr = val['hr'], val['lr']                         # (N,3,256,256), (N,3,64,64)
topk_gen = torch.Generator(device=device).manual_seed(seed_r + 2)  # the top-K draws, saved for resume

disc = PatchDiscriminator().to(device).requires_grad_(False)  # trains only in discriminator_step
lpips_net = metrics.load_lpips(device)            # the metric (evaluation only)
lpips_fn = perceptual_fn(metrics.load_lpips(device, net=perceptual), lpips_batch)  # the perceptual loss
guide = list(decoder.upsampler.guide.parameters()) if lr_guide else []   # its own group: lr_mult (common)
in_guide = {id(p) for p in guide}
groups_ = [dict(g, params=[p for p in g['params'] if id(p) not in in_guide]) for g in param_groups(decoder, weight_decay)]
groups_ += [dict(params=guide, weight_decay=0.0, lr_mult=guide_lr_mult)] if lr_guide else []
optimizer = torch.optim.AdamW(groups_, lr=learning_rate, betas=betas)
d_optimizer = torch.optim.AdamW(disc.parameters(), lr=d_learning_rate, betas=d_betas, weight_decay=weight_decay)
train_decoder = ddp_wrap(maybe_compile(decoder, compile, device))  # DDP: gradients averaged in backward
train_disc = ddp_wrap(disc.requires_grad_(True))  # the discriminator's, in discriminator_step
disc.requires_grad_(False)
if rank > 0:
    torch.manual_seed(seed_r)  # its own global-RNG draws
# everything an exact resume needs, declared once: saved by save_state, restored by load_state
# ('decoder' is all that sr.py / eval.py need: load_sr_chain(..., decoder_ckpt=this file))
state = dict(decoder=decoder, disc=disc, optimizer=optimizer, d_optimizer=d_optimizer, sampler=sampler,
             topk_gen=topk_gen)
step, elapsed_before = load_state(ckpt, state) if ckpt is not None else (0, 0.0)
history = (ckpt or {}).get('history', dict(train=[], eval=[]))  # what curves.png shows, kept on resume
saved_scores = (ckpt or {}).get('metrics')  # the evaluation of the checkpoint a save replaces
log(f"resumed from {ckpt_path} at step {step}" if ckpt is not None else f"training from scratch into {out_dir}")
ckpt = None  # free the loaded tensors
log(f"finetune_decoder: mode {mode}" + (f" (top-{top_k})" if mode == 'topk' else '')
    + f", decoder {count_params(decoder) / 1e6:.2f}M params trainable{' (with the LR guide)' if lr_guide else ''}; generator "
      f"{gen_ckpt} (frozen), tokenizer grid {crop_size // tcfg.patch}x{crop_size // tcfg.patch}, "
      f"G {tcfg.groups} x K {tcfg.codebook_size}, device {device}, {dtype}"
    + (f", DDP over {world} processes" if world > 1 else ''))


# fixed references: the generator is frozen, so its top-1 tokens for the validation LR never change;
# the stage-2 SR (the stage-1 decoder on them) and bicubic are the rows stage 3 must beat
val_sr2, val_idx = batched(lambda y: [t.cpu() for t in super_resolve(y, tokenizer, generator, prior, True)],
                           val_lr, device=device)              # (N, 3, 256, 256), (N, G, h, w)
val_bic = bicubic_upsample(val_lr)
rows = onepass_chain_rows(val, tokenizer, generator, prior, lpips_net, 4, device, kinds=('sr', 'base'), outs=val_sr2)
ref = {f"{'stage2' if r['kind'] == 'sr' else 'bicubic'}_{k}": r[k] for r in rows for k in metrics.METRICS}
log('references: ' + ' '.join(f"{k} {v:.4f}" for k, v in ref.items()))


@torch.no_grad()
def evaluate(tag):
    """Decode the generator's top-1 validation tokens with the current decoder (inference = top-1)."""
    decoder.eval()
    sr, = batched(lambda q, y: (tokenizer.decode(tokenizer.quantizer.lookup(q), lr=y).float().clamp(0, 1).cpu(),),
                  val_idx, val_lr, device=device)
    m = metrics.evaluate(sr, val_hr, crop_border=4, lpips_net=lpips_net, patch=tcfg.patch)
    out = dict({k: m[k] for k in metrics.METRICS},
               lpips_vs_stage2=m['lpips'] / ref['stage2_lpips'])
    save_grid([F.interpolate(val_lr[:6], scale_factor=4, mode='nearest'), val_bic[:6], val_sr2[:6], sr[:6],
               val_hr[:6]], os.path.join(out_dir, f'samples_{tag}.png'),
              ['LR (nearest)', 'bicubic', 'stage 2 (stage-1 decoder)', 'stage 3 (this decoder)', 'HR'])
    decoder.train(mode != 'frozen')
    return out


timer, start_step = Timer(), step  # this run's pace (a resumed run counts from its resume)
minutes = lambda: elapsed_before + timer.minutes()
decay_steps = decay_iters or max_iters
decoder.train(mode != 'frozen')
scores, t_log, imgs_since_log = {}, time.time(), 0
while True:
    # under DDP rank 0's clock decides, so that all ranks stop together and share the learning rate
    out_of_time = max_minutes > 0 and rank0_number(minutes()) >= max_minutes
    done = mode == 'frozen' or step >= max_iters or out_of_time
    if step % eval_interval == 0 or done:
        if master:  # the other ranks wait in rank_states
            scores = evaluate(f'{step:06d}')
            log(f"eval step {step}: " + ' '.join(f"{k} {v:.4f}" for k, v in scores.items()))
            history['eval'].append(dict(step=step, **scores))
            save_curves(history, os.path.join(out_dir, 'curves.png'))
        per_rank = rank_states(state, ('sampler', 'topk_gen'))  # DDP: every rank's data and RNG state
        if master and (step > 0 or done):
            check_before_save(step, log, state, scores, saved_scores, collapse_db)  # never a broken one
            save_state(ckpt_path, state, 'decoder', config=config, step=step, minutes=minutes(),
                       metrics=scores, history=history, gen_ckpt=path_record(gen_ckpt, ckpt_path),
                       **chain, **per_rank)
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
        hr, lr = sampler.next()                     # (B, 3, crop, crop), (B, 3, crop/4, crop/4)
        B = hr.shape[0]
        with torch.no_grad(), ctx:  # the frozen generator's candidates, then one draw per position/group
            feat, pooled = prior(upsample_for_prior(lr, gcfg.scale)) if prior is not None else (None, None)
            anchor = lr_anchor(tokenizer, lr, gcfg.scale) if gcfg.head == 'codebook' else None
            logits = generator(lr, feat, pooled, anchor)    # (B, G, h, w, K)
            idx = sample_topk(logits, k_train, topk_gen)  # (B, G, h, w), among the top-k of each
            zq = tokenizer.quantizer.lookup(idx)        # (B, C, h, w), codebooks frozen
            flipped = (idx != logits.argmax(-1)).float().mean()  # share of inputs that are not top-1

        # decoder step (the discriminator is frozen outside discriminator_step)
        with no_sync(train_decoder, micro == grad_accum - 1):  # DDP: one gradient all-reduce per step
            with ctx:
                sr = train_decoder(zq, lr).float()          # (B, 3, crop, crop); lr: the guide's, if any
                l1 = (sr - hr).abs().mean()
                lp = lpips_fn(sr, hr).mean() if lpips_weight > 0 else l1 * 0
                g = g_loss_vanilla(disc(sr)) if gan_on else l1 * 0
                rec_loss = l1_weight * l1 + lpips_weight * lp
                g_scale = adaptive_gan_weight(rec_loss, g, decoder.last_layer) if gan_on and adaptive_gan else 1.0
                loss = rec_loss + gan_weight * g_scale * g
            (loss / grad_accum).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(decoder.parameters(), grad_clip if grad_clip > 0 else math.inf)
    stop_if_diverged(step, log, grad_norm, loss=loss, l1=l1, lpips=lp, g=g)
    optimizer.step()

    # discriminator step: HR is real, the decoded sample (of the last micro-batch) fake
    d = (discriminator_step(train_disc, d_optimizer, vanilla_d_loss, hr, sr, ctx) if gan_on
         else torch.zeros((), device=hr.device))

    step += 1
    imgs_since_log += B * grad_accum * world
    if step % log_interval == 0:
        dt = time.time() - t_log
        parts = {'loss': loss, 'l1': l1, 'lpips': lp, 'g': g, 'd': d, 'not-top1': flipped}
        parts = mean_items(parts)  # DDP: of all ranks
        history['train'].append(dict(step=step, **parts, rate=rate))
        log(f"step {step} | " + ' '.join(f"{k} {v:.4f}" for k, v in parts.items()) + f" | rate {rate:.2e} | "
            f"{1000 * dt / log_interval:.0f} ms/iter {imgs_since_log / dt:.1f} img/s | {minutes():.1f} min, "
            f"{time_left(step, max_iters, minutes(), max_minutes, start_step, elapsed_before)}")
        t_log, imgs_since_log = time.time(), 0

if master:
    final = dict(scores, **ref, mode=mode, top_k=k_train, steps=step, minutes=round(minutes(), 2))
    write_json(final, os.path.join(out_dir, 'summary.json'))
    log(summary('finetune_decoder', final))
ddp_cleanup()
