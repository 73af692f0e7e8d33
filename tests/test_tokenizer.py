"""Stage-1 script: frequency targets, config errors before training, smoke run, exact resume."""
import pytest
import torch

from conftest import SMALL_TOK, _run
from losses import frequency_targets, gradient_l1

# A model small enough for seconds per run on 2 cores; every code path of the loop stays on
# (group masking, DWT targets, LPIPS, edge loss, GAN from step 2, data init, dead-code restart).
# The runs evaluate on conftest's tiny_val (2 pairs): the 11 pairs' LPIPS would double their time.
TINY = ['config/tiny.py', '--crop_size=32', '--patch=8', '--batch_size=2', *SMALL_TOK,
        '--codebook_size=16', '--grad_weight=0.5', '--max_minutes=0', '--eval_interval=1000',
        '--log_interval=1', '--gan_start=2', '--warmup_iters=2', '--p_full=0.5', '--decay_iters=6']


def run(args, check=True):
    """tokenizer.py args, through conftest._run (its failure and timeout messages)."""
    return _run('tokenizer.py', args, check=check)


def naive_block_mean(x, level):
    """The Haar level-l approximation rebuilt at full size is the mean of each 2^l x 2^l block."""
    b = 2 ** level
    out = torch.empty_like(x)
    for i in range(0, x.shape[-2], b):
        for j in range(0, x.shape[-1], b):
            out[..., i:i + b, j:j + b] = x[..., i:i + b, j:j + b].mean(dim=(-2, -1), keepdim=True)
    return out


def test_frequency_target_is_lowpass_at_level_G_minus_k():
    G = 4
    x = torch.rand(5, 3, 16, 16, dtype=torch.float64)
    k = torch.tensor([4, 1, 2, 3, 1])
    t = frequency_targets(x, k, G)
    for b in range(5):
        ref = x[b] if k[b] == G else naive_block_mean(x[b], G - int(k[b]))
        torch.testing.assert_close(t[b], ref, rtol=0, atol=1e-12)


def test_edge_loss_charges_a_seam_and_not_a_smooth_offset():
    target = torch.rand(2, 3, 16, 24, dtype=torch.float64)
    # a constant offset keeps the target's neighbour differences (no loss); a ramp costs its slope
    ramp = torch.linspace(0, 0.3, 24, dtype=torch.float64)
    assert gradient_l1(target + 0.2, target) == pytest.approx(0, abs=1e-12)
    assert gradient_l1(target + ramp, target) == pytest.approx(0.3 / 23 / 2, rel=1e-9)  # constant slope
    # a seam of height d at every 8th column: per row d at 2 of the 23 horizontal differences
    d = 0.1
    seams = target + d * (torch.arange(24) // 8).to(torch.float64)
    assert gradient_l1(seams, target) == pytest.approx(d * 2 / 23 / 2, rel=1e-9)
    # against a loop over every neighbour pair
    x = torch.rand_like(target)
    ref = []
    for axis in (-1, -2):
        n = x.shape[axis] - 1
        diffs = [((x.narrow(axis, i + 1, 1) - x.narrow(axis, i, 1))
                  - (target.narrow(axis, i + 1, 1) - target.narrow(axis, i, 1))).abs() for i in range(n)]
        ref.append(torch.cat(diffs, axis).mean())
    assert gradient_l1(x, target) == pytest.approx(float(sum(ref) / 2), rel=1e-12)


@pytest.mark.parametrize('arg, words', [
    ('--groups=3', 'groups'),                 # 3 does not divide latent_dim 32
    ('--codebook_size=1', 'codebook_size'),
    ('--crop_size=100', 'crop_size=100'),     # not a multiple of patch 16
    ('--bogus=1', "unknown config key 'bogus'"),
    ('--batch_size=two', 'batch_size'),
])
def test_bad_config_is_one_clear_message_before_training(arg, words):
    p = run(['config/tiny.py', arg], check=False)
    assert p.returncode != 0
    assert words in p.stderr and 'config error' in p.stderr
    assert 'Traceback' not in p.stderr and 'step ' not in p.stdout


def test_smoke_and_exact_resume(check_exact_resume, tiny_val, tmp_path):
    """3 steps + resume + 3 steps must give bit-identical weights to 6 straight steps (CPU), the
    EMA copy of the weights included."""
    # --lpips_batch=1: the perceptual loss on one of the batch's two crops
    out, _ = check_exact_resume('tokenizer.py', TINY + ['--ema_decay=0.9', '--lpips_batch=1', f'--val_dir={tiny_val}'],
                                tmp_path, 3, ('model', 'disc', 'ema'))
    assert 'r_psnr_y:' in out and 'code_usage_min:' in out and 'prefix_psnr_k1:' in out
    for f in ('ckpt.pt', 'log.txt', 'curves.png', 'summary.json', 'samples_000000.png', 'samples_000006.png'):
        assert (tmp_path / 'straight' / f).is_file(), f


def test_resume_refuses_a_different_model(tiny_val, tmp_path):
    run(TINY + [f'--out_dir={tmp_path}', '--max_iters=1', f'--val_dir={tiny_val}'])
    p = run(TINY + [f'--out_dir={tmp_path}', f'--val_dir={tiny_val}', '--max_iters=2', '--init_from=resume',
                    '--dec_width=64'], check=False)
    assert p.returncode != 0 and 'model settings differ' in p.stderr


def test_divergence_stops_the_run_and_keeps_the_last_checkpoint(tiny_val, tmp_path):
    """A resumed run with an absurd learning rate blows up within a few steps: it must stop with
    a message naming the step and the loss parts, exit non-zero, and leave ckpt.pt byte-identical."""
    args = TINY + [f'--out_dir={tmp_path}', '--threads=1', f'--val_dir={tiny_val}']
    run(args + ['--max_iters=2', '--eval_interval=2'])
    before = (tmp_path / 'ckpt.pt').read_bytes()
    p = run(args + ['--max_iters=30', '--eval_interval=1000', '--init_from=resume', '--learning_rate=1e9'],
            check=False)
    assert p.returncode != 0 and 'training diverged at step' in p.stderr and 'grad_norm' in p.stderr, p.stderr
    assert 'Traceback' not in p.stderr
    assert (tmp_path / 'ckpt.pt').read_bytes() == before
    assert not (tmp_path / 'lock').exists()  # released on the way out


@pytest.mark.parametrize('arg, words', [
    ('--batch_size=0', 'batch_size=0 must be >= 1'),
    ('--eval_interval=0', 'eval_interval=0 must be >= 1'),
    ('--learning_rate=-1', 'learning_rate=-1.0 must be > 0'),
    ('--learning_rate_floor=2', 'learning_rate_floor=2.0 must be in [0, 1]'),
    ('--lpips_batch=-1', 'lpips_batch=-1 must be >= 0'),
])
def test_out_of_range_settings_fail_before_any_work(arg, words, tmp_path):
    p = run(['config/tiny.py', arg, f'--out_dir={tmp_path / "o"}'], check=False)
    assert p.returncode != 0 and words in p.stderr and 'Traceback' not in p.stderr, p.stderr
    assert not (tmp_path / 'o').exists()  # nothing was created


def test_perceptual_fn_scores_the_first_k_crops_only():
    """lpips_batch = k: the distances of crops 0..k-1, each as LPIPS scores it alone (1e-5: a batch
    of one against a batch of four); 0 scores every crop."""
    from losses import perceptual_fn
    import metrics
    net = metrics.load_lpips('cpu', net='vgg')
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(4, 3, 32, 32, generator=g), torch.rand(4, 3, 32, 32, generator=g)
    alone = torch.cat([metrics.lpips_dist(net, x[i:i + 1], y[i:i + 1]) for i in range(4)])
    assert torch.allclose(perceptual_fn(net, 2)(x, y), alone[:2], atol=1e-5)
    assert torch.allclose(perceptual_fn(net, 0)(x, y), alone, atol=1e-5)
    assert not torch.allclose(alone[:2], alone[2:], atol=1e-3)  # the crops' distances differ: a wrong pick shows
