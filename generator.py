"""
Stage 2: train the token generator. The method follows from the tokenizer it predicts the tokens of
(tok_ckpt), one loop for all three, each method's references, evaluation and batch loss in a section:
  grouped-VQ tokenizer -> HiTokSR: the semantic-guided generator, every token in one pass
             (docs/method.md#generator); losses.generator_losses: ce_weight * CE + repa_weight * REPA +
             l1_weight * L1 + lpips_weight * LPIPS + gan_weight * GAN, the pixel terms on the decoded
             straight-through one-hot (the frozen decoder passes gradients to the logits).
  multi-scale RQ       -> H-VAR: the next-scale generator (docs/method.md#next-scale-generator), x1, x2 and
             x4 from one pass; losses.hvar_losses: ce_weight * CE + dpo_weight * DPO (z_HR against z_LR, the
             upsampled LR's tokens) + reg_weight * the codebook head's code regression (the tiny recipe: it alone),
             optionally self_correct and HiTokSR's pixel terms.
  texture VQ           -> TVQ&RAP's predictor (docs/method.md#texture-predictor): HiTokSR's generator with a
             texture head and a structure-map head, + struct_weight * MSE(F_L).
Ablations are one flag away: --use_prior=False (no SFT, CLS tokens, REPA or LoRA), --use_sft=False,
--cls_tokens=none|single, --lora_rank=0 (a frozen prior), --repa_weight=0, --l1_weight=0 --lpips_weight=0
--gan_weight=0 (CE only); H-VAR: --dpo=True|False, --ce_weight=1, --reg_weight=0, --self_correct=0.5,
--hvar_tokens=plain (no valid x1 / x2), --bilinear_frac=0.

    python generator.py config/tiny.py                           # 2-core CPU, ~10 minutes
    python generator.py config/paper.py                          # paper sizes, one GPU
    python generator.py config/tiny.py config/hvar.py            # H-VAR (its tokenizer: the same two files)
    python generator.py config/tiny.py config/tvq.py             # texture VQ
    python generator.py config/tiny.py --init_from=resume        # continue exactly
    torchrun --standalone --nproc_per_node=8 generator.py config/paper.py   # 8 GPUs (DDP)
"""
import copy
import math
import os
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F

import data
import metrics
from common import (Logger, Timer, TrainStep, autocast_ctx, batched, check_before_save, checkpoint_to_resume,
                    claim_out_dir, count_params, ddp_cleanup, ddp_setup, ddp_wrap, from_rank0_,
                    learning_rate_at, load_checkpoint, load_state, maybe_compile, mean_items, no_sync,
                    param_groups, path_record, rank0_number, rank_states, save_curves, save_grid, save_state,
                    set_learning_rate, setting_problems, stop_if_diverged, summary, time_left, weights_id,
                    write_json)
from configurator import configure, fail
from degradation import DegradeConfig, bicubic_upsample
from model import CLASS_DEGRADED, Generator, NextScaleGenerator, TextureGenerator, Tokenizer, TokenizerConfig
from losses import (PatchDiscriminator, calibrate_codebook_head, discriminator_step, generator_losses, hvar_inputs,
                    hvar_losses, perceptual_fn, scale_accuracy, vanilla_d_loss)
from chain import METHODS, hvar_chain_rows, hvar_sr, onepass_chain_rows, output_scales, stage2_models, super_resolve
from prior import LoRAWeights

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out/generator'
init_from = 'scratch'     # 'scratch' | 'resume' (from out_dir/ckpt.pt: weights, optimizers, RNG, data)
overwrite = False         # True: a scratch run may replace an earlier run's out_dir/ckpt.pt (else refused)
tok_ckpt = 'out/tokenizer/ckpt.pt'  # frozen stage-1 tokenizer (codebooks + decoder, targets q_HR)
eval_interval = 250       # steps between evaluations (metrics, PNG grid, checkpoint)
log_interval = 10         # steps between log lines
max_iters = 2000          # total optimizer steps
max_minutes = 0.0         # wall-clock budget in minutes (0 = none); the LR decay then follows time
decay_iters = 0           # length of the cosine decay in steps (0 = max_iters)
# data
train_dir = 'assets/images/train'
val_dir = 'assets/val_pairs'        # fixed DEGRADED validation pairs (lr 64x64 -> hr 256x256)
crop_size = 256           # HR training crop side, a multiple of patch (LR crop = crop_size / 4)
batch_size = 8            # per process (DDP: each of the N ranks draws its own batch)
grad_accum = 1            # micro-batches per optimizer step (images per step = batch_size * grad_accum * N)
hue_aug = 0.0             # P(a training crop gets a random hue), data.PairSampler (docs/results.md "Image quality")
degradation = 'realesrgan'  # 'realesrgan' (docs/method.md#degradation) | 'bicubic' (clean LR, easier)
jpeg_impl = 'torch'       # its JPEG (docs/method.md#jpeg): 'torch' (batched, on the device) | 'pil' (libjpeg)
# model: the fields of model.GeneratorConfig (docs/method.md#generator); groups, codebook_size
# and scale come from the tokenizer, feat_dim and pooled_dims from the prior
patch = 16                # HR pixels per token side; must equal the tokenizer's
width = 768
depth = 12
n_head = 12
mlp_ratio = 4.0           # SwiGLU hidden = 2/3 * mlp_ratio * width
rope_base = 10000.0       # 2D RoPE frequency base
stem_dim = 128            # channels of the LR 3x3 conv before the stride patch/4 patchifier
# H-VAR (a multi-scale RQ tokenizer; docs/method.md#next-scale-generator): no prior, no pixel losses
hvar_tokens = 'hierarchical'  # targets: 'hierarchical' (Algorithm 1) | 'plain' (full-size RQ, no valid x1 / x2)
head = 'linear'           # output head: 'linear' (width -> K logits) | 'codebook' (distances to the tokenizer's codes,
                          # from the encoder's latent of the upsampled LR; H-VAR and HiTokSR)
dpo = True                # the DPO regulariser (needs z_LR: a second sequence in the same forward pass)
dpo_beta = 0.2
dpo_weight = 1.0          # equal weight with CE, as the paper
dpo_reduce = 'sum'        # log-likelihood of a sequence: 'sum' over its tokens (the paper) | 'mean' (per token)
dpo_start = 0             # steps of CE alone before DPO joins (a warm-up)
dpo_ref = False           # True: DPO against a frozen copy of the generator taken at dpo_start (standard DPO)
reg_weight = 0.0          # head 'codebook': + this x the regressed residual's squared distance to the target's code
                          # (losses.code_regression), which keeps top-1 on the nearest code (docs/method.md#codebook-head)
self_correct = 0.0        # samples whose steps see the generator's own top-1 tokens, with HR's tokens given them as
                          # targets (losses.prefix_targets; docs/method.md#self-correction): generation's inputs in training
bilinear_frac = 0.1       # pairs whose LR is only a bilinear downsample of HR (class 1), <= 0.25
free_frac = 0.1           # pairs of either kind labelled class-free (class 2), the LR still given
guidance_drop = 0.0       # pairs with zero conditions (class-free), for classifier-free guidance (sr.py --cfg)
# semantic prior (HiTokSR)
use_prior = True          # False: no prior at all (no SFT, no CLS tokens, no REPA, no LoRA)
prior_name = 'efficientnet_lite0'
prior_feat_tap = 'head'   # the prior map for SFT / REPA: 'head' (1280ch, H/32) or 's16' (112ch, H/16)
use_sft = True            # SFT modulation of every block from the prior map
sft_hidden = 128          # channels of the SFT condition features
cls_tokens = 'multi'      # 'none' | 'single' (last stage's pooled vector) | 'multi' (one per stage)
lora_rank = 4             # LoRA rank on the prior's linear / 1x1 convs (0 = frozen prior, no LoRA)
lora_alpha = 4.0
# loss weights (the paper's Eq. 10: 1, 1, 1, 1, 0.5)
struct_weight = 1.0       # texture VQ: MSE of the predicted structure map F_L (TVQ&RAP Eq. 9)
ce_weight = 1.0           # (TVQ&RAP: 0.5)
repa_weight = 1.0
l1_weight = 1.0
lpips_weight = 1.0
lpips_batch = 0           # > 0: LPIPS on the first N crops of each micro-batch only (L1 keeps all; tokenizer.py)
perceptual = 'vgg'        # LPIPS network of the loss: 'vgg' (VGG16) | 'alex' (the evaluation metric's own: it then
                          # measures what was optimised; docs/method.md#metrics)
gan_weight = 0.5          # vanilla (non-saturating) GAN, fixed weight
gan_start = 5000          # step at which the discriminator and the GAN term switch on
# optimizers (AdamW; the discriminator with VQGAN's betas)
learning_rate = 5e-5      # generator and LoRA (peak of the schedule)
d_learning_rate = 1e-5    # discriminator, follows the same schedule
betas = (0.9, 0.95)
d_betas = (0.5, 0.9)
weight_decay = 0.05
grad_clip = 1.0
collapse_db = 5.0         # a checkpoint is never replaced by one whose PSNR-Y is lower by more than this (0 = off)
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
    if init_from not in ('scratch', 'resume'):
        problems.append(f"init_from={init_from!r} must be 'scratch' or 'resume'")
    if lora_rank < 0:
        problems.append(f"lora_rank={lora_rank} must be >= 0 (0: a frozen prior)")
    if ce_weight == l1_weight == lpips_weight == gan_weight == 0:
        problems.append("every generator loss weight is 0: nothing would train the generator")
    if not os.path.isfile(tok_ckpt):
        problems.append(f"tok_ckpt='{tok_ckpt}' not found: train stage 1 first "
                        f"(python tokenizer.py config/tiny.py) or pass --tok_ckpt=PATH")
    if hvar_tokens not in ('hierarchical', 'plain'):
        problems.append(f"hvar_tokens={hvar_tokens!r} must be 'hierarchical' or 'plain'")
    if not 0 <= bilinear_frac <= 0.25:
        problems.append(f"bilinear_frac={bilinear_frac} must be in [0, 0.25] (H-VAR uses a small fraction)")
    if not 0 <= self_correct <= 1:
        problems.append(f"self_correct={self_correct} must be in [0, 1] (a fraction of the samples)")
    if not (0 <= free_frac < 1 and 0 <= guidance_drop < 1):
        problems.append(f"free_frac={free_frac} and guidance_drop={guidance_drop} must be in [0, 1)")
    if dpo_beta <= 0:
        problems.append(f"dpo_beta={dpo_beta} must be > 0")
    if reg_weight > 0 and head != 'codebook':
        problems.append(f"reg_weight={reg_weight} must be 0 unless head='codebook' (it regresses that head's "
                        f"residual; head={head!r})")
    if dpo_reduce not in ('sum', 'mean') or dpo_start < 0:
        problems.append(f"dpo_reduce={dpo_reduce!r} must be 'sum' or 'mean', dpo_start={dpo_start} >= 0")
    if problems:
        fail('generator.py: ' + '; '.join(problems))


check_config()
rank, local_rank, world, device = ddp_setup(device)  # (0, 0, 1, device) without torchrun
master = rank == 0  # evaluates and writes every file; the other ranks only train
notes = claim_out_dir(out_dir, init_from, overwrite) if master else []  # lock, no silent replacement
seed_r = seed + 1000 * rank  # this rank's data stream (rank 0: that of a single run)
try:
    tok = load_checkpoint(tok_ckpt, '--tok_ckpt', kind='tokenizer')
except ValueError as e:
    fail(f"generator.py: {e}")
tcfg = TokenizerConfig.from_dict(tok['model_args'])
method = METHODS[tcfg.quantizer]  # what the tokens call for
hvar, tvq = method == 'hvar', method == 'tvq'
if tvq and crop_size % (patch * tcfg.tvq_struct_pool):
    fail(f"generator.py: crop_size={crop_size} must be a multiple of patch x tvq_struct_pool = "
         f"{patch * tcfg.tvq_struct_pool} (the tokenizer's structure cell)")
if hvar and ce_weight == reg_weight == l1_weight == lpips_weight == 0 and not (dpo and dpo_weight > 0):
    fail("generator.py: ce_weight, reg_weight, l1_weight, lpips_weight and dpo are all off: nothing would train "
         "the H-VAR generator")
if hvar and crop_size != tcfg.rq_steps[-1] * tcfg.patch:
    fail(f"generator.py: crop_size={crop_size}, but the H-VAR generator works at its tokenizer's native size "
         f"rq_steps[-1] x patch = {tcfg.rq_steps[-1] * tcfg.patch} (set --crop_size to it)")
if tcfg.patch != patch:
    fail(f"generator.py: patch={patch} but the tokenizer {tok_ckpt} has patch={tcfg.patch}: the "
         f"generator predicts one index per tokenizer token, set --patch={tcfg.patch}")
torch.manual_seed(seed)  # before the prior: its LoRA A matrices are drawn at construction
try:  # the prior and the generator's config; config gets the no-prior switches (H-VAR has no prior)
    prior_args, prior, gcfg = stage2_models(tcfg, config)
except (ValueError, ImportError) as e:
    fail(f"generator.py: {e}")
use_prior, use_sft, cls_tokens, repa_weight, lora_rank = (config[k] for k in ('use_prior', 'use_sft', 'cls_tokens',
                                                                               'repa_weight', 'lora_rank'))
model_args = asdict(gcfg)
repa_on = repa_weight > 0 and lora_rank > 0  # a frozen prior has nothing for REPA to train
if threads:
    torch.set_num_threads(threads)
dtype, ctx = autocast_ctx(device, dtype)
ckpt_path, ckpt = checkpoint_to_resume(out_dir, init_from, 'generator', model_args=model_args,
                                       prior_args=prior_args, method=method)
log = Logger(out_dir, config, notes) if master else (lambda msg: None)

# frozen tokenizer: targets q_HR (encoder + VQ) and the decoder the pixel losses go through
tokenizer = Tokenizer(tcfg)
tokenizer.load_state_dict(tok.get('ema') or tok['model'])  # the EMA weights when stage 1 kept them
tokenizer.to(device).eval().requires_grad_(False)  # eval: no dead-code restarts, no hit counts
tok_step = tok.get('step')
tok_id = weights_id(tokenizer.state_dict())  # the chain's identity check (chain.load_sr_chain)
del tok

# data: (HR crop, degraded LR) pairs; the fixed degraded validation pairs
try:
    sampler = data.PairSampler(train_dir, crop_size, batch_size, seed=seed_r, device=device,
                               deg_cfg=DegradeConfig(mode=degradation, jpeg_impl=jpeg_impl), hue_prob=hue_aug)
    val = data.load_val_pairs(val_dir)
except ValueError as e:  # a missing or incomplete folder
    fail(f"generator.py: {e}")
val_hr, val_lr = val['hr'], val['lr']                         # (N,3,256,256), (N,3,64,64)
if val_hr.shape[-1] % patch or val_hr.shape[-2] % patch:
    fail(f"validation crops {tuple(val_hr.shape[-2:])} are not a multiple of patch={patch}")

# model, prior (outside the generator module, see model.py), discriminator (frozen between its own
# steps), LPIPS
generator = (NextScaleGenerator if hvar else TextureGenerator if tvq else Generator)(gcfg).to(device)
if head == 'codebook':  # a frozen copy of the codes ('hitoksr': all G codebooks)
    generator.codes.tie_codebook(tokenizer.quantizer.codebook)
if prior is not None:
    prior.to(device)
disc = PatchDiscriminator().to(device).requires_grad_(False)
lpips_net = metrics.load_lpips(device)                                  # the metric (evaluation only)
lpips_fn = perceptual_fn(metrics.load_lpips(device, net=perceptual), lpips_batch)  # the perceptual loss
groups_ = param_groups(generator, weight_decay) + (param_groups(prior, weight_decay) if prior else [])
optimizer = torch.optim.AdamW([g for g in groups_ if g['params']], lr=learning_rate, betas=betas)
d_optimizer = torch.optim.AdamW(disc.parameters(), lr=d_learning_rate, betas=d_betas, weight_decay=weight_decay)
trainable = [p for g in optimizer.param_groups for p in g['params']]
# DDP: the training forward, generator and LoRA together; every LoRA layer gets a gradient when the
# prior's last map ('head', what the CLS tokens always include) reaches the loss, else DDP must look
# for those that get none (find_unused). The discriminator's DDP is used in discriminator_step.
lora_all_used = cls_tokens != 'none' or (prior_feat_tap == 'head' and (use_sft or repa_on))
train_step = ddp_wrap(TrainStep(generator, *([prior] if prior is not None else [])),
                      find_unused=lora_rank > 0 and not lora_all_used)
train_disc = ddp_wrap(disc.requires_grad_(True))
disc.requires_grad_(False)
if rank > 0:
    torch.manual_seed(seed_r)  # its own global-RNG draws (H-VAR's input classes)
# everything an exact resume needs, declared once: saved by save_state, restored by load_state
state = dict(generator=generator, prior_lora=LoRAWeights(prior), disc=disc, optimizer=optimizer,
             d_optimizer=d_optimizer, sampler=sampler)
if hvar:  # no prior, no discriminator; DPO's frozen reference policy when asked for
    for k in ('prior_lora', 'disc', 'd_optimizer'):
        del state[k]
reference = copy.deepcopy(generator).requires_grad_(False).eval() if hvar and dpo and dpo_ref else None
if reference is not None:
    state['dpo_ref'] = reference  # the generator as it was at dpo_start (taken then)
step, elapsed_before = load_state(ckpt, state) if ckpt is not None else (0, 0.0)
history = (ckpt or {}).get('history', dict(train=[], eval=[]))  # what curves.png shows, kept on resume
saved_scores = (ckpt or {}).get('metrics')  # the evaluation of the checkpoint a save replaces
log(f"resumed from {ckpt_path} at step {step}" if ckpt is not None else f"training from scratch into {out_dir}")
if head == 'codebook' and ckpt is None:  # data init of the temperature(s), on one training batch
    ce0, ce1 = calibrate_codebook_head(generator, tokenizer, prior, *sampler.next())
    with torch.no_grad():
        from_rank0_(generator.codes.log_t)  # DDP: every rank keeps rank 0's value (the ranks' batches differ)
    log("codebook head: inverse temperature " + ' '.join(f"{t:.1f}" for t in generator.codes.log_t.exp().tolist())
        + f" (cross-entropy on one training batch{'' if hvar else ', mean over the groups'} {ce0:.3f} -> {ce1:.3f})")
ckpt = None  # free the loaded tensors
train_gen = maybe_compile(generator, compile, device)
n_lora = sum(p.numel() for p in LoRAWeights(prior).state_dict().values())
h_tok = crop_size // patch
run = f", tokenizer {tok_ckpt} step {tok_step}, device {device}, {dtype}" + (f", DDP over {world} processes"
                                                                            if world > 1 else '')
if hvar:  # the loss's terms (the other H-VAR settings: the config line)
    terms = [(ce_weight, 'CE'), (reg_weight, 'code regression'), (l1_weight, 'L1'),
             (lpips_weight, f'LPIPS-{perceptual}'), (dpo_weight if dpo else 0, f"DPO (beta {dpo_beta}, {dpo_reduce}, "
                                                    f"from step {dpo_start}{', reference policy' if dpo_ref else ''})")]
    log(f"H-VAR generator: {count_params(generator) / 1e6:.2f}M params, {tcfg.codebook_size} logits ({head} head), "
        f"{generator.n_cond} condition + {sum(generator.sizes[1:])} image tokens ({hvar_tokens} targets, steps "
        f"{tcfg.rq_steps}, scales {tcfg.rq_scales}); loss " + ' + '.join(f'{w:g} {t}' for w, t in terms if w) + run)
else:
    log(f"generator: {count_params(generator) / 1e6:.2f}M params, LoRA "
        f"{n_lora / 1e6:.3f}M, {tcfg.groups} heads x {tcfg.codebook_size} logits ({head} head), grid {h_tok}x{h_tok}, "
        + (f"structure map {tcfg.tvq_struct_dim} x {h_tok // tcfg.tvq_struct_pool}x{h_tok // tcfg.tvq_struct_pool}, "
           if tvq else '') +
        f"prior {prior_name if prior else 'none'} (sft {use_sft}, cls {cls_tokens}, lora rank {lora_rank}, "
        f"repa {'on' if repa_on else 'off'})" + run)


METRICS = metrics.METRICS  # psnr_y, ssim_y, lpips, grid, periodic, color_err
val_bic = bicubic_upsample(val_lr)
weights = dict(ce_weight=ce_weight, repa_weight=repa_weight if repa_on else 0.0, l1_weight=l1_weight,
               lpips_weight=lpips_weight, gan_weight=gan_weight, struct_weight=struct_weight)


def grid_png(tag, rows, labels):
    save_grid([F.interpolate(val_lr[:6], scale_factor=4, mode='nearest'), val_bic[:6], *rows, val_hr[:6]],
              os.path.join(out_dir, f'samples_{tag}.png'), ['LR (nearest)', 'bicubic', *labels, 'HR'])


# -----------------------------------------------------------------------------
# HiTokSR and TVQ&RAP: every token in one pass (docs/method.md#generator, #texture-predictor)

def hr_targets(hr):
    """The frozen tokenizer's targets of HR: its indices q (B, G, h, w) [, texture VQ: its structure map
    F_L (B, C_L, h/r, w/r)]."""
    _, q, _, _, *f_l = tokenizer.encode_tvq(hr) if tvq else tokenizer.encode(hr)
    return [q, *f_l]


def onepass_references():
    """Fixed rows on the validation pairs: bicubic and the tokenizer's reconstruction of HR (an upper
    bound for SR through this decoder). -> (rows, HR's fixed targets: q for the token accuracy [, f_l])."""
    rows = onepass_chain_rows(val, tokenizer, generator, prior, lpips_net, 4, device, kinds=('base', 'decode'))
    val_q, *val_fl = batched(lambda x: [t.cpu() for t in hr_targets(x)], val_hr, device=device)
    return ({f"{'bicubic' if r['kind'] == 'base' else 'r'}_{k}": r[k] for r in rows for k in METRICS},
            dict(q=val_q, f_l=val_fl[0] if tvq else None))


@torch.no_grad()
def onepass_evaluate(tag):
    """Super-resolve the degraded validation LR with top-1 tokens; score next to bicubic."""
    sr, idx = batched(lambda y: [t.cpu() for t in super_resolve(y, tokenizer, generator, prior, True)],
                      val_lr, device=device)
    acc = (idx == fixed['q']).float().mean(dim=(0, 2, 3))                      # (G,)
    m = metrics.evaluate(sr, val_hr, crop_border=4, lpips_net=lpips_net, patch=patch)
    out = dict({k: m[k] for k in METRICS}, lpips_vs_bicubic=m['lpips'] / ref['bicubic_lpips'],
               token_acc_mean=float(acc.mean()))
    out.update({f'token_acc_g{g}': float(a) for g, a in enumerate(acc.tolist())})
    if tvq:  # the predicted structure map against the tokenizer's map of HR
        f_l, = batched(lambda y: (generator(y)[1].float().cpu(),), val_lr, device=device)
        out['struct_mse'] = float((f_l - fixed['f_l']).pow(2).mean())
    grid_png(tag, [sr[:6]], ['SR (top-1)'])
    return out


def onepass_batch(hr, lr, gan_on):
    """One micro-batch: the frozen tokenizer's targets of HR, then losses.generator_losses.
    -> (loss, parts to log, the decoded prediction for the discriminator)."""
    with torch.no_grad():
        q_hr, *f_l_hr = hr_targets(hr)
    with ctx:  # generator + LoRA (the discriminator is frozen outside discriminator_step)
        loss, parts, logits, sr = train_step(generator_losses, tokenizer, train_gen, prior, hr, lr, q_hr, *f_l_hr,
                                             **weights, train_prior=lora_rank > 0, lpips_fn=lpips_fn, disc=disc,
                                             gan_on=gan_on)
    parts['acc'] = (logits.detach().argmax(-1) == q_hr).float().mean()
    return loss, parts, sr


# -----------------------------------------------------------------------------
# H-VAR: next-scale prediction, x1 / x2 / x4 from one pass (docs/method.md#next-scale-generator)

def hvar_references():
    """Fixed rows per output factor f (x1, x2, x4): the degraded LR itself / bicubic, and the decode
    of HR's own tokens at that scale. -> (rows, the top-left native crops for the teacher-forced
    accuracy)."""
    rows = hvar_chain_rows(val, tokenizer, generator, lpips_net, 4, device, kinds=('base', 'decode'))  # once
    ref = {f"x{r['f']}_{'bicubic' if r['kind'] == 'base' else 'r'}_{k}": r[k] for r in rows for k in METRICS}
    ref.update({k[3:]: v for k, v in ref.items() if k.startswith('x4_')})  # r_*, bicubic_* at x4
    native = crop_size // 4
    return ref, dict(hr=val_hr[..., :crop_size, :crop_size], lr=val_lr[..., :native, :native])


@torch.no_grad()
def hvar_evaluate(tag):
    """x1, x2, x4 of the degraded validation LR from one top-1 pass per native tile, stitched in
    latent space (as sr.py), each scored against HR resized to its size next to bicubic; token accuracy per
    step and scale under teacher forcing on the top-left native crops."""
    outs = hvar_sr(val_lr, tokenizer, generator, device)                          # {f: (N, 3, f h, f w)}
    out = {f"x{r['f']}_{k}": r[k] for r in hvar_chain_rows(val, tokenizer, generator, lpips_net, 4, device,
                                                              kinds=('sr',), outs=outs) for k in METRICS}
    out['lpips_vs_bicubic'] = out['x4_lpips'] / ref['bicubic_lpips']
    cls = torch.full((len(fixed['hr']),), CLASS_DEGRADED, device=device)
    _, parts, acc = hvar_losses(tokenizer, generator, fixed['hr'].to(device), fixed['lr'].to(device), cls,
                                ce_weight=ce_weight, dpo=True, dpo_weight=dpo_weight, dpo_beta=dpo_beta,
                                dpo_reduce=dpo_reduce, reg_weight=reg_weight)
    out.update(val_ce=float(parts['ce']), val_logp_gap=float(parts['logp_gap']), token_acc_mean=float(acc.mean()))
    if reg_weight > 0:
        out['val_reg'] = float(parts['reg'])
    out.update({f'token_acc_s{n + 1}': float(a)
                for n, a in enumerate(scale_accuracy(acc, tcfg.rq_steps, tokenizer.quantizer.partition))})
    out.update({f'token_acc_step{i + 1}': float(a) for i, a in enumerate(acc)})
    grid_png(tag, [outs[f][:6] for f in factors], [f'H-VAR x{f} (top-1, nearest-upsampled)' for f in factors])
    return out


def hvar_batch(hr, lr, gan_on):
    """One micro-batch: its classes, bilinear LR, class-free and own-prefix samples (losses.hvar_inputs),
    then losses.hvar_losses. -> (loss, parts, None)."""
    lr, cls, drop, own = hvar_inputs(hr, lr, bilinear_frac, free_frac, guidance_drop, self_correct)
    if reference is not None and step == dpo_start:  # DPO starts: the reference is the generator now
        reference.load_state_dict(generator.state_dict())
    with ctx:
        loss, parts, acc = train_step(hvar_losses, tokenizer, train_gen, hr, lr, cls, ce_weight=ce_weight,
                                      dpo=dpo and step >= dpo_start, dpo_weight=dpo_weight, dpo_beta=dpo_beta,
                                      dpo_reduce=dpo_reduce, reference=reference, drop_B=drop, reg_weight=reg_weight,
                                      own_B=own, l1_weight=l1_weight, lpips_weight=lpips_weight, lpips_fn=lpips_fn)
    parts.update({f'acc_s{n + 1}': a.detach()
                  for n, a in enumerate(scale_accuracy(acc, tcfg.rq_steps, tokenizer.quantizer.partition))})
    return loss, parts, None


# -----------------------------------------------------------------------------
# the loop, the same for every method

references, evaluate_method, batch = ((hvar_references, hvar_evaluate, hvar_batch) if hvar else
                                      (onepass_references, onepass_evaluate, onepass_batch))
factors = output_scales(generator) if hvar else (4,)
ref, fixed = references()
log('references: ' + ' '.join(f"{k} {v:.4f}" for k, v in ref.items()))


def evaluate(tag):
    generator.eval()
    out = evaluate_method(tag)
    generator.train()
    return out


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
            scores = evaluate(f'{step:06d}')
            log(f"eval step {step}: " + ' '.join(f"{k} {v:.4f}" for k, v in scores.items()))
            history['eval'].append(dict(step=step, **scores))
            save_curves(history, os.path.join(out_dir, 'curves.png'))
        per_rank = rank_states(state, ('sampler',))  # DDP: every rank's data and RNG state
        if master and (step > 0 or done):
            check_before_save(step, log, state, scores, saved_scores, collapse_db)  # never a broken one
            save_state(ckpt_path, state, 'generator', method=method, model_args=model_args, prior_args=prior_args,
                       config=config, tok_ckpt=path_record(tok_ckpt, ckpt_path), tok_id=tok_id,
                       tok_model_args=asdict(tcfg), tok_step=tok_step, step=step, minutes=minutes(),
                       metrics=scores, history=history, **per_rank)
            saved_scores = scores
    if done:
        break

    progress = rank0_number(minutes()) / max_minutes if max_minutes > 0 else step / decay_steps
    rate = learning_rate_at(step, progress, learning_rate, warmup_iters, learning_rate_floor)
    set_learning_rate(optimizer, rate)
    set_learning_rate(d_optimizer, rate * d_learning_rate / learning_rate)
    gan_on = gan_weight > 0 and step >= gan_start and not hvar
    optimizer.zero_grad(set_to_none=True)
    for micro in range(grad_accum):  # micro-batches; their mean gradient (over the ranks too) makes one step
        hr, lr = sampler.next()                     # (B, 3, crop, crop), (B, 3, crop/4, crop/4)
        with no_sync(train_step, micro == grad_accum - 1):  # DDP: one gradient all-reduce per step
            loss, parts, sr = batch(hr, lr, gan_on)
            (loss / grad_accum).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, grad_clip if grad_clip > 0 else math.inf)
    stop_if_diverged(step, log, grad_norm, loss=loss, **parts)
    optimizer.step()

    # discriminator step: HR is real, the decoded prediction (of the last micro-batch) fake
    parts['d'] = discriminator_step(train_disc, d_optimizer, vanilla_d_loss, hr, sr, ctx) if gan_on else torch.zeros(())

    step += 1
    imgs_since_log += hr.shape[0] * grad_accum * world
    if step % log_interval == 0:
        dt = time.time() - t_log
        parts = mean_items(dict(loss=loss, **parts))  # DDP: of all ranks
        history['train'].append(dict(step=step, **parts, rate=rate))
        log(f"step {step} | " + ' '.join(f"{k} {v:.4f}" for k, v in parts.items()) + f" | rate {rate:.2e} | "
            f"{1000 * dt / log_interval:.0f} ms/iter {imgs_since_log / dt:.1f} img/s | {minutes():.1f} min, "
            f"{time_left(step, max_iters, minutes(), max_minutes, start_step, elapsed_before)}")
        t_log, imgs_since_log = time.time(), 0

if master:
    prefixes = [f'x{f}_' for f in factors] if hvar else ['']
    final = dict(scores, **{p + k: ref[p + k] for p in prefixes for k in
                            ('bicubic_psnr_y', 'bicubic_ssim_y', 'bicubic_lpips', 'r_psnr_y', 'r_lpips')},
                 steps=step, minutes=round(minutes(), 2))
    write_json(final, os.path.join(out_dir, 'summary.json'))
    log(summary('generator', final))
ddp_cleanup()
