"""Stage 2: the generator's SFT / CLS wiring, the straight-through one-hot against autograd on
softmax, gradient routing (generator + LoRA train; tokenizer, prior base, discriminator stay
frozen), config errors, a smoke run of generator.py and exact resume. CPU, ~1 minute."""
import pytest
import torch
import torch.nn.functional as F

import data
import metrics
from common import path_record, resolve_record
from conftest import GEN_TINY, generator_args, psnr_tol_db, tokenizer_args
from configurator import script_settings
from model import (Generator, GeneratorConfig, NextScaleConfig, TextureGeneratorConfig, Tokenizer, TokenizerConfig,
                   rope_2d)
from losses import PatchDiscriminator, calibrate_codebook_head, g_loss_vanilla, generator_losses, ste_onehot
from chain import load_sr_chain, stage2_models, super_resolve
from prior import LoRA, build_sr_prior, frozen_features, repa_loss, upsample_for_prior

TOK = tokenizer_args(patch=8, latent_dim=8, groups=4, codebook_size=16, enc_width=32, enc_depth=1, enc_heads=2,
                     dec_width=32, dec_depth=1, dec_heads=2)
GEN = generator_args(patch=8, scale=4, groups=4, codebook_size=16, latent_dim=8, width=32, depth=2, n_head=2, stem_dim=8,
                     sft_hidden=8, feat_dim=12, pooled_dims=(5, 7, 9))


def gen(**kw):
    torch.manual_seed(0)
    return Generator(GeneratorConfig(**{**GEN, **kw}))


def prior_inputs(B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 12, 3, 3, generator=g),
            [torch.randn(B, d, generator=g) for d in GEN['pooled_dims']])


def frozen_tokenizer():
    torch.manual_seed(0)
    tok = Tokenizer(TokenizerConfig(**TOK))
    with torch.no_grad():
        tok.quantizer.codebook.normal_()  # distinct codes, so the decoded image depends on the index
    return tok.eval().requires_grad_(False)

# ----------------------------------------------------------------------------- straight-through one-hot


def test_ste_onehot_is_exact_onehot_with_softmax_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, 11, requires_grad=True)
    w = ste_onehot(logits)
    assert torch.equal(w, F.one_hot(logits.argmax(-1), 11).float())  # bit-exact, not just close
    up = torch.randn_like(w)
    got, = torch.autograd.grad(w, logits, up)
    ref, = torch.autograd.grad(logits.softmax(-1), logits, up)  # J_softmax^T up, by autograd
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    p = logits.detach().softmax(-1)  # and by hand: p * (up - <p, up>)
    torch.testing.assert_close(got, p * (up - (p * up).sum(-1, keepdim=True)), rtol=1e-5, atol=1e-7)

# ----------------------------------------------------------------------------- SFT and CLS tokens


def test_sft_heads_start_as_identity():
    g = gen(cls_tokens='none')
    feat, _ = prior_inputs()
    cond = torch.randn(2, 6, 8)  # (B, h*w, sft_hidden)
    gamma, beta = g.sft_gamma[0](cond), g.sft_beta[0](cond)
    assert gamma.abs().max() == 0 and beta.abs().max() == 0
    x, rope = torch.randn(2, 6, 32), rope_2d(2, 3, 16)
    blk = g.blocks[0]
    assert torch.equal(blk(x, rope, (gamma, beta)), blk(x, rope))  # block with SFT == without mod
    # whole model: with SFT == the same weights without SFT, for any prior map
    plain = gen(cls_tokens='none', use_sft=False)
    missing, unexpected = plain.load_state_dict(g.state_dict(), strict=False)
    assert not missing and all(k.startswith('sft_') for k in unexpected)
    lr = torch.rand(2, 3, 8, 12)
    assert torch.equal(g(lr, feat), plain(lr))
    with torch.no_grad():  # once the heads move, the prior map modulates the blocks
        g.sft_gamma[1][-1].weight.normal_()
    assert not torch.allclose(g(lr, feat), plain(lr))


def test_cls_tokens_dropped_and_act_only_through_attention():
    lr = torch.rand(2, 3, 8, 12)
    feat, pooled = prior_inputs()
    shapes = {mode: gen(cls_tokens=mode, use_sft=False)(lr, feat, pooled).shape
              for mode in ('none', 'single', 'multi')}
    assert set(shapes.values()) == {torch.Size([2, 4, 4, 6, 16])}  # h*w positions only, G x K
    assert gen(cls_tokens='multi').config.n_cls == 3 and gen(cls_tokens='single').config.n_cls == 1
    g = gen(cls_tokens='multi', use_sft=False)
    _, other = prior_inputs(seed=2)
    assert not torch.allclose(g(lr, None, pooled), g(lr, None, other))
    with torch.no_grad():  # no attention output: spatial tokens cannot read the CLS tokens any more
        for blk in g.blocks:
            blk.attn.proj.weight.zero_()
    assert torch.equal(g(lr, None, pooled), g(lr, None, other))
    plain = gen(cls_tokens='none', use_sft=False)
    plain.load_state_dict(g.state_dict(), strict=False)
    torch.testing.assert_close(g(lr, None, pooled), plain(lr))  # (other shapes: not bit-exact)


def test_config_validation_names_the_key():
    for kw, key in ((dict(patch=6), 'patch'), (dict(cls_tokens='all'), 'cls_tokens'),
                    (dict(n_head=3), 'n_head'), (dict(feat_dim=0), 'use_sft'),
                    (dict(pooled_dims=(), use_sft=False), 'cls_tokens'), (dict(width=32.0), 'width')):
        with pytest.raises(ValueError, match=f'GeneratorConfig.{key}'):
            GeneratorConfig(**{**GEN, **kw})
    with pytest.raises(ValueError, match='prior_feat'):
        gen()(torch.rand(1, 3, 8, 8))

# ----------------------------------------------------------------------------- codebook head


def codebook_generator(tok, **kw):
    g = gen(head='codebook', use_sft=False, cls_tokens='none', **kw)
    g.codes.tie_codebook(tok.quantizer.codebook)
    return g


def test_codebook_head_starts_as_the_tokens_of_the_upsampled_lr():
    """Untrained (the correction layer is zero), the argmax of every group is the code the
    tokenizer itself picks for the bicubic-upsampled LR, and the logits are -t_g ||r - e||^2 up to
    a constant per token (r = the anchor), computed here directly."""
    from model import lr_anchor
    tok = frozen_tokenizer()
    g = codebook_generator(tok)
    lr = torch.rand(2, 3, 8, 12)
    anchor = lr_anchor(tok, lr)
    up = F.interpolate(lr, scale_factor=4, mode='bicubic', align_corners=False).clamp(0, 1)
    assert torch.equal(anchor, tok.encoder(up))                                   # (2, 8, 4, 6)
    logits = g(lr, anchor=anchor)                                                 # (B, G, h, w, K)
    assert logits.shape == (2, 4, 4, 6, 16)
    assert torch.equal(logits.argmax(-1), tok.encode(up)[1])
    for b, gi, i, j in ((0, 0, 0, 0), (1, 3, 2, 5), (0, 2, 3, 1)):
        r = anchor[b, 2 * gi:2 * gi + 2, i, j]                                    # group gi's 2 channels
        d2 = ((r[None] - tok.quantizer.codebook[gi]) ** 2).sum(-1)               # (K,)
        want = torch.log_softmax(-g.codes.log_t[gi].exp() * d2, -1)
        torch.testing.assert_close(torch.log_softmax(logits[b, gi, i, j], -1), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match='anchor'):
        g(lr)


def test_codebook_head_distances_stay_fp32_under_autocast():
    """Codes far from the origin and close together (norm ~ 14, spacing ~ 0.05): in bf16 the terms
    2 r.e and ||e||^2 (~200) lose the differences between codes, so the argmax under bf16 autocast
    matches the tokenizer's fp32 choice only because the distances are computed in fp32."""
    tok = frozen_tokenizer()
    with torch.no_grad():
        tok.quantizer.codebook.copy_(10 + 0.05 * torch.randn_like(tok.quantizer.codebook))
    g = codebook_generator(tok)
    lr = torch.rand(2, 3, 8, 12)
    anchor = 10 + 0.05 * torch.randn(2, 8, 4, 6)                                 # latents among the codes
    want = g(lr, anchor=anchor).argmax(-1)
    z = anchor.view(2, 4, 2, 4, 6).permute(1, 0, 3, 4, 2).reshape(4, -1, 2)      # (G, N, d), reference
    ref = torch.stack([torch.cdist(z[i], tok.quantizer.codebook[i]).argmin(-1) for i in range(4)])
    assert torch.equal(want, ref.view(4, 2, 4, 6).transpose(0, 1))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert torch.equal(g(lr, anchor=anchor).argmax(-1), want)


def test_codebook_head_trains_its_correction_and_temperature():
    """CE + L1 through the decoder train the correction layer and the temperatures from the first
    step, and every other generator parameter once that layer is no longer zero (at init it blocks
    their gradient, as zero-initialised output layers do); the codebook copy is a buffer; the
    temperatures' data init lowers the CE of the batch it was fitted on."""
    from model import lr_anchor
    tok = frozen_tokenizer()
    g = codebook_generator(tok)
    lr, hr = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 32, 32)
    q, anchor = tok.encode(hr)[1], lr_anchor(tok, lr)
    before, after = calibrate_codebook_head(g, tok, None, hr, lr)
    with torch.no_grad():
        ce = float(F.cross_entropy(g(lr, anchor=anchor).flatten(0, 3), q.flatten()))
    assert after <= before and after == pytest.approx(ce, rel=1e-4)
    assert 'codes.codebook' not in dict(g.named_parameters()) and 'codes.codebook' in g.state_dict()
    s = dict(ce_weight=1.0, repa_weight=0.0, l1_weight=1.0, lpips_weight=0.0, gan_weight=0.0)
    opt = torch.optim.AdamW(g.parameters(), lr=1e-2)
    for step in range(2):
        opt.zero_grad()
        generator_losses(tok, g, None, hr, lr, q, **s)[0].backward()
        for name, p in g.named_parameters():
            first = name.startswith('head.') or name == 'codes.log_t'
            assert (p.grad is not None and p.grad.abs().sum() > 0) == (first or step == 1), (step, name)
        opt.step()


def test_codebook_head_config():
    from model import TextureGeneratorConfig
    with pytest.raises(ValueError, match='GeneratorConfig.head'):
        GeneratorConfig(**{**GEN, 'head': 'conv'})
    with pytest.raises(ValueError, match='GeneratorConfig.latent_dim'):
        GeneratorConfig(**{**GEN, 'head': 'codebook', 'latent_dim': 6})
    with pytest.raises(ValueError, match='TextureGeneratorConfig.head'):
        TextureGeneratorConfig(**{**GEN, 'groups': 1, 'head': 'codebook', 'struct_dim': 4, 'struct_pool': 4})
    old = {k: v for k, v in GEN.items() if k not in ('head', 'latent_dim')}  # a checkpoint from before the head
    assert GeneratorConfig.from_dict(old).head == 'linear'

# ----------------------------------------------------------------------------- gradient routing


def test_pixel_loss_reaches_logits_through_frozen_decoder():
    tok = frozen_tokenizer()
    g = gen(use_sft=False, cls_tokens='none')
    before = {k: v.clone() for k, v in tok.state_dict().items()}
    lr, hr = torch.rand(2, 3, 8, 12), torch.rand(2, 3, 32, 48)
    logits = g(lr)
    logits.retain_grad()
    sr = tok.decode(tok.quantizer.codes_from_onehot(ste_onehot(logits)))
    assert torch.equal(sr, tok.decode_indices(logits.argmax(-1)))  # forward = top-1 decode, exactly
    (sr - hr).abs().mean().backward()
    assert logits.grad.abs().sum() > 0
    for name, p in g.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in tok.parameters())
    opt = torch.optim.AdamW(list(g.parameters()) + list(tok.parameters()), lr=1e-2)
    opt.step()
    for k, v in tok.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_full_loss_trains_only_generator_and_lora():
    tok = frozen_tokenizer()
    prior = build_sr_prior(dict(name='efficientnet_lite0', feat_tap='head', lora_rank=2, lora_alpha=2.0),
                           pretrained=False)
    g = gen(feat_dim=prior.feat_dim, pooled_dims=tuple(prior.pooled_dims))
    disc, lpips_net = PatchDiscriminator().requires_grad_(False), metrics.load_lpips('cpu')
    lr, hr = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        q = tok.encode(hr)[1]
    feat, pooled = prior(upsample_for_prior(lr))
    logits = g(lr, feat, pooled)
    sr = tok.decode(tok.quantizer.codes_from_onehot(ste_onehot(logits)))
    loss = (F.cross_entropy(logits.flatten(0, 3), q.flatten()) + repa_loss(feat, frozen_features(prior, hr)[0])
            + (sr - hr).abs().mean() + metrics.lpips_dist(lpips_net, sr, hr).mean() + 0.5 * g_loss_vanilla(disc(sr)))
    # the loss generator.py and bench.py share is this sum, term by term
    s = dict(ce_weight=1.0, repa_weight=1.0, l1_weight=1.0, lpips_weight=1.0, gan_weight=0.5, train_prior=True)
    shared, parts, _, sr_shared = generator_losses(tok, g, prior, hr, lr, q, **s, disc=disc, gan_on=True,
                                                   lpips_fn=lambda x, y: metrics.lpips_dist(lpips_net, x, y))
    assert torch.equal(sr_shared, sr) and set(parts) == {'ce', 'repa', 'l1', 'lpips', 'g'}
    torch.testing.assert_close(shared, loss, rtol=1e-6, atol=0)
    loss.backward()
    lora = {id(p) for m in prior.modules() if isinstance(m, LoRA) for p in (m.lora_A, m.lora_B)}
    assert all(p.grad is not None for p in g.parameters())
    assert all((p.grad is not None) == (id(p) in lora) for p in prior.parameters())
    assert sum(m.lora_B.grad.abs().sum() for m in prior.modules() if isinstance(m, LoRA)) > 0
    for module in (tok, disc, lpips_net):
        assert all(p.grad is None for p in module.parameters())

# ----------------------------------------------------------------------------- the script

# every loss term on (CE, REPA, L1, LPIPS, GAN from step 2); tiny sizes from conftest.GEN_TINY
TINY = GEN_TINY + ['--eval_interval=1000', '--log_interval=1', '--gan_start=2', '--warmup_iters=2',
                   '--decay_iters=6', '--learning_rate=1e-3']


@pytest.fixture(scope='module')
def tiny(tiny_val, tiny_tok):
    return TINY + [f'--val_dir={tiny_val}', f'--tok_ckpt={tiny_tok}']


def test_bad_config_is_one_clear_message(tiny, run_script, tmp_path):
    run = run_script
    for arg, words in (('--patch=16', 'set --patch=8'), (f'--tok_ckpt={tmp_path}/none.pt', 'python tokenizer.py')):
        p = run('generator.py', tiny + [arg, f'--out_dir={tmp_path}'], check=False)
        assert p.returncode != 0 and words in p.stderr and 'config error' in p.stderr, p.stderr
        assert 'Traceback' not in p.stderr and 'step ' not in p.stdout


def test_smoke_exact_resume_and_sr_chain(tiny, tiny_val, check_exact_resume, tmp_path):
    straight = tmp_path / 'straight'
    out, a = check_exact_resume('generator.py', tiny + ['--lpips_batch=1'], tmp_path, 2,  # LPIPS on 1 of 2 crops
                                ('generator', 'prior_lora', 'disc'))
    for key in ('psnr_y:', 'lpips_vs_bicubic:', 'bicubic_lpips:', 'token_acc_mean:', 'token_acc_g3:'):
        assert key in out, key
    assert 'g 0.0000 d 0.0000' not in out.split('step 3 |')[1].split('\n')[0]  # GAN on from step 2
    for f in ('ckpt.pt', 'log.txt', 'curves.png', 'summary.json', 'samples_000000.png', 'samples_000004.png'):
        assert (straight / f).is_file(), f
    assert any(v.abs().sum() > 0 for k, v in a['prior_lora'].items() if k.endswith('lora_B'))  # LoRA trained
    # the saved chain alone reproduces the run's final validation numbers
    tok, g, prior = load_sr_chain(straight / 'ckpt.pt', 'cpu')
    pairs = data.load_val_pairs(str(tiny_val))
    sr = super_resolve(pairs['lr'], tok, g, prior)
    assert sr.shape == pairs['hr'].shape and 0 <= sr.min() and sr.max() <= 1
    m = metrics.evaluate(sr, pairs['hr'], crop_border=4, lpips_net=False)
    # the run (1 thread) and this process (1 thread under test.sh, torch's default under -n 0): psnr_tol_db
    assert abs(m['psnr_y'] - a['metrics']['psnr_y']) < psnr_tol_db(m['psnr_y']), (m['psnr_y'], a['metrics']['psnr_y'])


def test_chain_of_an_older_tokenizer_checkpoint_loads(tiny_gen, tmp_path):
    """A tokenizer file written before later tokenizer fields existed (their keys absent) still
    matches the settings a generator trained on it recorded (all fields, the new ones at their
    old behaviour)."""
    from model import TokenizerConfig
    g = torch.load(tiny_gen, weights_only=False)
    t = torch.load(resolve_record(g['tok_ckpt'], tiny_gen), weights_only=False)
    old = [k for k, v in TokenizerConfig.ADDED_FIELDS.items() if t['model_args'][k] == v]  # e.g. the tvq_* fields
    assert old
    for key in old:
        t['model_args'].pop(key)
    g['tok_ckpt'] = path_record(tmp_path / 'tok.pt', tmp_path / 'gen.pt')
    torch.save(t, tmp_path / 'tok.pt')
    torch.save(g, tmp_path / 'gen.pt')
    tok, gen, _ = load_sr_chain(tmp_path / 'gen.pt', 'cpu')
    assert tok.config.quantizer == 'grouped'
    t['model_args']['codebook_size'] *= 2                                  # another tokenizer is refused
    torch.save(t, tmp_path / 'tok.pt')
    with pytest.raises(ValueError, match='was trained on the tokenizer'):
        load_sr_chain(tmp_path / 'gen.pt', 'cpu')


def test_codebook_head_chain(tiny, tiny_val, run_script, tmp_path):
    """generator.py --head=codebook: the temperatures' data init is logged, the saved chain reproduces
    the run's final numbers, exact resume (no second data init) and stage 3 runs on it."""
    args = tiny + ['--head=codebook', '--gan_start=1000']
    out = run_script('generator.py', args + [f'--out_dir={tmp_path}/straight', '--max_iters=4']).stdout
    assert 'codebook head: inverse temperature' in out and '(codebook head)' in out
    a = torch.load(tmp_path / 'straight' / 'ckpt.pt', weights_only=False)
    run_script('generator.py', args + [f'--out_dir={tmp_path}/split', '--max_iters=2'])
    resumed = run_script('generator.py', args + [f'--out_dir={tmp_path}/split', '--max_iters=4',
                                                 '--init_from=resume']).stdout
    assert 'resumed from' in resumed and 'inverse temperature' not in resumed
    b = torch.load(tmp_path / 'split' / 'ckpt.pt', weights_only=False)
    for k, v in a['generator'].items():  # bit for bit: the same settings, thread count and shapes
        assert torch.equal(v, b['generator'][k]), k
    tok, g, prior = load_sr_chain(tmp_path / 'straight' / 'ckpt.pt', 'cpu')
    assert g.config.head == 'codebook' and torch.equal(g.codes.codebook, tok.quantizer.codebook)
    pairs = data.load_val_pairs(str(tiny_val))
    m = metrics.evaluate(super_resolve(pairs['lr'], tok, g, prior), pairs['hr'], crop_border=4, lpips_net=False)
    # the run and this process, as in test_smoke_exact_resume_and_sr_chain: psnr_tol_db
    assert abs(m['psnr_y'] - a['metrics']['psnr_y']) < psnr_tol_db(m['psnr_y']), (m['psnr_y'], a['metrics']['psnr_y'])
    run_script('finetune_decoder.py', ['config/tiny.py', '--crop_size=32', '--batch_size=2',
                                       '--max_minutes=0', '--max_iters=1', '--threads=1', '--eval_interval=1000',
                                       f'--val_dir={tiny_val}', f'--gen_ckpt={tmp_path}/straight/ckpt.pt',
                                       f'--out_dir={tmp_path}/ft'])
    assert (tmp_path / 'ft' / 'summary.json').is_file()


@pytest.mark.parametrize('quantizer, use_prior', [('grouped', True), ('grouped', False), ('tvq', True), ('msrq', True)])
def test_stage2_models_follow_the_tokenizer(quantizer, use_prior):
    """chain.stage2_models, the one path of generator.py and bench.py: the config of the generator the
    quantizer calls for, with the tokenizer's shapes and the prior's dims in it; no prior for H-VAR or
    with use_prior=False, and then everything that needs one switched off in the settings."""
    extra = dict(msrq=dict(groups=1, rq_steps=(1, 2, 3, 4, 6, 8), rq_scales=(0.25, 0.5, 1.0)), tvq=dict(groups=1))
    tcfg = TokenizerConfig(**tokenizer_args(quantizer=quantizer, patch=8, latent_dim=16, codebook_size=64,
                                            **extra.get(quantizer, {})))
    s = script_settings('generator.py', [f'--use_prior={use_prior}', '--lora_rank=2', '--patch=8'])
    prior_args, prior, gcfg = stage2_models(tcfg, s)
    assert type(gcfg) is dict(grouped=GeneratorConfig, tvq=TextureGeneratorConfig, msrq=NextScaleConfig)[quantizer]
    assert (gcfg.patch, gcfg.scale, gcfg.latent_dim, gcfg.codebook_size) == (8, 4, 16, 64)
    with_prior = use_prior and quantizer != 'msrq'
    assert (prior is not None) == (prior_args is not None) == s['use_prior'] == with_prior
    if with_prior:
        assert (gcfg.feat_dim, gcfg.pooled_dims) == (prior.feat_dim, tuple(prior.pooled_dims))
        assert (gcfg.groups, prior_args['lora_rank']) == (tcfg.groups, 2)
    else:
        assert (s['use_sft'], s['cls_tokens'], s['repa_weight'], s['lora_rank']) == (False, 'none', 0.0, 0)
    if quantizer == 'tvq':
        assert (gcfg.struct_dim, gcfg.struct_pool) == (tcfg.tvq_struct_dim, tcfg.tvq_struct_pool)
    if quantizer == 'msrq':
        assert (gcfg.rq_steps, gcfg.rq_scales, gcfg.hierarchical) == ((1, 2, 3, 4, 6, 8), (0.25, 0.5, 1.0), True)
