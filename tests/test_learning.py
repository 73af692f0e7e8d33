"""Every generator can learn: CE alone on one fixed batch of 2 crops must reach a token accuracy of
0.9 within a few hundred CPU steps. Memorising a batch is the least a generator must do: a loss that
does not reach the weights, logits scored against the wrong tokens, or a model that cannot tell the
crops apart fail it. (A batch can be memorised through a wrong attention mask too: the block-causal
mask and the teacher-forcing inputs have their own tests in test_hvar.py.) Tiny random tokenizers;
their tokens are the targets."""
import pytest
import torch

from conftest import generator_args, tokenizer_args
from degradation import bicubic_downsample
from losses import generator_losses, hvar_losses
from model import (CLASS_DEGRADED, Generator, GeneratorConfig, NextScaleConfig, NextScaleGenerator, TextureGenerator,
                   TextureGeneratorConfig, Tokenizer, TokenizerConfig)

SMALL = dict(patch=8, enc_width=32, enc_depth=1, enc_heads=2, dec_width=32, dec_depth=1, dec_heads=2)
CE_ONLY = dict(ce_weight=1.0, repa_weight=0.0, l1_weight=0.0, lpips_weight=0.0, gan_weight=0.0, struct_weight=0.0)
MAX_STEPS, TARGET = 400, 0.9


def frozen(tok, std=0.5):
    with torch.no_grad():
        tok.quantizer.codebook.normal_(std=std)  # distinct codes: the targets vary with the image
    return tok.eval().requires_grad_(False)


def fixed_batch(side, seed=0):
    """2 random HR crops with detail finer than the LR keeps (per-pixel noise) and their
    bicubic LR: the tokens of the upsampled LR are far from HR's, so a codebook head, which starts
    from them, has to learn too."""
    g = torch.Generator().manual_seed(seed)
    hr = torch.rand(2, 3, side, side, generator=g)
    return hr, bicubic_downsample(hr, 4)


def fit(step_fn, params, lr=3e-3):
    """Adam on step_fn() -> (loss, accuracy) until the accuracy reaches TARGET: -> (steps, accuracies)."""
    opt = torch.optim.Adam(params, lr=lr)
    accs = []
    for step in range(1, MAX_STEPS + 1):
        loss, acc = step_fn()
        accs.append(float(acc))
        if accs[-1] >= TARGET:
            return step, accs
        opt.zero_grad()
        loss.backward()
        opt.step()
    return MAX_STEPS, accs


def learned(accs):
    """TARGET reached, with at most half the errors of the start (a codebook head starts from the LR's
    own tokens, which already match some of HR's)."""
    return accs[-1] >= TARGET and 1 - accs[-1] <= 0.5 * (1 - accs[0])


@pytest.mark.parametrize('head', ['linear', 'codebook'])
def test_the_one_pass_generator_fits_a_batch(head):
    torch.manual_seed(0)
    tok = frozen(Tokenizer(TokenizerConfig(**tokenizer_args(latent_dim=8, groups=4, codebook_size=16, **SMALL))))
    gen = Generator(GeneratorConfig(**generator_args(
        patch=8, scale=4, groups=4, codebook_size=16, latent_dim=8, width=32, depth=2, n_head=2, stem_dim=8,
        use_sft=False, cls_tokens='none', feat_dim=0, pooled_dims=(), head=head)))
    if head == 'codebook':
        gen.codes.tie_codebook(tok.quantizer.codebook)
    hr, lr = fixed_batch(32)
    q = tok.encode(hr)[1]                                                    # (2, 4, 4, 4) targets

    def step():
        loss, _, logits, _ = generator_losses(tok, gen, None, hr, lr, q, **CE_ONLY)
        return loss, (logits.argmax(-1) == q).float().mean()
    steps, accs = fit(step, gen.parameters())
    assert learned(accs), f"token accuracy {accs[0]:.2f} -> {accs[-1]:.2f} after {steps} steps"


def test_the_texture_predictor_fits_a_batch():
    torch.manual_seed(0)
    tok = frozen(Tokenizer(TokenizerConfig(**tokenizer_args(
        quantizer='tvq', latent_dim=8, groups=1, codebook_size=32, tvq_struct_dim=4, tvq_struct_pool=4, tvq_down=8,
        tvq_down_width=16, tvq_down_depth=1, tvq_down_heads=2, **SMALL))), std=0.3)
    gen = TextureGenerator(TextureGeneratorConfig(
        patch=8, scale=4, groups=1, codebook_size=32, width=32, depth=2, n_head=2, mlp_ratio=4.0, rope_base=10000.0,
        stem_dim=8, use_sft=False, sft_hidden=8, cls_tokens='none', feat_dim=0, pooled_dims=(), head='linear',
        latent_dim=0, struct_dim=4, struct_pool=4))
    hr, lr = fixed_batch(64)
    with torch.no_grad():
        _, q, _, _, f_l = tok.encode_tvq(hr)                                 # (2, 1, 8, 8), (2, 4, 2, 2)

    def step():
        loss, _, logits, _ = generator_losses(tok, gen, None, hr, lr, q, f_l, **CE_ONLY)
        return loss, (logits.argmax(-1) == q).float().mean()
    steps, accs = fit(step, gen.parameters())
    assert learned(accs), f"token accuracy {accs[0]:.2f} -> {accs[-1]:.2f} after {steps} steps"


@pytest.mark.parametrize('head, ce_weight, reg_weight', [('linear', 1.0, 0.0), ('codebook', 1.0, 0.0),
                                                     ('codebook', 0.0, 1.0)])
def test_the_next_scale_generator_fits_a_batch(head, ce_weight, reg_weight):
    """H-VAR, teacher forcing over every step of the hierarchical sequence (130 tokens a crop); for the
    codebook head also with the code regression alone (its top-1 is the code nearest to the regressed
    residual, so pulling that to the target's code must get the tokens right too)."""
    torch.manual_seed(0)
    steps_, scales = (1, 2, 3, 4, 6, 8), (0.25, 0.5, 1.0)
    tok = frozen(Tokenizer(TokenizerConfig(**tokenizer_args(
        quantizer='msrq', groups=1, latent_dim=8, codebook_size=32, rq_steps=steps_, rq_scales=scales, rq_phi=2,
        **SMALL))))
    gen = NextScaleGenerator(NextScaleConfig(
        patch=8, scale=4, latent_dim=8, codebook_size=32, rq_steps=steps_, rq_scales=scales, hierarchical=True,
        scale_starts=True, head=head, width=32, depth=2, n_head=2, mlp_ratio=2.0, rope_base=100.0))
    if head == 'codebook':
        gen.codes.tie_codebook(tok.quantizer.codebook)
    hr, lr = fixed_batch(64)
    cls = torch.full((2,), CLASS_DEGRADED)

    def step():
        loss, _, acc = hvar_losses(tok, gen, hr, lr, cls, ce_weight=ce_weight, dpo=False, dpo_weight=0.0, dpo_beta=0.2,
                                   reg_weight=reg_weight)
        n = torch.tensor([r * r for r in steps_], dtype=torch.float32)
        return loss, (acc * n).sum() / n.sum()                              # over all 130 tokens
    steps, accs = fit(step, gen.parameters())
    assert learned(accs), f"token accuracy {accs[0]:.2f} -> {accs[-1]:.2f} after {steps} steps"
