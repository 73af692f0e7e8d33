"""
Stage 1: train the coarse-to-fine grouped-VQ tokenizer (HiTokSR; SPEC.md section 1).

    python tokenizer.py config/tokenizer_tiny.py                 # 2-core CPU, ~9 minutes
    python tokenizer.py config/tokenizer_paper.py                # paper sizes, one GPU
    python tokenizer.py config/tokenizer_tiny.py --init_from=resume   # continue exactly

Each step encodes an HR crop, quantizes every group against its own codebook, keeps a random
prefix of k of the G groups (group masking), decodes, and compares the result with the Haar
low-pass of the crop at level G-k (frequency-matched target), so the first groups learn the
coarse image and later groups add detail. Loss: L1 + LPIPS + hinge GAN + commitment.
Ablations of the paper's Table 3 / Table 7 are one flag away:
    --groups=1 --codebook_size=1024      vanilla VQ with the same total codewords (4 x 256)
    --group_masking=False                no masking (always all groups)
    --dwt_targets=False                  masked decodes still compared with the full image
"""
import json
import os
import time
from dataclasses import asdict

import torch

import data
import eval as ev
from common import (Logger, Timer, atomic_save, autocast_ctx, load_checkpoint, lr_at, maybe_compile,
                    pick_device, rng_state, save_grid, set_lr, set_rng_state, summary, unwrap)
from configurator import configure, fail
from model import (PatchDiscriminator, Tokenizer, TokenizerConfig, g_loss_hinge, hinge_d_loss,
                   frequency_targets, param_groups, sample_active_groups, usage_stats)
from wavelets import lowpass  # prefix-decode targets at eval

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out/tokenizer'
init_from = 'scratch'     # 'scratch' | 'resume' (from out_dir/ckpt.pt: weights, optimizers, RNG, data)
eval_interval = 250       # steps between evaluations (metrics, PNG grid, checkpoint)
log_interval = 10         # steps between log lines
max_iters = 2000          # total optimizer steps
max_minutes = 0.0         # wall-clock budget in minutes (0 = none); the LR decay then follows time
lr_decay_iters = 0        # length of the cosine decay in steps (0 = max_iters)
# data
train_dir = 'assets/images/train'   # any folder of images (data.py prepares the default one)
val_dir = 'assets/val_pairs'        # HR crops of the fixed validation pairs
crop_size = 256           # HR training crop side, a multiple of patch
batch_size = 8
# model (SPEC.md section 1)
patch = 16                # HR pixels per token side
latent_dim = 32           # C
groups = 4                # G codebooks of latent_dim/groups channels each
codebook_size = 4096      # K codes per group
width = 768               # ViT width of encoder and decoder
depth = 12                # blocks in each of encoder and decoder
n_head = 12
beta = 0.25               # commitment weight inside L_commit (SPEC.md eq. L_commit)
vq_data_init = True       # codebook remedy 1: initialise codes from encoder outputs of batch 1
vq_restart = True         # codebook remedy 2: re-seed codes unused for a while from the batch
# coarse-to-fine training (the paper's Table 3 ablations)
group_masking = True      # keep a random prefix of k groups
p_full = 0.9              # P(k = G); otherwise k ~ U{1..G-1}
dwt_targets = True        # target for k groups = Haar lowpass(x, G-k); False: always x
# loss weights (SPEC.md: 1, 1, 0.8, 1)
l1_weight = 1.0
lpips_weight = 1.0
gan_weight = 0.8          # hinge GAN, fixed weight (no adaptive weight: simpler, stable at small scale)
commit_weight = 1.0
gan_start = 5000          # step at which the discriminator and the GAN term switch on
# optimizers (AdamW as in the paper; betas as in VQGAN)
lr = 1e-4
d_lr = 5e-5
betas = (0.5, 0.9)
weight_decay = 1e-4
grad_clip = 1.0
warmup_iters = 500
min_lr_ratio = 0.1
# system
device = 'auto'           # auto | cpu | cuda | mps
dtype = 'auto'            # auto (bf16 on GPUs that support it, fp32 on CPU) | float32 | bfloat16
compile = False           # torch.compile (used on CUDA only)
seed = 1337
threads = 0               # torch CPU threads (0 = torch's default)
config = configure(globals())
# -----------------------------------------------------------------------------


def check_config():
    problems = []
    if crop_size % patch:
        problems.append(f"crop_size={crop_size} must be a multiple of patch={patch}")
    if not 0.0 <= p_full <= 1.0:
        problems.append(f"p_full={p_full} must be in [0, 1]")
    if init_from not in ('scratch', 'resume'):
        problems.append(f"init_from={init_from!r} must be 'scratch' or 'resume'")
    if max_iters <= 0 and max_minutes <= 0:
        problems.append("set max_iters > 0 or max_minutes > 0")
    if problems:
        fail('tokenizer.py: ' + '; '.join(problems))


check_config()
try:  # validates G | C, K >= 2, head sizes ... before any data is loaded
    tcfg = TokenizerConfig.from_flat(config)
except ValueError as e:
    fail(f"tokenizer.py: {e}")
model_args = asdict(tcfg)
if threads:
    torch.set_num_threads(threads)
device = pick_device(device)
dtype, ctx = autocast_ctx(device, dtype)
torch.manual_seed(seed)
os.makedirs(out_dir, exist_ok=True)
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
ckpt = load_checkpoint(ckpt_path, 'stage-1 checkpoint to resume') if init_from == 'resume' else None
if ckpt is not None and ckpt['model_args'] != model_args:
    fail(f"resume: model settings differ from {ckpt_path}: saved {ckpt['model_args']}")
log = Logger(out_dir, config, resume=ckpt is not None)

# data: HR crops only (the tokenizer never sees LR images)
sampler = data.PairSampler(train_dir, crop_size, batch_size, seed=seed, device=device,
                           deg_cfg=data.DegradeConfig(mode='none'))
val = data.load_val_pairs(val_dir)
val_hr = val['hr']                                              # (N, 3, 256, 256) in [0, 1]
if val_hr.shape[-1] % patch or val_hr.shape[-2] % patch:
    fail(f"validation crops {tuple(val_hr.shape[-2:])} are not a multiple of patch={patch}")
mask_gen = torch.Generator().manual_seed(seed + 1)  # group-masking draws, saved for exact resume

# model, discriminator, LPIPS (frozen, real ImageNet AlexNet)
model = Tokenizer(tcfg).to(device)
disc = PatchDiscriminator().to(device)
lpips_net = ev.load_lpips(device)
optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)
d_optimizer = torch.optim.AdamW(disc.parameters(), lr=d_lr, betas=betas, weight_decay=weight_decay)
step, elapsed_before = 0, 0.0
if ckpt is not None:
    model.load_state_dict(ckpt['model'])
    disc.load_state_dict(ckpt['disc'])
    optimizer.load_state_dict(ckpt['optimizer'])
    d_optimizer.load_state_dict(ckpt['d_optimizer'])
    sampler.load_state_dict(ckpt['sampler'])
    mask_gen.set_state(ckpt['mask_gen'])
    set_rng_state(ckpt['rng'])
    step, elapsed_before = ckpt['step'], ckpt['minutes']
    log(f"resumed from {ckpt_path} at step {step}")
    del ckpt
train_model = maybe_compile(model, compile, device)
n_params = sum(p.numel() for p in model.parameters())
log(f"tokenizer: {n_params / 1e6:.2f}M params, {groups} groups x {codebook_size} codes x "
    f"{latent_dim // groups} dims, grid {crop_size // patch}x{crop_size // patch}, device {device}, {dtype}")


@torch.no_grad()
def evaluate(tag):
    """Reconstruct the validation HR crops with all groups and with every prefix k < G."""
    model.eval()
    recs, idxs = [], []
    for i in range(0, len(val_hr), 4):
        x = val_hr[i:i + 4].to(device)
        with ctx:
            xrec, idx, _, _ = model(x)
        recs.append(xrec.float().clamp(0, 1).cpu())
        idxs.append(idx.cpu())
    rec, idx = torch.cat(recs), torch.cat(idxs)                # (N,3,H,W), (N,G,h,w)
    m = ev.evaluate(rec, val_hr, crop_border=4, lpips_net=lpips_net)
    stats = usage_stats(idx, codebook_size)
    use, ppl = stats['util'], stats['perplexity']              # (G,), (G,)
    out = dict(r_psnr_y=m['psnr_y'], r_ssim_y=m['ssim_y'], r_lpips=m['lpips'],
               code_usage_min=float(use.min()), code_usage_mean=float(use.mean()),
               perplexity_min=float(ppl.min()))
    rows, labels = [val_hr[:6], rec[:6]], ['HR', 'reconstruction (all groups)']
    for k in range(1, groups):  # prefix decodes vs their Haar low-pass targets (Table 3)
        dec = torch.cat([model.decode_indices(idx[i:i + 4].to(device), k).float().clamp(0, 1).cpu()
                         for i in range(0, len(idx), 4)])
        target = lowpass(val_hr, groups - k)
        out[f'prefix_psnr_k{k}'] = float(ev.psnr(dec, target, crop_border=4).mean())
        rows += [dec[:6], target[:6]]
        labels += [f'decode with k={k} groups', f'target lowpass(x, {groups - k})']
    save_grid(rows, os.path.join(out_dir, f'samples_{tag}.png'), labels)
    model.train()
    return out, use, ppl


def save(metrics):
    atomic_save(dict(model=unwrap(model).state_dict(), disc=disc.state_dict(),
                     optimizer=optimizer.state_dict(), d_optimizer=d_optimizer.state_dict(),
                     sampler=sampler.state_dict(), mask_gen=mask_gen.get_state(), rng=rng_state(),
                     model_args=model_args, config=config, step=step, minutes=minutes(),
                     metrics=metrics), ckpt_path)


timer = Timer()
minutes = lambda: elapsed_before + timer.minutes()
decay_iters = lr_decay_iters or max_iters
metrics, t_log, imgs_since_log = {}, time.time(), 0
while True:
    out_of_time = max_minutes > 0 and minutes() >= max_minutes
    done = step >= max_iters or out_of_time
    if step % eval_interval == 0 or done:
        metrics, use, ppl = evaluate(f'{step:06d}')
        log(f"eval step {step}: " + ' '.join(f"{k} {v:.4f}" for k, v in metrics.items())
            + ' | usage ' + ' '.join(f"{u:.2f}" for u in use.tolist())
            + ' | ppl ' + ' '.join(f"{p:.0f}" for p in ppl.tolist()))
        if step > 0 or done:
            save(metrics)
    if done:
        break

    progress = minutes() / max_minutes if max_minutes > 0 else step / decay_iters
    lr_now = lr_at(step, progress, lr, warmup_iters, min_lr_ratio)
    set_lr(optimizer, lr_now)
    set_lr(d_optimizer, lr_now * d_lr / lr)
    x, _ = sampler.next()                                      # (B, 3, crop, crop)
    B = x.shape[0]
    k = sample_active_groups(B, groups, p_full if group_masking else 1.0, generator=mask_gen).to(x.device)
    target = frequency_targets(x, k, groups) if dwt_targets else x
    gan_on = gan_weight > 0 and step >= gan_start

    # generator (autoencoder) step: all groups quantized, groups > k zeroed before decoding
    with ctx:
        xrec, idx, commit, _ = train_model(x, k)
        l1 = (xrec.float() - target).abs().mean()
        lp = ev.lpips_dist(lpips_net, xrec.float(), target).mean() if lpips_weight > 0 else l1 * 0
        g = g_loss_hinge(disc(xrec)) if gan_on else l1 * 0
        loss = l1_weight * l1 + lpips_weight * lp + commit_weight * commit + gan_weight * g
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()

    # discriminator step: the frequency-matched target is "real" for its decode
    d = torch.zeros(())
    if gan_on:
        with ctx:
            d = hinge_d_loss(disc(target), disc(xrec.detach()))
        d_optimizer.zero_grad(set_to_none=True)
        d.backward()
        d_optimizer.step()

    step += 1
    imgs_since_log += B
    if step % log_interval == 0:
        dt = time.time() - t_log
        log(f"step {step} | loss {loss.item():.4f} l1 {l1.item():.4f} lpips {lp.item():.4f} "
            f"commit {commit.item():.4f} g {g.item():.4f} d {d.item():.4f} | lr {lr_now:.2e} | "
            f"{1000 * dt / log_interval:.0f} ms/iter {imgs_since_log / dt:.1f} img/s | {minutes():.1f} min")
        t_log, imgs_since_log = time.time(), 0

final = dict(metrics, steps=step, minutes=round(minutes(), 2),
             **{f'code_usage_g{g_}': float(u) for g_, u in enumerate(use.tolist())})
with open(os.path.join(out_dir, 'summary.json'), 'w') as f:
    json.dump(final, f, indent=1)
log(summary('tokenizer', final))
