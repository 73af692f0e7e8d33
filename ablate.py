"""
One table of every tokenizer (docs/results.md "Every tokenizer, one table"): each kind of tokenizer trained
for the same wall-clock time on the same photos and crops, then each one's own generator trained
for the same time on it, all scored on the same validation pairs.

    python ablate.py                                    # 2-core CPU: 6 x 8 + 6 x 8 min, 2 runs at a time (~55 min)
    python ablate.py --kinds=vq,tvq --tok_minutes=2 --gen_minutes=2   # a quick look at two kinds
    python ablate.py --jobs=1 --threads=0 --device=cuda --tok_args="--batch_size=32" --gen_args="--batch_size=32"

| kind           | tokenizer (config files, changes)                            | generator (config files)   |
|----------------|--------------------------------------------------------------|----------------------------|
| vq             | tiny, groups=1 x 1024 codes (Table 7's "vanilla")            | tiny (HiTokSR)             |
| grouped        | tiny: 4 x 256 codes, group masking + DWT targets             | tiny (HiTokSR)             |
| grouped_nomask | tiny, no masking, no DWT targets                             | tiny (HiTokSR)             |
| msrq           | tiny + hvar: 1 x 4096 codes, 10 residual steps               | tiny + hvar, plain tokens  |
| hrq            | msrq for (1 - hrq_finetune) of the time, then its hierarchical fine-tuning | tiny + hvar  |
| tvq            | tiny + tvq: 1 x 1024 texture codes + structure map, L1 + LPIPS | tiny + tvq               |

Every tokenizer has the encoder, decoder (the conv head, 16 channels) and latent width 32 of
config/tiny.py and trains on 128-px crops, batch 8, no hue augmentation, with L1 + LPIPS
(GAN off; SAME below); the texture VQ adds its structure branch and its two losses. Each run is an
ordinary stage-script run with its own out_dir under out_dir/KIND/ (log, PNGs, checkpoint,
summary.json) and its console output in out_dir/KIND/NAME.out. A run whose summary.json exists and
whose command is unchanged is not run again, so a killed ablate.py continues where it stopped (an
unfinished run restarts from scratch). At the end the chains are scored by chain.chain_rows (top-1
tokens, the last row: 4x SR, no colour correction) and the table is written to out_dir/table.md and
out_dir/table.json.
"""
import json
import math
import os
import shlex
import subprocess
import sys
import time

import torch

from common import atomic_write, write_json
from configurator import configure, fail

out_dir = 'out/ablate'
kinds = 'vq,grouped,grouped_nomask,msrq,hrq,tvq'  # comma-separated, in table order
tok_minutes = 8.0         # wall-clock budget of every tokenizer (hrq: both of its phases together)
gen_minutes = 8.0         # wall-clock budget of every generator
hrq_finetune = 0.4        # share of the hrq budget spent on the hierarchical fine-tuning
jobs = 2                  # runs side by side (equal-time runs share the machine: give each --threads)
threads = 1               # torch threads per run (0 = torch's default)
device = 'cpu'            # passed to every run and to the evaluation
tok_args = ''             # extra arguments for every tokenizer run, e.g. "--batch_size=32"
gen_args = ''             # extra arguments for every generator run
val_dir = 'assets/val_pairs'
config = configure(globals())

TINY, HVAR, TVQ = ('config/tiny.py',), ('config/tiny.py', 'config/hvar.py'), ('config/tiny.py', 'config/tvq.py')
# the recipe every kind shares (128-px crops, batch 8, L1 + LPIPS 1:1, as config/tvq.py sets it
# on top of config/tiny.py); config/tiny.py's own tokenizer trains on 64-px crops with random hues, half the
# LPIPS weight on 4 crops of 16 and 2 + 4 blocks, and its generator has the codebook head (docs/results.md "Image quality" and
# "The main job"); the table keeps the first recipe
SAME = ['--crop_size=128', '--batch_size=8', '--hue_aug=0', '--grad_weight=0', '--lpips_weight=1',
        '--lpips_batch=0', '--enc_depth=3', '--dec_depth=3']
GEN = (TINY, ['--head=linear'])
# H-VAR at these crops: 10 steps on the 16 x 16 grid (config/hvar.py's tiny size is 64 px, 6 steps), the
# generator at config/tiny.py's width
RQ = [*SAME, '--rq_steps=(1,2,3,4,5,6,8,10,13,16)']
GEN_RQ = ['--crop_size=128', '--width=192', '--n_head=4', '--eval_interval=1000']
KINDS = {  # kind -> (table label, tokenizer phases [(config files, args)], generator (config files, args))
    'vq': ('vanilla VQ, 1 x 1024 codes', [(TINY, [*SAME, '--groups=1', '--codebook_size=1024'])], GEN),
    'grouped': ('grouped VQ (HiTokSR), 4 x 256 codes, masking + DWT targets', [(TINY, SAME)], GEN),
    'grouped_nomask': ('grouped VQ, 4 x 256 codes, no masking', [(TINY, [*SAME, '--group_masking=False',
                                                                         '--dwt_targets=False'])], GEN),
    'msrq': ('multi-scale RQ, 1 x 4096 codes, 10 steps', [(HVAR, RQ)], (HVAR, [*GEN_RQ, '--hvar_tokens=plain'])),
    'hrq': ('hierarchical RQ (H-VAR): multi-scale RQ + Algorithm 1 fine-tuning',
            [(HVAR, RQ), (HVAR, [*RQ, '--hierarchical=True', '--freeze_encoder=True'])], (HVAR, GEN_RQ)),
    'tvq': ('texture VQ (TVQ&RAP), 1 x 1024 codes + structure map', [(TVQ, ['--l1_weight=1', '--l2_weight=0'])],
            (TVQ, [])),
}
GENERATOR_NAMES = {TINY: 'HiTokSR', HVAR: 'H-VAR next-scale', TVQ: 'TVQ predictor'}

chosen = [k.strip() for k in kinds.split(',') if k.strip()]
unknown = [k for k in chosen if k not in KINDS]
if unknown or not chosen:
    fail(f"ablate.py: kinds={kinds!r}: unknown {unknown or 'empty list'}; valid kinds: {', '.join(KINDS)}")
if tok_minutes <= 0 or gen_minutes <= 0:
    fail(f"ablate.py: tok_minutes={tok_minutes} and gen_minutes={gen_minutes} must be > 0")
if not 0 < hrq_finetune < 1:
    fail(f"ablate.py: hrq_finetune={hrq_finetune} must be in (0, 1)")
if jobs < 1:
    fail(f"ablate.py: jobs={jobs} must be >= 1")
try:
    extra_tok, extra_gen = shlex.split(tok_args), shlex.split(gen_args)
except ValueError as err:
    fail(f"ablate.py: tok_args / gen_args: {err}")
PY = sys.executable

# -----------------------------------------------------------------------------
# the runs: each job is a list of commands run one after the other (the hrq tokenizer has two)

def run_dir(kind, name):
    return os.path.join(out_dir, kind, name)


def command(script, cfg, args, out, minutes):
    return [PY, script, *cfg, *args, f'--out_dir={out}', f'--max_minutes={minutes:g}', f'--threads={threads}',
            f'--device={device}', '--overwrite=True']


def tokenizer_job(kind):
    phases, out = KINDS[kind][1], run_dir(kind, 'tokenizer')
    if len(phases) == 1:
        (cfg, args), = phases
        return [('tokenizer', command('tokenizer.py', cfg, args + extra_tok, out, tok_minutes))]
    (cfg_a, args_a), (cfg_b, args_b) = phases  # plain RQ, then its hierarchical fine-tuning
    first = run_dir(kind, 'tokenizer_rq')
    return [('tokenizer_rq', command('tokenizer.py', cfg_a, args_a + extra_tok, first,
                                     tok_minutes * (1 - hrq_finetune))),
            ('tokenizer', command('tokenizer.py', cfg_b, args_b + extra_tok + [f'--init_from={first}/ckpt.pt'],
                                  out, tok_minutes * hrq_finetune))]


def generator_job(kind):
    cfg, args = KINDS[kind][2]
    tok = os.path.join(run_dir(kind, 'tokenizer'), 'ckpt.pt')
    return [('generator', command('generator.py', cfg, args + extra_gen + [f'--tok_ckpt={tok}'],
                                  run_dir(kind, 'generator'), gen_minutes))]


def write_text(path, text):
    def write(tmp):
        with open(tmp, 'w') as f:
            f.write(text)
    atomic_write(path, write)


def read_text(path):
    with open(path) as f:
        return f.read()


def done(kind, name, cmd):
    """A finished run of exactly this command: its summary.json and the command it was made with."""
    path = run_dir(kind, name) + '.cmd'
    return (os.path.isfile(os.path.join(run_dir(kind, name), 'summary.json')) and os.path.isfile(path)
            and read_text(path) == shlex.join(cmd))


def run_jobs(todo, rerun=()):
    """todo: [(kind, [(name, cmd), ...])]; up to `jobs` kinds at a time, each kind's commands in
    order; a finished run is kept unless its kind is in rerun. -> (the kinds whose run failed, the
    others go on; the kinds that ran something)."""
    waiting, running, failed, ran = list(todo), {}, [], set()
    while waiting or running:
        while waiting and len(running) < jobs:
            kind, steps = waiting.pop(0)
            running[kind] = dict(steps=list(steps), proc=None)
        for kind, r in list(running.items()):
            if r['proc'] is not None:
                if r['proc'].poll() is None:
                    continue
                r['log'].close()
                minutes = (time.time() - r['t0']) / 60
                if r['proc'].returncode != 0:
                    tail = read_text(r['log'].name)[-1500:]
                    print(f"[{kind}] {r['name']} FAILED (exit {r['proc'].returncode}) after {minutes:.1f} min; "
                          f"the end of {r['log'].name}:\n{tail}", flush=True)
                    failed.append(kind)
                    del running[kind]
                    continue
                write_text(run_dir(kind, r['name']) + '.cmd', shlex.join(r['cmd']))
                print(f"[{kind}] {r['name']} done in {minutes:.1f} min", flush=True)
            while r['steps'] and kind not in rerun and kind not in ran and done(kind, *r['steps'][0]):
                print(f"[{kind}] {r['steps'][0][0]}: finished earlier with the same command, kept", flush=True)
                r['steps'].pop(0)
            if not r['steps']:
                del running[kind]
                continue
            r['name'], r['cmd'] = r['steps'].pop(0)
            ran.add(kind)
            os.makedirs(os.path.join(out_dir, kind), exist_ok=True)
            r['log'] = open(run_dir(kind, r['name']) + '.out', 'w')
            print(f"[{kind}] {r['name']}: {shlex.join(r['cmd'])}\n    output: {r['log'].name}", flush=True)
            r['proc'] = subprocess.Popen(r['cmd'], stdout=r['log'], stderr=subprocess.STDOUT)
            r['t0'] = time.time()
        time.sleep(2)
    return failed, ran


t0 = time.time()
print(f"== tokenizers ({len(chosen)} x {tok_minutes:g} min, {jobs} at a time) ==", flush=True)
failed, retrained = run_jobs([(k, tokenizer_job(k)) for k in chosen])
print(f"== generators ({len(chosen) - len(failed)} x {gen_minutes:g} min, {jobs} at a time) ==", flush=True)
# a kind whose tokenizer was trained now trains its generator anew (the old one fits the old tokenizer)
failed += run_jobs([(k, generator_job(k)) for k in chosen if k not in failed], rerun=retrained)[0]

# -----------------------------------------------------------------------------
# the table: reconstructions from each tokenizer's summary.json, SR from chain.chain_rows

import data  # noqa: E402 (after the runs: the evaluation only)
import metrics  # noqa: E402
from degradation import bicubic_upsample  # noqa: E402
from chain import chain_rows, load_tokenizer, score  # noqa: E402


def bits_per_image(cfg, side=128):
    """Bits of the token indices of one side x side image (the training crop of the tiny configs)."""
    grid = side // cfg.patch
    if cfg.quantizer == 'msrq':
        tokens = sum((s * grid // cfg.rq_steps[-1]) ** 2 for s in cfg.rq_steps)
        return tokens * math.log2(cfg.codebook_size)
    return grid * grid * cfg.groups * math.log2(cfg.codebook_size)


def read_json(path):
    with open(path) as f:
        return json.load(f)


print("== evaluation on the degraded validation pairs ==", flush=True)
if threads:
    torch.set_num_threads(max(threads * jobs, 1))
pairs = data.load_val_pairs(val_dir)
lpips_net = metrics.load_lpips(device)
bicubic = score('bicubic (degraded LR)', bicubic_upsample(pairs['lr']), pairs, lpips_net)
rows = []
for kind in chosen:
    if kind in failed:
        continue
    tok_sum = read_json(os.path.join(run_dir(kind, 'tokenizer'), 'summary.json'))
    gen_sum = read_json(os.path.join(run_dir(kind, 'generator'), 'summary.json'))
    cfg = load_tokenizer(os.path.join(run_dir(kind, 'tokenizer'), 'ckpt.pt')).config
    tok_steps = sum(read_json(os.path.join(run_dir(kind, n), 'summary.json'))['steps']
                    for n, _ in tokenizer_job(kind))
    sr = chain_rows(pairs, os.path.join(run_dir(kind, 'generator'), 'ckpt.pt'), '', lpips_net, device=device)[-1]
    rows.append(dict(kind=kind, tokenizer=KINDS[kind][0], generator=GENERATOR_NAMES.get(KINDS[kind][2][0], ''),
                     bits=bits_per_image(cfg), tok_steps=tok_steps, r_psnr_y=tok_sum['r_psnr_y'],
                     r_ssim_y=tok_sum['r_ssim_y'], r_lpips=tok_sum['r_lpips'],
                     code_usage=tok_sum['code_usage_mean'], gen_steps=gen_sum['steps'], sr_psnr_y=sr['psnr_y'],
                     sr_ssim_y=sr['ssim_y'], sr_lpips=sr['lpips'], sr_grid=sr['grid'],
                     sr_periodic=sr['periodic']))
    print(f"[{kind}] r-PSNR-Y {rows[-1]['r_psnr_y']:.2f}, r-LPIPS {rows[-1]['r_lpips']:.3f}; "
          f"SR PSNR-Y {sr['psnr_y']:.2f}, LPIPS {sr['lpips']:.3f}", flush=True)

head = ("| tokenizer | bits / 128 px | steps | r-PSNR-Y | r-SSIM-Y | r-LPIPS | code usage | generator | steps "
        "| SR PSNR-Y | SR SSIM-Y | SR LPIPS | SR grid | SR periodic |")
lines = [head, '|' + '---|' * head.count(' | ') + '---|',
         f"| bicubic (degraded LR) | | | | | | | | | {bicubic['psnr_y']:.2f} | {bicubic['ssim_y']:.4f} "
         f"| {bicubic['lpips']:.4f} | {bicubic['grid']:.3f} | {bicubic['periodic']:.2f} |"]
for r in rows:
    lines.append(f"| {r['tokenizer']} | {r['bits']:.0f} | {r['tok_steps']} | {r['r_psnr_y']:.2f} | {r['r_ssim_y']:.4f} "
                 f"| {r['r_lpips']:.4f} | {r['code_usage']:.2f} | {r['generator']} | {r['gen_steps']} "
                 f"| {r['sr_psnr_y']:.2f} | {r['sr_ssim_y']:.4f} | {r['sr_lpips']:.4f} | {r['sr_grid']:.3f} "
                 f"| {r['sr_periodic']:.2f} |")
table = '\n'.join(lines) + '\n'
write_text(os.path.join(out_dir, 'table.md'), table)
write_json(dict(command=shlex.join([os.path.basename(PY)] + sys.argv), config=config, bicubic=bicubic, rows=rows,
                failed=failed, minutes=round((time.time() - t0) / 60, 1)), os.path.join(out_dir, 'table.json'))
print('\n' + table)
print(f"wrote {out_dir}/table.md and table.json in {(time.time() - t0) / 60:.1f} min")
if failed:
    sys.exit(f"ablate.py: these kinds failed: {', '.join(failed)} (see out_dir/KIND/*.out)")
