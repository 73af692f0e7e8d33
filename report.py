"""
What a person looks at: the coarse-to-fine strip and animation of sr.py --preview, and the HTML
report eval.py --sr=chain writes beside its JSON (index.html): the table on top, then per validation
image the LR (nearest), every row's output, the peer and the HR side by side, whole and as a zoomed
crop, each with its metrics, and the chain's coarse-to-fine frames. One folder that opens offline
in any browser: relative links only, every image a PNG written here. Standard library, numpy and
Pillow only; no module of the project.
"""
import html
import os
import re
from urllib.parse import quote

import numpy as np
from PIL import Image

# the metrics of a row (metrics.METRICS) as eval.py's table shows them: header, decimals
COLUMNS = (('psnr_y', 'PSNR-Y (dB)', 2), ('ssim_y', 'SSIM-Y', 4), ('lpips', 'LPIPS', 4), ('lpips_vgg', 'LPIPS-VGG', 4),
           ('grid', 'grid score', 3), ('periodic', 'periodic', 2), ('color_err', 'colour error', 2))
FRAME_MS, LAST_FRAME_MS = 700, 1500  # the animation: each coarse frame, then the output held longer
STYLE = """body { font-family: sans-serif; margin: 1em; background: #fafafa; }
table { border-collapse: collapse; } td, th { padding: 2px 8px; border-bottom: 1px solid #ddd; text-align: right; }
td:first-child, th:first-child { text-align: left; }
.row { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
figure { margin: 0; } figcaption { font-size: 13px; max-width: 256px; }
img { display: block; image-rendering: pixelated; } .m td { font-size: 12px; }"""


def _fmt(v, digits):
    return '-' if v is None else f'{v:.{digits}f}'


def enlarge(img, H, W):
    """uint8 (h, w, 3) -> (H, W, 3) by pixel repetition (nearest), H / h and W / w whole numbers:
    a coarse frame or the LR is shown at the output's size without smoothing what it lacks."""
    h, w = img.shape[:2]
    if H % h or W % w or H // h != W // w:
        raise ValueError(f"enlarge: {h}x{w} does not scale by one whole factor to {H}x{W}")
    return img.repeat(H // h, 0).repeat(W // w, 1)


def strip(frames, gap=4):
    """[uint8 (H, W, 3)] of one size -> one image (H, n W + (n - 1) gap, 3), the frames left to
    right with white gaps between them."""
    H, W = frames[0].shape[:2]
    out = np.full((H, len(frames) * (W + gap) - gap, 3), 255, dtype=np.uint8)
    for i, f in enumerate(frames):
        out[:, i * (W + gap):i * (W + gap) + W] = f
    return out


def _atomic_save(img, path, **kw):
    """Pillow writes to a temporary file beside path, then it replaces path: a reader never sees half a file."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        img.save(tmp, format='PNG', **kw)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_png(img, path):
    """uint8 (H, W, 3) -> an 8-bit RGB PNG, written atomically."""
    _atomic_save(Image.fromarray(np.ascontiguousarray(img)), path)


def save_animation(frames, path):
    """[uint8 (H, W, 3)] -> an animated PNG (APNG: lossless, so the colours are exact, unlike a GIF's
    256-colour palette) that loops: each frame FRAME_MS ms, the last LAST_FRAME_MS. Its default
    image, what a viewer without APNG support shows, is the last frame (the output); Pillow counts it
    as frame 0 when reading the file back."""
    ims = [Image.fromarray(np.ascontiguousarray(f)) for f in frames]
    _atomic_save(ims[-1], path, save_all=True, append_images=ims, default_image=True, loop=0,
                 duration=[FRAME_MS] * (len(ims) - 1) + [LAST_FRAME_MS])


def centre_crop(H, W, crop):
    """(top, left, side) of the centred square crop of side min(crop, H, W)."""
    side = min(crop, H, W)
    return (H - side) // 2, (W - side) // 2, side


def _metric_cells(row, image=None, index=None):
    """<td> per metric of a row (its mean, or its value on image number `index`), each tagged with
    the row, the image ('' = the mean) and the key, so that a reader (or a test) can find the number
    in the JSON."""
    cells = []
    for key, _, digits in COLUMNS:
        v = row.get(key) if index is None else (row['per_image'].get(key) or [None] * (index + 1))[index]
        cells.append(f'<td data-row="{html.escape(row["name"])}" data-image="{html.escape(image or "")}" '
                     f'data-key="{key}">{_fmt(v, digits)}</td>')
    return cells


def write_report(path, result, columns, previews=None, title='', images_dir=None, crop=64, zoom=2):
    """Write the HTML report `path` and its PNGs (in images_dir, a folder name beside path; default
    <path's stem>_images).
    result: the evaluation's JSON dict (command, rows, optional peer_rows; a row: name, the metric
    means and per_image = {names, one list per metric}): its table heads the page and every number
    shown comes from it.
    columns: [(title, row name or None, uint8 (N, h, w, 3))] in the order shown, one image per
    validation pair in per_image's order; images smaller than the largest are enlarged (nearest).
    previews: None or [(label, uint8 (N, h, w, 3))], the chain's coarse-to-fine frames, shown side by
    side and as an animated PNG. title: the page's heading.
    crop: side of the centred crop in output pixels, shown `zoom` times enlarged (nearest).
    -> the list of the PNG files written."""
    folder = os.path.dirname(path) or '.'
    images_dir = images_dir or os.path.splitext(os.path.basename(path))[0] + '_images'
    rows = {r['name']: r for r in result['rows'] + result.get('peer_rows', [])}
    names = next(iter(rows.values()))['per_image']['names']
    H = max(a.shape[1] for _, _, a in columns)
    W = max(a.shape[2] for _, _, a in columns)
    top, left, side = centre_crop(H, W, crop)
    written = []

    def png(img, rel):  # -> the relative link of a new PNG
        save_png(img, os.path.join(folder, images_dir, rel))
        written.append(os.path.join(folder, images_dir, rel))
        return quote(f'{images_dir}/{rel}')

    title = html.escape(title or os.path.splitext(os.path.basename(path))[0])
    out = [f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{title}</title><style>\n{STYLE}\n</style>'
           f'</head><body>\n<h1>Evaluation: {title}</h1>\n<p><code>{html.escape(result.get("command", ""))}</code></p>',
           '<table><tr><th>name</th>' + ''.join(f'<th>{h}</th>' for _, h, _ in COLUMNS) + '</tr>']
    out += [f'<tr><td>{html.escape(r["name"])}</td>{"".join(_metric_cells(r))}</tr>' for r in rows.values()]
    out.append(f'</table>\n<p>Per image: whole at {W}x{H}, then the centre {side}x{side} pixels '
               f'enlarged {zoom}x (nearest, as are the LR and every coarser output).</p>')
    for i, name in enumerate(names):
        d = re.sub(r'[^\w.-]+', '_', str(name))
        out.append(f'<h2>{html.escape(str(name))}</h2>\n<div class="row">')
        for j, (col_title, row_name, imgs) in enumerate(columns):
            whole = enlarge(imgs[i], H, W)
            zoomed = enlarge(whole[top:top + side, left:left + side], side * zoom, side * zoom)
            cells = ''
            if row_name is not None:
                tds = _metric_cells(rows[row_name], name, i)
                cells = '<table class="m">' + ''.join(f'<tr><td>{h}</td>{c}</tr>' for (_, h, _), c in zip(COLUMNS, tds))
                cells += '</table>'
            out.append(f'<figure><figcaption>{html.escape(col_title)}</figcaption>'
                       f'<img src="{png(whole, f"{d}/{j:02d}.png")}" width="{W}" height="{H}" alt="">'
                       f'<img src="{png(zoomed, f"{d}/{j:02d}_crop.png")}" width="{side * zoom}" '
                       f'height="{side * zoom}" alt="">{cells}</figure>')
        out.append('</div>')
        if previews:
            frames = [enlarge(f[i], H, W) for _, f in previews]
            out.append('<h3>coarse to fine</h3>\n<div class="row">')
            for k, ((label, _), f) in enumerate(zip(previews, frames)):
                out.append(f'<figure><figcaption>{html.escape(label)}</figcaption>'
                           f'<img src="{png(f, f"{d}/frame{k}.png")}" width="{W}" height="{H}" alt=""></figure>')
            anim = os.path.join(folder, images_dir, d, 'preview_anim.png')
            save_animation(frames, anim)
            written.append(anim)
            link = quote(f'{images_dir}/{d}/preview_anim.png')
            out.append(f'<figure><figcaption>animated</figcaption><img src="{link}" width="{W}" height="{H}" alt="">'
                       f'</figure></div>')
    out.append('</body></html>\n')
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w', encoding='utf-8') as f:
        f.write('\n'.join(out))
    os.replace(tmp, path)
    return written
