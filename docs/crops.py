"""The before / after picture of docs/results.md: for a few validation images, 64-px crops at 2x
zoom (pixel repetition) of bicubic | sr.py's output before | after | HR, one row per crop.
    python docs/crops.py BEFORE_DIR AFTER_DIR docs/img/crops.png
BEFORE_DIR and AFTER_DIR hold sr.py's NAME_x4.png of the degraded validation LR images
(assets/val_pairs/lr); bicubic is computed here from the same LR, HR is assets/val_pairs/hr."""
import os
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from degradation import bicubic_upsample  # noqa: E402
from report import enlarge, strip  # noqa: E402

CROPS = [('ColorfulCups', 120, 60), ('ColorfulCups', 10, 120), ('FallenLeaf', 120, 150), ('Kite', 150, 100),
         ('Path', 100, 100)]  # name, top, left: rims, a leaf's edge, sky, forest
SIDE, ZOOM = 64, 2


def load(path):
    return np.asarray(Image.open(path).convert('RGB'))


def main(before_dir, after_dir, out_path, val_dir='assets/val_pairs'):
    rows = []
    for name, top, left in CROPS:
        lr = torch.from_numpy(load(f'{val_dir}/lr/{name}.png').copy()).permute(2, 0, 1)[None].float() / 255
        bic = (bicubic_upsample(lr, 4)[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        images = [bic, load(f'{before_dir}/{name}_x4.png'), load(f'{after_dir}/{name}_x4.png'),
                  load(f'{val_dir}/hr/{name}.png')]
        crops = [enlarge(im[top:top + SIDE, left:left + SIDE], SIDE * ZOOM, SIDE * ZOOM) for im in images]
        rows.append(strip(crops))
    gap = np.full((4, rows[0].shape[1], 3), 255, dtype=np.uint8)
    Image.fromarray(np.concatenate(sum([[r, gap] for r in rows], [])[:-1])).save(out_path)
    print(f"wrote {out_path}: columns bicubic | before | after | HR; rows {CROPS}")


if __name__ == '__main__':
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
