"""
The command that scores super-resolved images on the validation pairs, with the metrics of
metrics.py (PSNR-Y and SSIM-Y in the BasicSR convention, LPIPS, grid score, periodic score, colour error;
docs/method.md#metrics): a baseline, a folder of PNGs, a trained checkpoint chain (with the published
peer Real-ESRGAN x4plus beside it when setup.sh could install it, peer.py), the peer alone, or a
multi-scale tokenizer's reconstructions. Prints a markdown table and a grep-able summary and writes
out/eval/<name>.json; a chain's evaluation also writes the HTML report beside it, out/eval/index.html
(report.py: every validation image by row with its metrics, and the chain's coarse-to-fine frames).
No module imports this file.

    python eval.py --sr=bicubic --lr_kind=degraded      # bicubic upsampling of the degraded LR
    python eval.py --sr=bicubic --lr_kind=bicubic       # ... of the clean bicubic-downsampled LR
    python eval.py --sr=out/my_model/val_png            # a folder of PNGs named like the val pairs
    python eval.py --sr=chain --gen_ckpt=out/generator/ckpt.pt   # a trained chain (HiTokSR or H-VAR)
    python eval.py --sr=chain --gen_ckpt=out/generator_hvar/ckpt.pt --compare_ckpt=out/generator/ckpt.pt
                                                        # H-VAR's x1 / x2 / x4 rows (each against HR resized
                                                        # and against the tokenizer's decode of HR's tokens),
                                                        # HiTokSR's x4 beside
    python eval.py --sr=scales --tok_ckpt=out/tokenizer_hrq/ckpt.pt   # a multi-scale RQ tokenizer
    python eval.py --sr=realesrgan                      # the published peer alone (peer.py; optional install)
"""
import os
import re
import sys
import time
from pathlib import Path

import torch

from common import device_problems, load_checkpoint, write_json
from degradation import bicubic_upsample
from metrics import METRICS, load_lpips
from peer import NAME as PEER_ROW, available as peer_available, realesrgan_x4
from chain import chain_rows, load_tokenizer, scale_decodes, score


def per_image_rows(row):
    """A row's per-image values as rows (one per image), then its mean row."""
    p = row['per_image']
    rows = [dict(name=n, **{k: p[k][i] if p.get(k) is not None else None for k in METRICS})
            for i, n in enumerate(p['names'])]
    return rows + [dict(row, name=f"**mean ({row['name']})**")]


def _fmt(v, digits):
    return '-' if v is None else f'{v:.{digits}f}'


def print_table(rows):
    """Markdown table of rows with keys name and METRICS."""
    print('| name | PSNR-Y (dB) | SSIM-Y | LPIPS | LPIPS-VGG | grid score | periodic | colour error |')
    print('|---|---|---|---|---|---|---|---|')
    for r in rows:
        print(f"| {r['name']} | {_fmt(r['psnr_y'], 2)} | {_fmt(r['ssim_y'], 4)} | {_fmt(r.get('lpips'), 4)} "
              f"| {_fmt(r.get('lpips_vgg'), 4)} "
              f"| {_fmt(r.get('grid'), 3)} | {_fmt(r.get('periodic'), 2)} | {_fmt(r.get('color_err'), 2)} |")


def print_summary(row):
    """The grep-able block: one `key: value` per line."""
    print(f"psnr_y: {_fmt(row['psnr_y'], 2)}\nssim_y: {_fmt(row['ssim_y'], 4)}\nlpips: {_fmt(row.get('lpips'), 4)}\n"
          f"lpips_vgg: {_fmt(row.get('lpips_vgg'), 4)}\n"
          f"grid: {_fmt(row.get('grid'), 3)}\nperiodic: {_fmt(row.get('periodic'), 2)}\n"
          f"color_err: {_fmt(row.get('color_err'), 2)}")


def load_sr_dir(sr_dir, names, shape):
    """PNGs of sr_dir named like the val pairs, NAME.png or sr.py's NAME_x4.png -> (N, 3, H, W);
    a missing or mis-sized file is named."""
    from data import load_image
    imgs = []
    for n in names:
        path = Path(sr_dir) / (n if Path(n).suffix else f'{n}.png')
        if not path.is_file() and (Path(sr_dir) / f'{n}_x4.png').is_file():
            path = Path(sr_dir) / f'{n}_x4.png'  # the folder sr.py writes
        if not path.is_file():
            raise FileNotFoundError(f"--sr={sr_dir}: missing {path} (expected one PNG per val pair, NAME.png "
                                    f"or NAME_x4.png: {', '.join(map(str, names))})")
        img = load_image(str(path))  # (3, H, W)
        if tuple(img.shape) != tuple(shape):
            raise ValueError(f"{path}: size {tuple(img.shape)}, expected {tuple(shape)} like the HR image")
        imgs.append(img)
    return torch.stack(imgs)


def scale_rows(tok, pairs, tokenization, lpips_net, crop_border=4, device='cpu', label=''):
    """Table rows of a multi-scale RQ tokenizer's reconstructions of pairs['hr'] at every scale."""
    rows = []
    for s, dec, target in scale_decodes(tok, pairs['hr'], tokenization, device)[0]:
        border = max(1, round(crop_border * s))
        rows.append(score(f"{label}{tokenization} tokens, decode at {s:g}x ({dec.shape[-1]} px)", dec,
                          dict(hr=target, names=pairs['names']), lpips_net, border, tok.config.patch))
    return rows


if __name__ == '__main__':
    from configurator import configure, fail
    sr = 'bicubic'                 # 'bicubic' (baseline from the LR inputs), 'chain' (checkpoints), 'realesrgan' (the
                                   # published peer, peer.py) or a folder of SR PNGs
    lr_kind = 'degraded'           # which LR the bicubic baseline upsamples: degraded | bicubic
    gen_ckpt = 'out/generator/ckpt.pt'  # sr='chain': the stage-2 checkpoint (it records its tokenizer)
    decoder_ckpt = ''              # sr='chain': a stage-3 checkpoint adds its row ('' = none)
    compare_ckpt = ''              # sr='chain' on an H-VAR chain: another chain's x4 row next to it (e.g. HiTokSR's)
    color_fix = 2.0                # sr='chain': the last stage again with sr.py's colour correction (0 = no such row)
    peer = 'realesrgan'            # sr='chain': also Real-ESRGAN x4plus on the same degraded LR, when setup.sh could
                                   # install it (peer.py) | 'none'
    tok_ckpt = 'out/tokenizer_hrq/ckpt.pt'  # sr='scales': a multi-scale RQ tokenizer checkpoint
    tokenization = 'hierarchical'  # sr='scales': 'hierarchical' (Algorithm 1) | 'plain' | 'both'
    val_dir = 'assets/val_pairs'   # made by `python data.py`
    crop_border = 4                # = scale, BasicSR convention
    patch = 8                      # period the grid and periodic scores look for (a tokenizer's patch)
    device = 'cpu'                 # cpu | cuda | mps | auto
    name = ''                      # row name; '' -> bicubic_<lr_kind>, chain or the folder's name
    out_json = ''                  # '' -> out/eval/<name>.json
    report = ''                    # sr='chain': the HTML report, '' -> index.html beside out_json (its PNGs in
                                   # <out_json's name>_images/) | 'none'
    config = configure(globals())
    if lr_kind not in ('degraded', 'bicubic'):
        fail(f"eval.py: lr_kind={lr_kind!r} must be degraded or bicubic")
    for key, path in (('gen_ckpt', gen_ckpt), ('decoder_ckpt', decoder_ckpt), ('compare_ckpt', compare_ckpt)):
        if sr == 'chain' and path and not os.path.isfile(path):
            fail(f"eval.py: {key}='{path}' not found (train that stage first or pass --{key}=PATH)")
    if sr == 'scales' and tokenization not in ('hierarchical', 'plain', 'both'):
        fail(f"eval.py: tokenization={tokenization!r} must be hierarchical, plain or both")
    if peer not in ('realesrgan', 'none'):
        fail(f"eval.py: peer={peer!r} must be realesrgan or none")
    if sr not in ('bicubic', 'chain', 'scales', 'realesrgan') and not os.path.isdir(sr):
        fail(f"eval.py: sr={sr!r} must be 'bicubic', 'chain', 'scales', 'realesrgan' or a folder of SR PNGs")
    if sr == 'realesrgan' and not peer_available()[0]:
        fail(f"eval.py: --sr=realesrgan: {peer_available()[1]}")
    if os.path.isdir(sr) and not any(f.lower().endswith('.png') for f in os.listdir(sr)):
        fail(f"eval.py: --sr={sr} holds no PNG files (expected one per validation pair, NAME.png or NAME_x4.png)")
    if name and not re.fullmatch(r'[\w][\w.+-]*', name):
        fail(f"eval.py: name={name!r} must be a plain file name (letters, digits, _ . + -), it names "
             f"out/eval/<name>.json")
    problems = device_problems(device)
    if problems:
        fail('eval.py: ' + '; '.join(problems))
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'

    import data
    try:
        pairs = data.load_val_pairs(val_dir)
    except ValueError as err:
        fail(f"eval.py: {err}")
    if not 0 <= 2 * crop_border < min(pairs['hr'].shape[-2:]):
        fail(f"eval.py: crop_border={crop_border} must be >= 0 and leave some of the "
             f"{tuple(pairs['hr'].shape[-2:])} HR images")
    lpips_net = load_lpips(device)
    peer_rows = []
    if sr == 'chain':
        name = name or 'chain'
        try:
            rows = chain_rows(pairs, gen_ckpt, decoder_ckpt, lpips_net, crop_border, device, compare_ckpt, color_fix,
                              keep_images=report != 'none')
        except (FileNotFoundError, ValueError) as err:
            fail(f"eval.py: {err}")
        # the peer's row sits under the chain's in the table and apart in the json ('peer_rows'), so
        # rows[-1] stays the chain's last stage, the one the summary block reports; its grid and periodic
        # scores look for the chain tokenizer's patch grid, like the chain's rows
        ok, why = peer_available() if peer == 'realesrgan' else (False, '')
        if ok:
            tok_patch = load_checkpoint(gen_ckpt, '--gen_ckpt', kind='generator')['tok_model_args']['patch']
            peer_rows = [score(PEER_ROW, realesrgan_x4(pairs['lr']), pairs, lpips_net, crop_border, tok_patch,
                               keep_images=report != 'none')]
        elif why:
            print(f"eval.py: no {PEER_ROW} row: {why}", file=sys.stderr)
        print_table(rows + peer_rows)
        print()
        print_summary(rows[-1])
    elif sr == 'realesrgan':  # the peer alone on the degraded LR
        name = name or 'realesrgan'
        t0 = time.time()
        sr_imgs = realesrgan_x4(pairs['lr'])
        if sr_imgs.shape != pairs['hr'].shape:
            fail(f"eval.py: {val_dir}: 4x the LR size {tuple(sr_imgs.shape)} != HR {tuple(pairs['hr'].shape)}")
        print(f"{PEER_ROW}: {(time.time() - t0) / len(sr_imgs):.2f} s per image ({peer_available()[1]})")
        rows = [score(PEER_ROW, sr_imgs, pairs, lpips_net, crop_border, patch)]
        print_table(per_image_rows(rows[0]))
        print()
        print_summary(rows[0])
    elif sr == 'scales':  # a multi-scale RQ tokenizer's reconstructions at every scale (HR crops)
        name = name or 'scales'
        try:
            tok = load_tokenizer(tok_ckpt, device)
        except (FileNotFoundError, ValueError) as err:
            fail(f"eval.py: {err}")
        if tok.config.quantizer != 'msrq':
            fail(f"eval.py: {tok_ckpt} holds a grouped-VQ tokenizer; sr=scales needs quantizer='msrq'")
        kinds = ('plain', 'hierarchical') if tokenization == 'both' else (tokenization,)
        rows = [r for t in kinds for r in scale_rows(tok, pairs, t, lpips_net, crop_border, device)]
        print_table(rows)
    else:
        if sr == 'bicubic':
            name = name or f'bicubic_{lr_kind}'
            sr_imgs = bicubic_upsample(pairs['lr' if lr_kind == 'degraded' else 'lr_bicubic'])
            if sr_imgs.shape != pairs['hr'].shape:
                fail(f"eval.py: {val_dir}: 4x the LR size {tuple(sr_imgs.shape)} != HR {tuple(pairs['hr'].shape)}")
        else:
            name = name or Path(sr).resolve().name
            try:
                sr_imgs = load_sr_dir(sr, pairs['names'], pairs['hr'].shape[1:])
            except (FileNotFoundError, ValueError) as err:  # missing, unreadable or mis-sized files
                fail(f"eval.py: {err}")
        rows = [score(name, sr_imgs, pairs, lpips_net, crop_border, patch)]
        print_table(per_image_rows(rows[0]))
        print()
        print_summary(rows[0])
    out_json = out_json or os.path.join('out', 'eval', f'{name}.json')
    images = {r['name']: r.pop('images') for r in rows + peer_rows if 'images' in r}  # the report's, not the JSON's
    result = dict(command=' '.join([os.path.basename(sys.executable)] + sys.argv), config=config,
                  rows=rows, **(dict(peer_rows=peer_rows) if sr == 'chain' else {}))
    write_json(result, out_json)
    print(f"wrote {out_json}")
    if images:  # sr='chain': what a person looks at, every number from `result`
        from chain import load_sr_chain, preview
        from common import to_uint8
        from report import write_report
        tok, gen, prior = load_sr_chain(gen_ckpt, device, decoder_ckpt or None)
        frames = preview(pairs['lr'], tok, gen, prior, color_fix, device)  # the last = the last row
        report = report or os.path.join(os.path.dirname(out_json), 'index.html')
        columns = ([('LR (nearest)', None, to_uint8(pairs['lr']))] +
                   [(n, n, to_uint8(imgs)) for n, imgs in images.items()] + [('HR', None, to_uint8(pairs['hr']))])
        write_report(report, result, columns, frames, title=name,
                     images_dir=os.path.splitext(os.path.basename(out_json))[0] + '_images')
        print(f"wrote {report} (open it in a browser)")
