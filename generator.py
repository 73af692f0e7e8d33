"""
Stage 2: train the token generator. Two methods, one loop, chosen by `method`:
  'hitoksr': the semantic-guided generator with reconstruction-aware losses (HiTokSR + TVQ&RAP;
             docs/method.md#generator), on a grouped-VQ tokenizer: all tokens in one pass.
  'hvar':    H-VAR's next-scale generator (docs/method.md#next-scale-generator) on a multi-scale RQ
             tokenizer: step by step, CE + DPO; one pass yields the x1, x2 and x4 outputs.
  'tvq':     TVQ&RAP's predictor (docs/method.md#texture-predictor) on a texture-VQ tokenizer: the
             'hitoksr' loop with one texture head and a structure-map head, + struct_weight * MSE(F_L).

    python generator.py config/generator_tiny.py                 # 2-core CPU, ~10 minutes
    python generator.py config/generator_paper.py                # paper sizes, one GPU
    python generator.py config/generator_hvar_tiny.py            # H-VAR, 2-core CPU
    python generator.py config/generator_tvq_tiny.py             # texture VQ, 2-core CPU
    python generator.py config/generator_tiny.py --init_from=resume   # continue exactly
    torchrun --standalone --nproc_per_node=8 generator.py config/generator_paper.py   # 8 GPUs (DDP)

H-VAR: each step degrades an HR crop (or, for bilinear_frac of the pairs, only downsamples it
bilinearly: class 1; cond_drop of them get the null class 2, with no condition), takes the frozen
tokenizer's hierarchical tokens z_HR of the HR crop as targets and, for DPO, those of the LR
upsampled bilinearly, z_LR; the condition is the encoder's features of that upsampled LR. Loss:
    ce_weight * CE(z_HR) + dpo_weight * -log sigmoid(dpo_beta * (log p(z_HR) - log p(z_LR)))
with the log-likelihoods of both sequences under teacher forcing. Ablations: --dpo=False,
--hvar_tokens=plain (the plain RQ tokens of the same tokenizer: no valid x1 / x2), --bilinear_frac=0.

HiTokSR:
each step degrades an HR crop to LR (Real-ESRGAN), takes the frozen stage-1 tokenizer's indices of
the HR crop as targets (q_HR), runs the prior (ImageNet EfficientNet-Lite0 + LoRA) on the LR image
upsampled to HR size, and predicts all G x h x w indices in one pass. Loss
(docs/method.md#generator-loss):
    ce_weight * CE(logits, q_HR) + repa_weight * REPA + l1_weight * L1 + lpips_weight * LPIPS
    + gan_weight * GAN_vanilla
the pixel terms on the decoded straight-through one-hot, D(sum_k w_k e_k), w = ste_onehot(logits):
the decoder and codebooks stay frozen but pass gradients to the logits. The prior's LoRA learns
from every term through the SFT / CLS inputs and from REPA. Ablations are one flag away:
    --use_prior=False          no prior at all (implies no SFT, no CLS tokens, no REPA, no LoRA)
    --use_sft=False  --cls_tokens=none|single  --lora_rank=0 (frozen prior; REPA then has nothing
    to train and is skipped)   --repa_weight=0  --l1_weight=0 --lpips_weight=0 --gan_weight=0 (CE only)
"""
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
                    set_learning_rate, setting_problems, stop_if_diverged, summary, weights_id, write_json)
from configurator import config_from_settings, configure, fail
from degradation import DegradeConfig, bicubic_upsample
from model import (CLASS_BILINEAR, CLASS_DEGRADED, CLASS_NULL, Generator, GeneratorConfig, NextScaleConfig,
                   NextScaleGenerator, TextureGenerator, TextureGeneratorConfig, Tokenizer, TokenizerConfig)
from losses import (PatchDiscriminator, calibrate_codebook_head, discriminator_step, generator_losses, hvar_losses,
                    scale_accuracy, vanilla_d_loss)
from sr import hvar_chain_rows, hvar_sr, output_scales, super_resolve
from prior import LoRAWeights, build_sr_prior

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out/generator'
init_from = 'scratch'     # 'scratch' | 'resume' (from out_dir/ckpt.pt: weights, optimizers, RNG, data)
overwrite = False         # True: a scratch run may replace an earlier run's out_dir/ckpt.pt (else refused)
tok_ckpt = 'out/tokenizer/ckpt.pt'  # frozen stage-1 tokenizer (codebooks + decoder, targets q_HR)
method = 'hitoksr'        # 'hitoksr' (grouped-VQ tokenizer, one pass, prior, pixel losses) | 'hvar' (msrq tokenizer,
                          # next-scale) | 'tvq' (texture-VQ tokenizer: texture indices + structure map, one pass)
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
# H-VAR (method='hvar'; docs/method.md#next-scale-generator); it has no prior and no pixel losses
hvar_tokens = 'hierarchical'  # targets: 'hierarchical' (Algorithm 1) | 'plain' (full-size RQ, no valid x1 / x2)
head = 'linear'           # output head: 'linear' (width -> K logits) | 'codebook' (distances to the tokenizer's codes,
                          # from the encoder's latent of the upsampled LR; 'hvar' and 'hitoksr')
dpo = True                # the DPO regulariser (needs z_LR: a second sequence in the same forward pass)
dpo_beta = 0.2
dpo_weight = 1.0          # equal weight with CE, as the paper
bilinear_frac = 0.1       # pairs whose LR is only a bilinear downsample of HR (class 1), <= 0.25
cond_drop = 0.1           # pairs with the null class and no condition (for optional CFG at inference)
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
struct_weight = 1.0       # method='tvq': MSE of the predicted structure map F_L (TVQ&RAP Eq. 9)
ce_weight = 1.0           # (TVQ&RAP: 0.5)
repa_weight = 1.0
l1_weight = 1.0
lpips_weight = 1.0
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
    if max_iters <= 0 and max_minutes <= 0:
        problems.append("set max_iters > 0 or max_minutes > 0")
    if degradation not in ('realesrgan', 'bicubic'):
        problems.append(f"degradation={degradation!r} must be 'realesrgan' or 'bicubic'")
    if jpeg_impl not in ('torch', 'pil'):
        problems.append(f"jpeg_impl={jpeg_impl!r} must be 'torch' or 'pil'")
    if patch < 1:
        problems.append(f"patch={patch} must be >= 1")
    elif crop_size % patch:
        problems.append(f"crop_size={crop_size} must be a multiple of patch={patch}")
    for k in ('ce_weight', 'repa_weight', 'l1_weight', 'lpips_weight', 'gan_weight', 'lora_rank', 'struct_weight'):
        if globals()[k] < 0:
            problems.append(f"{k}={globals()[k]} must be >= 0 (0 disables it)")
    if ce_weight == l1_weight == lpips_weight == gan_weight == 0:
        problems.append("every generator loss weight is 0: nothing would train the generator")
    if not os.path.isfile(tok_ckpt):
        problems.append(f"tok_ckpt='{tok_ckpt}' not found: train stage 1 first "
                        f"(python tokenizer.py config/tokenizer_tiny.py) or pass --tok_ckpt=PATH")
    if method not in ('hitoksr', 'hvar', 'tvq'):
        problems.append(f"method={method!r} must be 'hitoksr', 'hvar' or 'tvq'")
    if hvar_tokens not in ('hierarchical', 'plain'):
        problems.append(f"hvar_tokens={hvar_tokens!r} must be 'hierarchical' or 'plain'")
    if not 0 <= bilinear_frac <= 0.25:
        problems.append(f"bilinear_frac={bilinear_frac} must be in [0, 0.25] (H-VAR uses a small fraction)")
    if not 0 <= cond_drop < 1 or bilinear_frac + cond_drop >= 1:
        problems.append(f"cond_drop={cond_drop} must be in [0, 1) with bilinear_frac + cond_drop < 1")
    if dpo_beta <= 0 or dpo_weight < 0:
        problems.append(f"dpo_beta={dpo_beta} must be > 0 and dpo_weight={dpo_weight} >= 0")
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
hvar, tvq = method == 'hvar', method == 'tvq'
QUANTIZER_OF = dict(hitoksr='grouped', hvar='msrq', tvq='tvq')  # the tokens each method predicts
KIND = dict(grouped=('grouped-VQ', 'tokenizer_tiny'), msrq=('multi-scale RQ', 'tokenizer_hrq_tiny'),
            tvq=('texture-VQ', 'tokenizer_tvq_tiny'))
if QUANTIZER_OF[method] != tcfg.quantizer:
    (want, cfg_want), (have, _) = KIND[QUANTIZER_OF[method]], KIND[tcfg.quantizer]
    fit = next(m for m, q in QUANTIZER_OF.items() if q == tcfg.quantizer)
    fail(f"generator.py: method='{method}' predicts {want} tokens, but {tok_ckpt} is a {have} tokenizer "
         f"(quantizer='{tcfg.quantizer}'): use --method={fit}, or train stage 1 with config/{cfg_want}.py")
if tvq and crop_size % (patch * tcfg.tvq_struct_pool):
    fail(f"generator.py: crop_size={crop_size} must be a multiple of patch x tvq_struct_pool = "
         f"{patch * tcfg.tvq_struct_pool} (the tokenizer's structure cell)")
if hvar and crop_size != tcfg.rq_steps[-1] * tcfg.patch:
    fail(f"generator.py: crop_size={crop_size}, but the H-VAR generator works at its tokenizer's native size "
         f"rq_steps[-1] x patch = {tcfg.rq_steps[-1] * tcfg.patch} (set --crop_size to it)")
if tcfg.patch != patch:
    fail(f"generator.py: patch={patch} but the tokenizer {tok_ckpt} has patch={tcfg.patch}: the "
         f"generator predicts one index per tokenizer token, set --patch={tcfg.patch}")
if not use_prior or hvar:  # the one-flag "no prior" ablation switches off everything that needs it
    use_prior, use_sft, cls_tokens, repa_weight, lora_rank = False, False, 'none', 0.0, 0  # (H-VAR has none)
    config.update(use_prior=use_prior, use_sft=use_sft, cls_tokens=cls_tokens, repa_weight=repa_weight,
                  lora_rank=lora_rank)
torch.manual_seed(seed)  # before the prior: its LoRA A matrices are drawn at construction
prior_args = dict(name=prior_name, feat_tap=prior_feat_tap, lora_rank=lora_rank,
                  lora_alpha=lora_alpha) if use_prior else None
try:
    prior = build_sr_prior(prior_args)
    if hvar:
        gcfg = config_from_settings(NextScaleConfig, config, scale=4, latent_dim=tcfg.latent_dim,
                                    codebook_size=tcfg.codebook_size, rq_steps=tcfg.rq_steps,
                                    rq_scales=tcfg.rq_scales, hierarchical=hvar_tokens == 'hierarchical')
    else:  # the texture-VQ generator: the same, plus the tokenizer's structure-map shape
        derived = dict(scale=4, groups=tcfg.groups, codebook_size=tcfg.codebook_size, latent_dim=tcfg.latent_dim,
                       feat_dim=prior.feat_dim if prior else 0, pooled_dims=tuple(prior.pooled_dims) if prior else ())
        if tvq:
            derived.update(struct_dim=tcfg.tvq_struct_dim, struct_pool=tcfg.tvq_struct_pool)
        gcfg = config_from_settings(TextureGeneratorConfig if tvq else GeneratorConfig, config, **derived)
except (ValueError, ImportError) as e:
    fail(f"generator.py: {e}")
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
tok_id = weights_id(tokenizer.state_dict())  # the chain's identity check (sr.load_sr_chain)
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
    generator.tie_codebook(tokenizer.quantizer.codebook[0] if hvar else tokenizer.quantizer.codebook)
if prior is not None:
    prior.to(device)
disc = PatchDiscriminator().to(device).requires_grad_(False)
lpips_net = metrics.load_lpips(device)
lpips_fn = lambda x, y: metrics.lpips_dist(lpips_net, x, y)  # (B,) distances
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
if hvar:  # no prior, no discriminator
    for k in ('prior_lora', 'disc', 'd_optimizer'):
        del state[k]
step, elapsed_before = load_state(ckpt, state) if ckpt is not None else (0, 0.0)
history = (ckpt or {}).get('history', dict(train=[], eval=[]))  # what curves.png shows, kept on resume
saved_scores = (ckpt or {}).get('metrics')  # the evaluation of the checkpoint a save replaces
log(f"resumed from {ckpt_path} at step {step}" if ckpt is not None else f"training from scratch into {out_dir}")
if head == 'codebook' and ckpt is None:  # data init of the temperature(s), on one training batch
    ce0, ce1 = calibrate_codebook_head(generator, tokenizer, prior, *sampler.next())
    with torch.no_grad():
        from_rank0_(generator.log_t)  # DDP: every rank keeps rank 0's value (the ranks' batches differ)
    log("codebook head: inverse temperature " + ' '.join(f"{t:.1f}" for t in generator.log_t.exp().flatten().tolist())
        + f" (cross-entropy on one training batch{'' if hvar else ', mean over the groups'} {ce0:.3f} -> {ce1:.3f})")
ckpt = None  # free the loaded tensors
train_gen = maybe_compile(generator, compile, device)
n_lora = sum(p.numel() for p in LoRAWeights(prior).state_dict().values())
h_tok = crop_size // patch
if hvar:
    log(f"H-VAR generator: {count_params(generator) / 1e6:.2f}M params, {tcfg.codebook_size} logits ({head} head), "
        f"{generator.n_cond} condition + {sum(generator.sizes[1:])} image tokens ({hvar_tokens} targets, steps "
        f"{tcfg.rq_steps}, scales {tcfg.rq_scales}), dpo {dpo} (beta {dpo_beta}), bilinear_frac {bilinear_frac}, "
        f"cond_drop {cond_drop}, tokenizer {tok_ckpt} step {tok_step}, device {device}, {dtype}"
        + (f", DDP over {world} processes" if world > 1 else ''))
else:
    log(f"generator: {count_params(generator) / 1e6:.2f}M params, LoRA "
        f"{n_lora / 1e6:.3f}M, {tcfg.groups} heads x {tcfg.codebook_size} logits ({head} head), grid {h_tok}x{h_tok}, "
        + (f"structure map {tcfg.tvq_struct_dim} x {h_tok // tcfg.tvq_struct_pool}x{h_tok // tcfg.tvq_struct_pool}, "
           if tvq else '') +
        f"prior {prior_name if prior else 'none'} (sft {use_sft}, cls {cls_tokens}, lora rank {lora_rank}, "
        f"repa {'on' if repa_on else 'off'}), tokenizer {tok_ckpt} step {tok_step}, device {device}, {dtype}"
        + (f", DDP over {world} processes" if world > 1 else ''))


# fixed references on the validation pairs: the tokenizer's indices of HR (the targets of the token
# accuracy), its reconstruction (an upper bound for SR through this decoder) and bicubic upsampling
METRICS = ('psnr_y', 'ssim_y', 'lpips', 'grid', 'color_err')
scores = lambda sr, hr, border: {k: v for k, v in metrics.evaluate(sr, hr, border, lpips_net, patch=patch).items()
                                 if k in METRICS}
val_bic = bicubic_upsample(val_lr)
if hvar:  # per output factor f (x1, x2, x4): the LR itself / bicubic, and the decode of HR's tokens
    factors = output_scales(generator)
    ref = {f"x{r['f']}_{'bicubic' if r['kind'] == 'base' else 'r'}_{k}": r[k] for k in METRICS
           for r in hvar_chain_rows(val, tokenizer, generator, lpips_net, 4, device, kinds=('base', 'decode'))}
    ref.update({k[3:]: v for k, v in ref.items() if k.startswith('x4_')})  # r_*, bicubic_* at x4
    native = crop_size // 4
    val_crop_hr, val_crop_lr = val_hr[..., :crop_size, :crop_size], val_lr[..., :native, :native]
else:
    val_q, = batched(lambda x: (tokenizer.encode(x)[1].cpu(),), val_hr, device=device)  # (N, G, h, w)
    if tvq:  # texture indices decoded with the tokenizer's own structure map of HR (also a target)
        val_rec, val_fl = batched(lambda x: (tokenizer(x)[0].float().clamp(0, 1).cpu(), tokenizer.encode_tvq(x)[4].cpu()),
                                  val_hr, device=device)
    else:
        val_rec, = batched(lambda q: (tokenizer.decode_indices(q).float().clamp(0, 1).cpu(),), val_q, device=device)
    ref = {f'r_{k}': v for k, v in scores(val_rec, val_hr, 4).items()}
    ref.update({f'bicubic_{k}': v for k, v in scores(val_bic, val_hr, 4).items()})
log('references: ' + ' '.join(f"{k} {v:.4f}" for k, v in ref.items()))


@torch.no_grad()
def evaluate_hvar(tag):
    """H-VAR: x1, x2, x4 of the degraded validation LR from one top-1 pass per tile (tiles of the
    native size, as sr.py), each scored against HR resized to its size next to bicubic; token
    accuracy per step and scale under teacher forcing on the top-left native crops."""
    outs = hvar_sr(val_lr, tokenizer, generator, device)                          # {f: (N, 3, f h, f w)}
    out = {f"x{r['f']}_{k}": r[k] for r in hvar_chain_rows(val, tokenizer, generator, lpips_net, 4, device,
                                                              kinds=('sr',), outs=outs) for k in METRICS}
    out['lpips_vs_bicubic'] = out['x4_lpips'] / ref['bicubic_lpips']
    cls = torch.full((len(val_crop_hr),), CLASS_DEGRADED, device=device)
    _, parts, acc = hvar_losses(dict(config, dpo=True), tokenizer, generator, val_crop_hr.to(device),
                                val_crop_lr.to(device), cls)
    out.update(val_ce=float(parts['ce']), val_logp_gap=float(parts['logp_gap']), token_acc_mean=float(acc.mean()))
    out.update({f'token_acc_s{n + 1}': a for n, a in enumerate(scale_accuracy(acc, tcfg.rq_steps, tokenizer.quantizer.partition))})
    out.update({f'token_acc_step{i + 1}': float(a) for i, a in enumerate(acc)})
    rows = [F.interpolate(val_lr[:6], scale_factor=4, mode='nearest'), val_bic[:6]] + [outs[f][:6] for f in factors]
    save_grid(rows + [val_hr[:6]], os.path.join(out_dir, f'samples_{tag}.png'),
              ['LR (nearest)', 'bicubic'] + [f'H-VAR x{f} (top-1, nearest-upsampled)' for f in factors] + ['HR'])
    return out


@torch.no_grad()
def evaluate(tag):
    """Super-resolve the degraded validation LR with top-1 tokens; score next to bicubic."""
    generator.eval()
    if hvar:
        out = evaluate_hvar(tag)
        generator.train()
        return out
    sr, idx = batched(lambda y: [t.cpu() for t in super_resolve(y, tokenizer, generator, prior, True)],
                      val_lr, device=device)
    acc = (idx == val_q).float().mean(dim=(0, 2, 3))                           # (G,)
    m = metrics.evaluate(sr, val_hr, crop_border=4, lpips_net=lpips_net, patch=patch)
    out = dict(psnr_y=m['psnr_y'], ssim_y=m['ssim_y'], lpips=m['lpips'], grid=m['grid'], color_err=m['color_err'],
               lpips_vs_bicubic=m['lpips'] / ref['bicubic_lpips'], token_acc_mean=float(acc.mean()))
    out.update({f'token_acc_g{g}': float(a) for g, a in enumerate(acc.tolist())})
    if tvq:  # the predicted structure map against the tokenizer's map of HR
        f_l, = batched(lambda y: (generator(y)[1].float().cpu(),), val_lr, device=device)
        out['struct_mse'] = float((f_l - val_fl).pow(2).mean())
    save_grid([F.interpolate(val_lr[:6], scale_factor=4, mode='nearest'), val_bic[:6], sr[:6], val_hr[:6]],
              os.path.join(out_dir, f'samples_{tag}.png'), ['LR (nearest)', 'bicubic', 'SR (top-1)', 'HR'])
    generator.train()
    return out


timer = Timer()
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
        B = hr.shape[0]
        if hvar:  # input kinds: degraded (0), bilinear-only (1, LR replaced), null (2, no condition)
            u = torch.rand(B).to(device)
            cls = torch.where(u < bilinear_frac, CLASS_BILINEAR,
                              torch.where(u < bilinear_frac + cond_drop, CLASS_NULL, CLASS_DEGRADED))
            bil = F.interpolate(hr, scale_factor=0.25, mode='bilinear', align_corners=False, antialias=True)
            lr = torch.where((cls == CLASS_BILINEAR)[:, None, None, None], bil.clamp(0, 1), lr)
        else:
            with torch.no_grad():  # targets of the frozen tokenizer: q_HR (B, G, h, w) [, F_L (B, C_L, h/r, w/r)]
                _, q_hr, _, _, *f_l_hr = tokenizer.encode_tvq(hr) if tvq else tokenizer.encode(hr)
        with no_sync(train_step, micro == grad_accum - 1):  # DDP: one gradient all-reduce per step
            with ctx:  # generator + LoRA (the discriminator is frozen outside discriminator_step)
                if hvar:
                    loss, parts, acc = train_step(hvar_losses, config, tokenizer, train_gen, hr, lr, cls)
                else:
                    loss, parts, logits, sr = train_step(generator_losses, config, tokenizer, train_gen, prior,
                                                         lpips_fn, disc, hr, lr, q_hr, gan_on, *f_l_hr)
            (loss / grad_accum).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, grad_clip if grad_clip > 0 else math.inf)
    stop_if_diverged(step, log, grad_norm, loss=loss, **parts)
    optimizer.step()

    # discriminator step: HR is real, the decoded prediction (of the last micro-batch) fake
    d = discriminator_step(train_disc, d_optimizer, vanilla_d_loss, hr, sr, ctx) if gan_on else torch.zeros(())

    step += 1
    imgs_since_log += B * grad_accum * world
    if step % log_interval == 0:
        dt = time.time() - t_log
        if hvar:  # token accuracy per target scale
            parts.update({f'acc_s{n + 1}': torch.tensor(a) for n, a in enumerate(scale_accuracy(acc, tcfg.rq_steps, tokenizer.quantizer.partition))})
        else:
            parts.update(d=d, acc=(logits.detach().argmax(-1) == q_hr).float().mean())
        parts = mean_items(dict(loss=loss, **parts))  # DDP: of all ranks
        history['train'].append(dict(step=step, **parts, rate=rate))
        log(f"step {step} | " + ' '.join(f"{k} {v:.4f}" for k, v in parts.items()) + f" | rate {rate:.2e} | "
            f"{1000 * dt / log_interval:.0f} ms/iter {imgs_since_log / dt:.1f} img/s | {minutes():.1f} min")
        t_log, imgs_since_log = time.time(), 0

if master:
    prefixes = [f'x{f}_' for f in factors] if hvar else ['']
    final = dict(scores, **{p + k: ref[p + k] for p in prefixes for k in
                             ('bicubic_psnr_y', 'bicubic_ssim_y', 'bicubic_lpips', 'r_psnr_y', 'r_lpips')},
                 steps=step, minutes=round(minutes(), 2))
    write_json(final, os.path.join(out_dir, 'summary.json'))
    log(summary('generator', final))
ddp_cleanup()
