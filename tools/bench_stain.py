r"""How strongly `--stain_jitter=s` changes real patches' colours.

    python tools/bench_stain.py --patches_dir=../shared/fixtures/real_patches

For each strength, over every patch's center crop and --draws draws: the mean
absolute change of the RGB values per image (0-255), and the share of pixels
driven to pure black or white. Not a throughput figure (tools/bench_input.py
has those); it calibrates the flag: the strength is in the units of
skimage.color.rgb2hed, whose concentrations of H&E tissue span only about
0 to 0.1.
"""

import glob
import os

from absl import app
from absl import flags
import numpy as np

from pcam_tfdata import cli
from pcam_tfdata.convert import tiff
from pcam_tfdata import hostinfo

_PATCHES_DIR = flags.DEFINE_string('patches_dir', '../shared/fixtures/real_patches',
                                   'A folder of 96x96 RGB patches (TIFF or PNG).')
_STRENGTHS = flags.DEFINE_list('strengths', ['0.005', '0.01', '0.02', '0.05', '0.2'],
                               'Values of --stain_jitter to measure.')
_CROP = flags.DEFINE_integer('crop_size', 32, 'Center crop, as the records hold.')
_DRAWS = flags.DEFINE_integer('draws', 20, 'Draws per patch and strength.')


def main(argv):
  del argv
  tf = cli.import_tensorflow()
  from pcam_tfdata.training import augment  # pylint: disable=g-import-not-at-top
  paths = sorted(p for p in glob.glob(os.path.join(_PATCHES_DIR.value, '*'))
                 if p.lower().endswith(('.tif', '.tiff', '.png')))
  if not paths:
    cli.fail('bench_stain.py', f'--patches_dir={_PATCHES_DIR.value}: no TIFF or PNG patches')
  c = (96 - _CROP.value) // 2
  images = np.stack([tiff.read_patch(p)[c:c + _CROP.value, c:c + _CROP.value] for p in paths])
  print(f'{len(images)} patches from {_PATCHES_DIR.value}, crop {_CROP.value}, '
        f'{_DRAWS.value} draws each; {hostinfo.describe()}\n')
  print('| --stain_jitter | mean abs RGB change per image: median | p95 | '
        'pixels driven to black/white: median | p95 |')
  print('|---:|---:|---:|---:|---:|')
  for strength in map(float, _STRENGTHS.value):
    change, saturated = [], []
    for draw in range(_DRAWS.value):
      out = augment.stain_jitter(tf.constant(images), strength,
                                 tf.constant([draw, 0], tf.int64)).numpy().astype(int)
      change.append(np.abs(out - images).mean(axis=(1, 2, 3)))
      saturated.append(((out == 0) | (out == 255)).all(-1).mean(axis=(1, 2)))
    change, saturated = np.concatenate(change), 100 * np.concatenate(saturated)
    print(f'| {strength:g} | {np.median(change):.1f} | {np.percentile(change, 95):.1f} | '
          f'{np.median(saturated):.1f}% | {np.percentile(saturated, 95):.1f}% |')


if __name__ == '__main__':
  app.run(main)
