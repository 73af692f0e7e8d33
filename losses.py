"""
Every training objective of the three stages, one function per loss, next to each other: a new
method adds its loss here and a setting that selects it in its stage script
(docs/method.md has the equations; comments point to its sections).

    1. Stage 1               codebook usage, group masking draws, frequency-matched (Haar low-pass) targets, edge loss
    2. GAN                   PatchDiscriminator, hinge and vanilla losses, adaptive weight, discriminator_step
    3. Stage 2, HiTokSR/TVQ  straight-through one-hot, generator_losses (CE + REPA + pixel terms)
    4. Stage 2, H-VAR        the inputs' classes, sequence log-likelihood, DPO, hvar_losses (CE + DPO under
                             teacher forcing)

The models they train are in model.py; the VQ commitment terms live with the quantizers there.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import metrics
from model import (CLASS_BILINEAR, CLASS_DEGRADED, CLASS_FREE, NextScaleGenerator, code_counts, hvar_condition, lr_anchor,
                   nearest_code, resize_image, stats_from_counts)
from wavelets import lowpass

# -----------------------------------------------------------------------------
# 1. Stage 1: codebook usage, group masking and frequency-matched targets

def usage_stats(idx_BGhw, codebook_size):
    """Per-group utilisation and perplexity of a batch of indices (model.stats_from_counts). One
    batch sees at most B*h*w codes: accumulate code_counts over several batches for a K-sized estimate."""
    return stats_from_counts(code_counts(idx_BGhw, codebook_size))


def step_usage(idxs, codebook_size):
    """Per-step and shared codebook health of multi-scale RQ indices [idx (B, h_i, w_i)] * L:
    -> dict(util, perplexity) each (L + 1,): steps 1..L, then all steps together."""
    counts = torch.cat([code_counts(i[:, None], codebook_size) for i in idxs])  # (L, K)
    return stats_from_counts(torch.cat([counts, counts.sum(0, keepdim=True)]))


# group masking and frequency-matched targets (docs/method.md#group-masking, #frequency-targets)

def sample_active_groups(B, G, p_full=0.9, generator=None, device=None):
    """Number of active groups per sample, (B,) long: G with prob. p_full, else uniform in 1..G-1.
    G == 1 always gives 1."""
    if G == 1:
        return torch.ones(B, dtype=torch.long, device=device)
    full = torch.rand(B, generator=generator, device=device) < p_full
    partial = torch.randint(1, G, (B,), generator=generator, device=device)
    return torch.where(full, torch.full_like(partial, G), partial)


def frequency_targets(x, k, G):
    """Frequency-matched supervision (docs/method.md#frequency-targets): the target of a decode
    with k active groups is the Haar low-pass lowpass(x, G - k); k = G gives x itself.
    x (B,3,H,W), k (B,) long."""
    target = x.clone()
    for kv in k.unique().tolist():
        if kv < G:
            sel = k == kv
            target[sel] = lowpass(x[sel], G - kv)
    return target


def gradient_l1(x, target):
    """Edge loss: mean |D x - D target| over the horizontal and vertical neighbour differences
    D (docs/method.md#edge-loss). An edge the target does not have, such as a seam where two
    tokens' patches meet, costs here even when it barely moves the plain L1."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]                      # (B, 3, H, W-1)
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]                      # (B, 3, H-1, W)
    return ((dx(x) - dx(target)).abs().mean() + (dy(x) - dy(target)).abs().mean()) / 2


def perceptual_fn(net, lpips_batch=0):
    """The stages' perceptual loss: (x, y) (B, 3, H, W) in [0, 1] -> (k,) LPIPS distances under net of
    the first k = lpips_batch crops (all when 0). The crops are random, so the first k are a random
    subset: VGG16 is most of a CPU step (docs/method.md#metrics)."""
    k = lpips_batch if lpips_batch > 0 else None
    return lambda x, y: metrics.lpips_dist(net, x[:k], y[:k])


# -----------------------------------------------------------------------------
# 2. GAN: PatchGAN discriminator and losses (VQGAN / taming-transformers)

class PatchDiscriminator(nn.Module):
    """taming's NLayerDiscriminator (pix2pix PatchGAN): 4x4 convs, stride 2 for n_layers, then
    two stride-1 convs; 256x256 -> 30x30 logits for n_layers=3. GroupNorm (default) instead of
    BatchNorm: batch statistics at batch 1-4 are noisy and differ between real and fake batches;
    norm='batch' gives taming's original."""
    def __init__(self, in_ch=3, ndf=64, n_layers=3, norm='group'):
        super().__init__()
        if norm not in ('group', 'batch'):
            raise ValueError(f"PatchDiscriminator: norm={norm!r}, expected 'group' or 'batch'")
        mk_norm = (lambda ch: nn.GroupNorm(math.gcd(32, ch), ch)) if norm == 'group' else nn.BatchNorm2d
        layers = [nn.Conv2d(in_ch, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = ndf
        for n in range(1, n_layers + 1):
            out = ndf * min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), mk_norm(out),
                       nn.LeakyReLU(0.2, True)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # taming weights_init
            if isinstance(m, (nn.Conv2d, nn.GroupNorm, nn.BatchNorm2d)):
                nn.init.normal_(m.weight, 0.0 if isinstance(m, nn.Conv2d) else 1.0, 0.02)
            if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        """x (B, 3, H, W) in [0, 1] -> logits (B, 1, h', w')."""
        return self.main(x * 2 - 1)


def hinge_d_loss(real_logits, fake_logits):
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def vanilla_d_loss(real_logits, fake_logits):
    return 0.5 * (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean())


def g_loss_hinge(fake_logits):
    return -fake_logits.mean()


def g_loss_vanilla(fake_logits):
    return F.softplus(-fake_logits).mean()  # non-saturating -log sigmoid(D(fake))


def adaptive_gan_weight(nll_loss, g_loss, last_layer):
    """taming's calculate_adaptive_weight: ||grad nll|| / (||grad g|| + 1e-4) at the decoder's last
    layer, clamped to [0, 1e4] and detached; the caller multiplies by its lambda_gan."""
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    return torch.clamp(w, 0.0, 1e4).detach()


def discriminator_step(disc, d_optimizer, d_loss, real, fake, ctx):
    """One discriminator update, shared by every stage: d_loss(D(real), D(sg[fake])), backward,
    step. The discriminator is left frozen (requires_grad False) so that the next generator step's
    backward through D(fake) collects no gradient in it; -> the detached D loss."""
    disc.requires_grad_(True)
    with ctx:
        d = d_loss(disc(real), disc(fake.detach()))
    d_optimizer.zero_grad(set_to_none=True)
    d.backward()
    d_optimizer.step()
    disc.requires_grad_(False)
    return d.detach()


# -----------------------------------------------------------------------------
# 3. Stage 2, HiTokSR and TVQ&RAP: token CE and reconstruction-aware terms (docs/method.md#generator-loss)

def ste_onehot(logits):
    """Straight-through one-hot (docs/method.md#reconstruction-aware-losses): logits (..., K) -> w (..., K) whose
    forward is exactly one_hot(argmax) and whose gradient is that of softmax(logits).
    Written onehot + (p - sg[p]) rather than p + sg[onehot - p]: equal in value and gradient, but
    p + (1 - p) can round away from 1, while p - p is exactly 0, so w is bit-exactly one-hot and the
    decoded image equals tokenizer.decode_indices(argmax)."""
    p = logits.float().softmax(-1)
    onehot = F.one_hot(p.argmax(-1), p.shape[-1]).to(p.dtype)
    return onehot + (p - p.detach())


def generator_losses(tokenizer, generator, prior, hr, lr, q_hr, f_l_hr=None, *, ce_weight, repa_weight, l1_weight,
                     lpips_weight, gan_weight=0.0, struct_weight=0.0, train_prior=False, lpips_fn=None, disc=None,
                     gan_on=False):
    """The stage-2 loss of one batch of a one-pass generator, HiTokSR's (docs/method.md#generator-loss)
    and TVQ&RAP's predictor, for generator.py and bench.py:
        ce_weight * CE(logits, q_HR) + repa_weight * REPA + l1_weight * L1 + lpips_weight * LPIPS
        + gan_weight * GAN_vanilla,
    the pixel terms on the decoded straight-through one-hot D(sum_k w_k e_k), w = ste_onehot(logits)
    (the frozen decoder and codebooks pass gradients to the logits). generator: the module to call
    (compiled or not); prior: None or the prior whose LoRA trains when train_prior; lpips_fn(x, y) -> (B,)
    and disc (the discriminator, used when gan_on) are needed only when their weights are > 0;
    hr (B, 3, H, W), lr (B, 3, H/4, W/4), q_hr (B, G, h, w) the tokenizer's indices of hr.
    A TextureGenerator also predicts the structure map: + struct_weight * MSE(F_L_pred, f_l_hr)
    (TVQ&RAP Eq. 9, with f_l_hr the tokenizer's map of hr), and the image is decoded from the
    texture one-hot and the predicted F_L (docs/method.md#texture-predictor).
    -> (loss, parts: dict of the unweighted terms, logits (B, G, h, w, K), sr (B, 3, H, W) or None)."""
    from prior import frozen_features, repa_loss, upsample_for_prior  # local, as in super_resolve
    zero = torch.zeros((), device=hr.device)
    ce = repa = l1 = lp = g = zero
    sr = feat = pooled = None
    if prior is not None:
        with torch.set_grad_enabled(train_prior):
            feat, pooled = prior(upsample_for_prior(lr))
        if repa_weight > 0 and train_prior:  # 1 - cos(VFM_lora(y_up), sg[VFM_frozen(x)]), #repa
            repa = repa_loss(feat.float(), frozen_features(prior, hr)[0].float())
    anchor = lr_anchor(tokenizer, lr) if generator.config.head == 'codebook' else None  # the codebook head's start
    out = generator(lr, feat, pooled, anchor)                # logits (B, G, h, w, K) [, F_L (B, C_L, h/r, w/r)]
    logits, f_l = out if isinstance(out, tuple) else (out, None)
    if ce_weight > 0:
        ce = F.cross_entropy(logits.float().flatten(0, 3), q_hr.flatten())
    struct = F.mse_loss(f_l.float(), f_l_hr.float()) if f_l is not None else zero
    if l1_weight > 0 or lpips_weight > 0 or gan_on:  # reconstruction-aware terms
        zq = tokenizer.quantizer.codes_from_onehot(ste_onehot(logits))  # (B, C, h, w)
        sr = tokenizer.decode(zq, f_l).float()               # no parameter of the decoder changes
        l1 = (sr - hr).abs().mean() if l1_weight > 0 else zero
        lp = lpips_fn(sr, hr).mean() if lpips_weight > 0 else zero
        g = g_loss_vanilla(disc(sr)) if gan_on else zero
    loss = ce_weight * ce + repa_weight * repa + l1_weight * l1 + lpips_weight * lp + gan_weight * g
    parts = dict(ce=ce, repa=repa, l1=l1, lpips=lp, g=g)
    if f_l is not None:
        loss = loss + struct_weight * struct
        parts['struct'] = struct
    return loss, parts, logits, sr


@torch.no_grad()
def calibrate_codebook_head(generator, tokenizer, prior, hr, lr):
    """Data init of a codebook head's temperature(s) on one training batch (docs/method.md#codebook-head):
    H-VAR's on the teacher-forced sequences of its targets, the one-pass generator's per group,
    from the LR's own latent. -> (CE before, CE after)."""
    from prior import upsample_for_prior
    c = generator.config
    if isinstance(generator, NextScaleGenerator):
        cls = torch.full((len(hr),), CLASS_DEGRADED, device=hr.device)
        _, conds = hvar_condition(tokenizer, generator, lr)
        z_hr = msrq_tokens(tokenizer, hr, c.hierarchical)
        logits = generator(conds, generator.step_inputs(tokenizer.quantizer, conds, z_hr), cls)     # (B, N, K)
        return generator.codes.calibrate_temperature(logits[:, None], flat_tokens(z_hr)[:, None])  # one group
    feat, pooled = prior(upsample_for_prior(lr, c.scale)) if prior is not None else (None, None)
    logits = generator(lr, feat, pooled, lr_anchor(tokenizer, lr, c.scale))                    # (B, G, h, w, K)
    return generator.codes.calibrate_temperature(logits, tokenizer.encode(hr)[1])


# -----------------------------------------------------------------------------
# 4. Stage 2, H-VAR: CE + DPO over the next-scale sequence (docs/method.md#next-scale-generator, #dpo)

def flat_tokens(idxs):
    """[idx (B, rho_i, rho_i)] * L -> (B, N): the sequence order of NextScaleGenerator's logits."""
    return torch.cat([i.flatten(1) for i in idxs], dim=1)


def sequence_logp(logits_BNK, tokens_BN, reduce='sum'):
    """log p(z) of a teacher-forced sequence, (B,): the sum over its tokens of log softmax(logits)[z]
    ('sum', the sequence's log-likelihood, as the paper's DPO) or their mean ('mean': per token, on
    the scale of CE whatever the sequence length)."""
    token_logp = logits_BNK.float().log_softmax(-1).gather(-1, tokens_BN[..., None])[..., 0]
    return token_logp.sum(1) if reduce == 'sum' else token_logp.mean(1)


def dpo_loss(logp_hr, logp_lr, beta, weight=None):
    """H-VAR's DPO regulariser (docs/method.md#dpo): -log sigmoid(beta (log p(z_HR) - log p(z_LR))),
    averaged over the batch, or over the samples with weight 1 (weight (B,) of 0 / 1). Lowering it
    raises log p(z_HR) and lowers log p(z_LR). With a reference policy, logp_* are log-ratios
    log p / p_ref (the usual DPO)."""
    per = -F.logsigmoid(beta * (logp_hr - logp_lr))
    return per.mean() if weight is None else (per * weight).sum() / weight.sum().clamp_min(1)


def msrq_tokens(tokenizer, x, hierarchical):
    """Targets of the next-scale generator: Algorithm 1's tokens of x or the plain RQ ones."""
    with torch.no_grad():
        return tokenizer.encode_hierarchical(x) if hierarchical else tokenizer.encode(x)[1]


@torch.no_grad()
def prefix_targets(tokenizer, hr, prefix, hierarchical):
    """Self-correction targets (docs/method.md#self-correction): step i's tokens of hr when the steps
    before it took the tokens `prefix` [(B, rho_j, rho_j)] * L: the nearest codes of the area-pooled
    residual of hr's encoding at step i's scale (Algorithm 1; the full size for plain RQ) minus the
    contributions of prefix's steps < i on that grid. Algorithm 1 is this greedy rule with hr's own
    tokens as the prefix; with the generator's own tokens it gives the tokens that correct its errors.
    prefix[i] itself is not used (only steps < i). -> [idx (B, rho_i, rho_i)] * L."""
    q = tokenizer.quantizer
    scales = q.scales if hierarchical else (1.0,)
    zs = [tokenizer.encoder(resize_image(hr, s)).float() for s in scales]          # [(B, C, s h, s w)]
    scale_of = {i: n for n, part in enumerate(q.partition) for i in part} if hierarchical else {}
    out = []
    for i, idx in enumerate(prefix):
        z = zs[scale_of.get(i, 0)]
        f_hat = q.decode_steps(prefix[:i], z.shape[-2:]) if i else 0.0            # (B, C, s h, s w)
        r = F.adaptive_avg_pool2d(z - f_hat, idx.shape[-2:])                        # area: (B, C, rho_i, rho_i)
        out.append(nearest_code(r.permute(0, 2, 3, 1).reshape(-1, q.C), q.codebook[0]).view(idx.shape))
    return out


def step_accuracy(logits_BNK, tokens_BN, sizes):
    """Top-1 accuracy of each step: (L,) from the flat logits / tokens and the steps' token counts."""
    hit = (logits_BNK.argmax(-1) == tokens_BN).float()
    return torch.stack([h.mean() for h in hit.split(list(sizes), dim=1)])


def scale_accuracy(acc_L, steps, partition):
    """Per-step accuracies (L,) -> per target scale (lists of step indices in `partition`), weighted by
    the steps' token counts (side^2 for the sides in `steps`): [0-dim tensors on acc_L's device]."""
    n = torch.tensor([r * r for r in steps], dtype=torch.float32, device=acc_L.device)
    return [(acc_L[p] * n[p]).sum() / n[p].sum() for p in partition]


def code_regression(r_BNC, tokens_BN, codes):
    """The codebook head's regression term: mean ||r - e_z||^2 / (C s^2) over the tokens, r the regressed
    residuals (B, N, C), e_z the target tokens' codes, s the RMS of a code entry (codes: CodebookHead)."""
    e = codes.codebook.float()[0][tokens_BN]                                     # (B, N, C)
    return (r_BNC - e).pow(2).mean() / codes.code_scale.pow(2)


def hvar_inputs(hr, lr, bilinear_frac, free_frac, guidance_drop, self_correct=0.0):
    """A training batch's H-VAR inputs (docs/method.md#next-scale-generator): each sample is class 1
    with probability bilinear_frac (its LR replaced by HR's antialiased bilinear downsample), else 0
    (the degraded LR); free_frac of either kind are labelled class 2 (class-free, the LR kept), and
    guidance_drop are class 2 with zero conditions (drop_B); self_correct of them train on their own
    prefix (own_B; None when 0). hr (B, 3, H, W), lr (B, 3, H/4, W/4) -> (lr, cls_B, drop_B, own_B)."""
    B, dev = hr.shape[0], hr.device
    u = torch.rand(3, B).to(dev)  # drawn on the CPU: the same draws on every device
    bilinear, drop = u[0] < bilinear_frac, u[2] < guidance_drop
    cls = torch.where((u[1] < free_frac) | drop, CLASS_FREE, torch.where(bilinear, CLASS_BILINEAR, CLASS_DEGRADED))
    bil = F.interpolate(hr, scale_factor=0.25, mode='bilinear', align_corners=False, antialias=True)
    lr = torch.where(bilinear[:, None, None, None], bil.clamp(0, 1), lr)
    own = torch.rand(B).to(dev) < self_correct if self_correct > 0 else None
    return lr, cls, drop, own


def hvar_losses(tokenizer, generator, hr, lr, cls_B, *, ce_weight, dpo, dpo_weight, dpo_beta, dpo_reduce='sum',
                reference=None, drop_B=None, reg_weight=0.0, own_B=None, l1_weight=0.0, lpips_weight=0.0,
                lpips_fn=None):
    """The H-VAR stage-2 loss of one batch (docs/method.md#next-scale-generator, #dpo), for
    generator.py and bench.py: ce_weight * CE(z_HR) + dpo_weight * L_DPO, both under teacher
    forcing; L_DPO needs a second sequence, z_LR (the tokens of the upsampled LR), run in the same
    forward pass (dpo=False: neither). It counts only the samples of the degraded class 0 (the
    preference of HR's tokens over the LR's own means nothing for a bilinear-only LR), with the
    sequences' log-likelihoods summed ('sum', the paper's) or averaged per token ('mean');
    reference: a frozen copy of the generator, whose log-likelihoods of the same sequences are
    subtracted (standard DPO; the paper has none). generator: the module to call (compiled or not).
    drop_B (B,) bool: these samples get zero conditions (guidance dropout, for classifier-free guidance).
    reg_weight > 0 (codebook head): + reg_weight * code_regression of HR's tokens, which pulls the
    regressed residual to the target's code, so that top-1 (its nearest code) follows it.
    own_B (B,) bool (self-correction): these samples' steps see the generator's own top-1 tokens as
    in generation, and their targets are HR's tokens given that prefix (prefix_targets).
    l1_weight, lpips_weight > 0: HiTokSR's reconstruction-aware terms on the full-size decode of the
    teacher-forced top-1 tokens of every step, D(sum_i phi_i(up(sum_k w_ik e_k))) with w = ste_onehot
    (docs/method.md#pixel-terms-for-h-var): the frozen decoder passes gradients to the logits.
    -> (loss, parts (ce, dpo, logp_gap, reg, l1, lpips), per-step accuracy (L,))."""
    c = generator.config
    reg, sizes = reg_weight > 0, [n * n for n in c.rq_steps]           # sizes: tokens per step
    up, conds = hvar_condition(tokenizer, generator, lr, drop_B)
    z_hr = msrq_tokens(tokenizer, hr, c.hierarchical)
    prefix = z_hr                                                       # the tokens the inputs are made of
    if own_B is not None and bool(own_B.any()):  # self-correction: the generator's own prefix, HR's answers to it
        own, _ = generator.generate(tokenizer.quantizer, conds, cls_B)   # top-1, as sr.py
        pick = lambda a, b: [torch.where(own_B[:, None, None], x, y) for x, y in zip(a, b)]
        prefix = pick(own, z_hr)
        z_hr = pick(prefix_targets(tokenizer, hr, prefix, c.hierarchical), z_hr)
    ins = generator.step_inputs(tokenizer.quantizer, conds, prefix)
    t_hr = flat_tokens(z_hr)                                            # (B, N)
    zero = torch.zeros((), device=hr.device)
    if dpo:
        z_lr = msrq_tokens(tokenizer, up, c.hierarchical)
        t_lr = flat_tokens(z_lr)
        both = ([torch.cat([z, z]) for z in conds],
                [torch.cat(p) for p in zip(ins, generator.step_inputs(tokenizer.quantizer, conds, z_lr))],
                torch.cat([cls_B, cls_B]))
        out = generator(*both, residual=reg)
        logits, logits_lr = (out[0] if reg else out).chunk(2)           # (B, N, K) each
        r = out[1].chunk(2)[0] if reg else None                         # (B, N, C): HR's sequence
        logp_hr, logp_lr = sequence_logp(logits, t_hr, dpo_reduce), sequence_logp(logits_lr, t_lr, dpo_reduce)
        if reference is not None:
            with torch.no_grad():
                ref_hr, ref_lr = reference(*both).chunk(2)
                logp_hr = logp_hr - sequence_logp(ref_hr, t_hr, dpo_reduce)
                logp_lr = logp_lr - sequence_logp(ref_lr, t_lr, dpo_reduce)
        degraded = (cls_B == CLASS_DEGRADED).float()
        l_dpo, gap = dpo_loss(logp_hr, logp_lr, dpo_beta, degraded), (logp_hr - logp_lr).mean().detach()
    else:
        logits, r = generator(conds, ins, cls_B, residual=True) if reg else (generator(conds, ins, cls_B), None)
        l_dpo = gap = zero
    ce = F.cross_entropy(logits.float().flatten(0, 1), t_hr.flatten())
    l_reg = code_regression(r, t_hr, generator.codes) if reg else zero
    l1 = lp = zero
    if l1_weight > 0 or lpips_weight > 0:  # the x4 decode of the predicted tokens, straight through
        q, R = tokenizer.quantizer, c.rq_steps[-1]
        codes = ste_onehot(logits) @ q.codebook[0].float()                  # (B, N, C), one-hot forward
        maps = [m.unflatten(1, (n, n)).permute(0, 3, 1, 2)                 # [(B, C, rho_i, rho_i)]
                for m, n in zip(codes.split(sizes, 1), c.rq_steps)]
        sr = tokenizer.decoder(q.decode_steps(maps, (R, R))).float()       # (B, 3, H, W), H = R x patch
        l1 = (sr - hr).abs().mean() if l1_weight > 0 else zero
        lp = lpips_fn(sr, hr).mean() if lpips_weight > 0 else zero
    loss = ce_weight * ce + dpo_weight * l_dpo + reg_weight * l_reg + l1_weight * l1 + lpips_weight * lp
    acc = step_accuracy(logits.detach(), t_hr, sizes)
    return loss, dict(ce=ce, dpo=l_dpo, logp_gap=gap, reg=l_reg, l1=l1, lpips=lp), acc
