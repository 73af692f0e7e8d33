"""ablate.py, the table of every tokenizer: a run of two kinds at toy sizes writes the table whose
numbers are those of the runs' own summaries and of eval.py on the same chains; a second call keeps
the finished runs, a changed tokenizer retrains its generator too; bad settings stop in one line."""
import json

import pytest

from conftest import SMALL_TOK, psnr_tol_db

TOY_TOK = ['--crop_size=32', '--batch_size=2', *SMALL_TOK, '--max_iters=2', '--eval_interval=1000']
TOY_GEN = ['--crop_size=32', '--batch_size=2', '--width=32', '--depth=1', '--n_head=2', '--stem_dim=16',
           '--sft_hidden=16', '--lora_rank=2', '--max_iters=2', '--eval_interval=1000']


def test_two_kinds_table_matches_the_runs_and_a_second_call_keeps_them(run_script, tiny_val, tmp_path):
    out = tmp_path / 'abl'
    args = ['--kinds=vq,grouped', '--tok_minutes=5', '--gen_minutes=5', f'--out_dir={out}', f'--val_dir={tiny_val}',
            '--tok_args=' + ' '.join(TOY_TOK + [f'--val_dir={tiny_val}']),
            '--gen_args=' + ' '.join(TOY_GEN + [f'--val_dir={tiny_val}'])]
    first = run_script('ablate.py', args).stdout
    table = json.loads((out / 'table.json').read_text())
    rows = {r['kind']: r for r in table['rows']}
    assert list(rows) == ['vq', 'grouped'] and table['failed'] == []
    # bits of one 128 px image: a 16 x 16 grid of 1 x log2(1024) bits (vq) / 4 x log2(256) bits (grouped)
    assert rows['vq']['bits'] == 16 * 16 * 10 and rows['grouped']['bits'] == 16 * 16 * 4 * 8
    for kind, r in rows.items():
        tok = json.loads((out / kind / 'tokenizer' / 'summary.json').read_text())
        gen = json.loads((out / kind / 'generator' / 'summary.json').read_text())
        assert (r['r_psnr_y'], r['r_lpips'], r['tok_steps']) == (tok['r_psnr_y'], tok['r_lpips'], 2)
        assert r['gen_steps'] == 2 and abs(r['sr_lpips'] - gen['lpips']) < 1e-4  # the run's own final eval
    ckpt = out / 'vq' / 'generator' / 'ckpt.pt'
    run_script('eval.py', ['--sr=chain', f'--gen_ckpt={ckpt}', f'--val_dir={tiny_val}', '--color_fix=0',
                           f'--out_json={tmp_path / "e.json"}'])
    # eval.py (torch's default thread count) against ablate.py's own evaluation (threads x jobs = 2): the
    # same chain in processes whose thread counts need not agree, so within psnr_tol_db (conftest)
    psnr = json.loads((tmp_path / 'e.json').read_text())['rows'][-1]['psnr_y']
    assert abs(psnr - rows['vq']['sr_psnr_y']) < psnr_tol_db(psnr), (psnr, rows['vq']['sr_psnr_y'])
    md = (out / 'table.md').read_text()
    assert md.count('\n') == 5 and '| vanilla VQ, 1 x 1024 codes | 2560 | 2 |' in md and md in first
    assert (out / 'vq' / 'tokenizer.out').is_file() and (out / 'grouped' / 'generator.cmd').is_file()
    mtime = (out / 'vq' / 'tokenizer' / 'ckpt.pt').stat().st_mtime_ns
    second = run_script('ablate.py', args).stdout
    assert second.count('finished earlier with the same command, kept') == 4
    assert (out / 'vq' / 'tokenizer' / 'ckpt.pt').stat().st_mtime_ns == mtime
    assert json.loads((out / 'table.json').read_text())['rows'] == table['rows']
    # a changed tokenizer command retrains that tokenizer and then its generator, which fits the old one
    args[0], args[5] = '--kinds=vq', args[5] + ' --seed=7'
    third = run_script('ablate.py', args).stdout
    assert 'kept' not in third and '[vq] tokenizer done' in third and '[vq] generator done' in third
    assert json.loads((out / 'table.json').read_text())['rows'][0]['r_psnr_y'] != rows['vq']['r_psnr_y']


@pytest.mark.parametrize('arg, words', [('--kinds=vq,rq', "unknown ['rq']; valid kinds: vq, grouped"),
                                        ('--tok_minutes=0', 'must be > 0'),
                                        ('--hrq_finetune=1.0', 'must be in (0, 1)'),
                                        ('--tok_args="--x=1', 'tok_args / gen_args')])
def test_bad_settings_stop_in_one_line(run_script, tmp_path, arg, words):
    p = run_script('ablate.py', [arg, f'--out_dir={tmp_path}'], check=False)
    assert p.returncode != 0 and words in p.stderr and 'Traceback' not in p.stderr, p.stderr
    assert not any(tmp_path.iterdir())
