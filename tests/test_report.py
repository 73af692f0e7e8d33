"""What a person looks at: eval.py --sr=chain's HTML report (report.py) read back with html.parser
(every image it names exists beside it, relative links only, every number equal to the JSON's as
shown), and sr.py --preview's frames against the chain's own coarse decodes made here through model
calls: HiTokSR's first k groups, H-VAR's x1 / x2 / x4, texture VQ's structure map alone."""
import json
from html.parser import HTMLParser
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import torch
from PIL import Image

import data
import report
from chain import hvar_super_resolve, load_sr_chain, super_resolve
from common import to_uint8
from conftest import assert_images_close
from metrics import METRICS
from model import lr_anchor
from test_hvar import HVAR, MSRQ
from test_tvq import GEN_TVQ, TOK_TVQ

GAP = 4  # report.strip's default gap between frames, in pixels


class Page(HTMLParser):
    """A page's <img> sources in order and its metric cells: (data-row, data-image, data-key, text)."""
    def __init__(self, text):
        super().__init__()
        self.imgs, self.cells, self._cell = [], [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == 'img':
            self.imgs.append(a['src'])
        elif tag == 'td' and 'data-key' in a:
            self._cell = [a['data-row'], a['data-image'], a['data-key'], '']

    def handle_data(self, text):
        if self._cell is not None:
            self._cell[3] += text

    def handle_endtag(self, tag):
        if tag == 'td' and self._cell is not None:
            self.cells.append(tuple(self._cell))
            self._cell = None


def check_report(index, saved):
    """index.html against the JSON it was written with -> the Page. Every <img> is a relative link to
    a file that exists; every metric of every row (mean and per image) is shown once, equal to the
    JSON's value rounded to the decimals shown (at least 2), '-' where the JSON has none."""
    page = Page(index.read_text())
    for src in page.imgs:
        u = urlparse(src)
        assert not u.scheme and not u.netloc and not src.startswith('/') and '..' not in src, src
        assert (index.parent / unquote(src)).is_file(), src
    rows = {r['name']: r for r in saved['rows'] + saved.get('peer_rows', [])}
    names = saved['rows'][0]['per_image']['names']
    shown = []
    for row, image, key, text in page.cells:
        r = rows[row]
        v = r.get(key) if image == '' else (r['per_image'].get(key) or [None] * len(names))[names.index(image)]
        if v is None:
            assert text == '-', (row, image, key, text)
        else:
            decimals = len(text.split('.')[1])
            assert decimals >= 2 and abs(float(text) - v) <= 0.5 * 10 ** -decimals + 1e-12, (row, image, key, text, v)
        shown.append((row, image, key))
    assert sorted(shown) == sorted((r, i, k) for r in rows for i in ['', *names] for k in METRICS)
    return page


def png(path):
    return np.array(Image.open(path).convert('RGB'))


def apng_frames(path):
    """The animation's frames, its default image (shown by viewers without APNG) dropped -> (frames, default)."""
    im = Image.open(path)
    frames = []
    for k in range(im.n_frames):
        im.seek(k)
        frames.append(np.array(im.convert('RGB')))
    assert im.default_image
    return frames[1:], frames[0]


def preview_files(out, name, W):
    """sr.py --preview's NAME_preview.png cut into its frames of width W, and NAME_preview_anim.png's frames."""
    s = png(out / f'{name}_preview.png')
    n = (s.shape[1] + GAP) // (W + GAP)
    assert s.shape[1] == n * W + (n - 1) * GAP and (s[:, W:W + GAP] == 255).all(), s.shape
    frames = [s[:, k * (W + GAP):k * (W + GAP) + W] for k in range(n)]
    anim, default = apng_frames(out / f'{name}_preview_anim.png')
    assert len(anim) == n and all(np.array_equal(a, f) for a, f in zip(anim, frames))
    x4 = png(out / f'{name}_x4.png')
    assert np.array_equal(frames[-1], x4) and np.array_equal(default, x4)  # the last frame is the output
    return frames


def test_strip_enlarge_and_animation_by_hand(tmp_path):
    a, b = np.zeros((2, 3, 3), np.uint8), np.full((2, 3, 3), 7, np.uint8)
    s = report.strip([a, b], gap=2)
    assert s.shape == (2, 8, 3) and (s[:, :3] == 0).all() and (s[:, 3:5] == 255).all() and (s[:, 5:] == 7).all()
    x = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    e = report.enlarge(x, 4, 4)
    assert e.shape == (4, 4, 3) and all((e[2 * i:2 * i + 2, 2 * j:2 * j + 2] == x[i, j]).all()
                                        for i in range(2) for j in range(2))
    with pytest.raises(ValueError, match='whole factor'):
        report.enlarge(x, 4, 6)
    report.save_animation([a, b, a + 3], tmp_path / 'a.png')
    frames, default = apng_frames(tmp_path / 'a.png')
    assert [int(f[0, 0, 0]) for f in frames] == [0, 7, 3] and int(default[0, 0, 0]) == 3


# ----------------------------------------------------------------------------- eval.py's report

@pytest.fixture(scope='module')
def chain_report(run_script, tiny_gen, tiny_val, tmp_path_factory):
    folder = tmp_path_factory.mktemp('report') / 'eval'
    p = run_script('eval.py', ['--sr=chain', f'--gen_ckpt={tiny_gen}', f'--val_dir={tiny_val}',
                               f'--out_json={folder / "chain.json"}'])
    return folder, p.stdout


def test_the_report_names_existing_images_and_shows_the_jsons_numbers(chain_report, tiny_gen, tiny_val):
    folder, stdout = chain_report
    index = folder / 'index.html'
    assert f'wrote {index}' in stdout
    saved = json.loads((folder / 'chain.json').read_text())
    assert all('images' not in r for r in saved['rows'] + saved['peer_rows'])  # the JSON as it was
    page = check_report(index, saved)
    pairs = data.load_val_pairs(str(tiny_val))
    G = torch.load(tiny_gen, weights_only=False)['tok_model_args']['groups']
    # per image: LR, each row, the peer(s), HR, each whole and cropped, then G frames and the animation
    cols = 2 + len(saved['rows']) + len(saved['peer_rows'])
    per_image = 2 * cols + G + 1
    assert len(page.imgs) == len(pairs['names']) * per_image
    for i, name in enumerate(pairs['names']):
        img = lambda k: png(index.parent / unquote(page.imgs[i * per_image + k]))
        lr = to_uint8(pairs['lr'][i]).repeat(4, 0).repeat(4, 1)  # nearest, to the HR's 256 px
        assert np.array_equal(img(0), lr) and np.array_equal(img(2 * cols - 2), to_uint8(pairs['hr'][i]))
        centre = slice(96, 160)  # the centre 64 px of 256, enlarged 2x
        assert np.array_equal(img(1), lr[centre, centre].repeat(2, 0).repeat(2, 1))
        # the chain's rows in the table's order; the last preview frame is the last row (stage 2 + colour
        # correction) made through coarse_to_fine, and the animation holds the frames
        last_row = 2 * len(saved['rows'])
        assert_images_close(img(2 * cols + G - 1), img(last_row), what=f'{name}: last frame vs last row')
        anim, _ = apng_frames(index.parent / unquote(page.imgs[i * per_image + 2 * cols + G]))
        assert len(anim) == G and all(np.array_equal(a, img(2 * cols + k)) for k, a in enumerate(anim))


# ----------------------------------------------------------------------------- sr.py --preview

def test_sr_preview_hitoksr_frames_are_the_first_k_groups(run_script, tiny_gen, tiny_val, tmp_path):
    p = run_script('sr.py', [f'--input={tiny_val}/lr', f'--gen_ckpt={tiny_gen}', f'--out_dir={tmp_path}',
                             '--preview=True', '--color_fix=0'])
    tok, gen, prior = load_sr_chain(tiny_gen)
    G = tok.config.groups
    pairs = data.load_val_pairs(str(tiny_val))
    _, idx = super_resolve(pairs['lr'], tok, gen, prior, return_indices=True)  # the chain's top-1 tokens
    assert f"coarse to fine: 1 group of {G}, 2 groups of {G}" in p.stdout
    for i, name in enumerate(pairs['names']):
        frames = preview_files(tmp_path, name, 256)
        assert len(frames) == G
        for k, frame in enumerate(frames):  # groups > k + 1 zeroed before decoding (model.mask_groups)
            want = to_uint8(tok.decode_indices(idx[i:i + 1], k=k + 1).float())[0]
            assert_images_close(frame, want, what=f'{name}: frame {k + 1} vs the first {k + 1} groups')
        assert not np.array_equal(frames[0], frames[-1])
    assert json.loads((tmp_path / 'sr.json').read_text())['files'] == sorted(
        f'{n}_{t}.png' for n in pairs['names'] for t in ('x4', 'preview', 'preview_anim'))


@pytest.fixture(scope='module')
def hvar_gen(run_script, tiny_val, tmp_path_factory):
    tok, gen = tmp_path_factory.mktemp('hrq'), tmp_path_factory.mktemp('hvar')
    run_script('tokenizer.py', MSRQ + [f'--val_dir={tiny_val}', f'--out_dir={tok}'])
    run_script('generator.py', HVAR + ['--max_iters=2', '--eval_interval=1000', f'--tok_ckpt={tok / "ckpt.pt"}',
                                       f'--val_dir={tiny_val}', f'--out_dir={gen}'])
    return gen / 'ckpt.pt'


def test_sr_preview_hvar_frames_are_x1_x2_x4_and_its_report(run_script, hvar_gen, tiny_val, tmp_path):
    run_script('sr.py', [f'--input={tiny_val}/lr', f'--gen_ckpt={hvar_gen}', f'--out_dir={tmp_path}', '--preview=True',
                         '--color_fix=0'])
    tok, gen, _ = load_sr_chain(hvar_gen)
    pairs = data.load_val_pairs(str(tiny_val))  # 64 px LR: one tile of sr.py's default, one top-1 pass of class 0
    ref = [to_uint8(o) for o in hvar_super_resolve(pairs['lr'], tok, gen, cls=0)]
    for i, name in enumerate(pairs['names']):
        frames = preview_files(tmp_path, name, 256)
        assert len(frames) == 3
        for frame, f, want in zip(frames, (1, 2, 4), ref):
            assert_images_close(frame, report.enlarge(want[i], 256, 256), what=f'{name}: frame x{f}')
    # its report: rows at x1 and x2 are enlarged to the HR's size, their numbers those of the JSON
    js = tmp_path / 'eval' / 'hvar.json'
    run_script('eval.py', ['--sr=chain', f'--gen_ckpt={hvar_gen}', f'--val_dir={tiny_val}', '--peer=none',
                           f'--out_json={js}'])
    page = check_report(js.parent / 'index.html', json.loads(js.read_text()))
    assert all(png(js.parent / unquote(s)).shape[:2] in ((256, 256), (128, 128)) for s in page.imgs)


@pytest.fixture(scope='module')
def tvq_gen(run_script, tiny_val, tmp_path_factory):
    tok, gen = tmp_path_factory.mktemp('tvq_tok'), tmp_path_factory.mktemp('tvq_gen')
    run_script('tokenizer.py', TOK_TVQ + ['--max_iters=2', f'--val_dir={tiny_val}', f'--out_dir={tok}'])
    run_script('generator.py', GEN_TVQ + ['--max_iters=2', f'--tok_ckpt={tok / "ckpt.pt"}', f'--val_dir={tiny_val}',
                                          f'--out_dir={gen}'])
    return gen / 'ckpt.pt'


def test_sr_preview_texture_vq_frames_are_the_structure_map_then_the_decode(run_script, tvq_gen, tiny_val, tmp_path):
    run_script('sr.py', [f'--input={tiny_val}/lr', f'--gen_ckpt={tvq_gen}', f'--out_dir={tmp_path}', '--preview=True',
                         '--color_fix=0', '--tile=0'])
    tok, gen, prior = load_sr_chain(tvq_gen)
    assert prior is None
    pairs = data.load_val_pairs(str(tiny_val))
    lr = pairs['lr']
    anchor = lr_anchor(tok, lr, 4) if gen.config.head == 'codebook' else None
    logits, f_l = gen(lr, None, None, anchor)
    r = tok.config.tvq_down
    # the structure map alone: the tokenizer's structure autoencoder renders it (D_down), at 1/r of the size
    structure = to_uint8(tok.struct_decoder(f_l).float().clamp(0, 1)).repeat(r, 1).repeat(r, 2)
    full = to_uint8(tok.decode_indices(logits.argmax(-1), f_l=f_l).float().clamp(0, 1))
    for i, name in enumerate(pairs['names']):
        frames = preview_files(tmp_path, name, 256)
        assert len(frames) == 2
        assert_images_close(frames[0], structure[i], what=f'{name}: structure map alone')
        assert_images_close(frames[1], full[i], what=f'{name}: structure + texture')
