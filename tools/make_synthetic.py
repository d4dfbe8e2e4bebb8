r"""Writes a synthetic PCam set in the exact Kaggle layout and TIFF format.

    python tools/make_synthetic.py --out_dir=/tmp/pcam_synth --num_train=6000 --num_test=1000

The label depends only on the center 32x32 (see pcam_tfdata/synthetic.py).
"""

import sys

from absl import flags

from pcam_tfdata import cli
from pcam_tfdata.convert import synthetic

_OUT_DIR = flags.DEFINE_string('out_dir', None, 'Folder to create.', required=True)
_NUM_TRAIN = flags.DEFINE_integer('num_train', 6000, 'Labelled patches in train/.')
_NUM_TEST = flags.DEFINE_integer('num_test', 1000, 'Unlabelled patches in test/.')
_SEED = flags.DEFINE_integer('seed', 0, 'The set is a function of the sizes and the seed.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing folder.')
PROGRAM = 'make_synthetic.py'  # How its errors name it.


def main(argv):
  if len(argv) > 1:
    cli.fail(PROGRAM, f'unexpected arguments {" ".join(argv[1:])}')
  try:
    with cli.writes_to(PROGRAM, f'--out_dir={_OUT_DIR.value}'):
      synthetic.make_dataset(_OUT_DIR.value, _NUM_TRAIN.value, _NUM_TEST.value, _SEED.value,
                             overwrite=_OVERWRITE.value)
  except ValueError as e:
    cli.fail(PROGRAM, e)
  print(f'wrote {_NUM_TRAIN.value} train and {_NUM_TEST.value} test patches to {_OUT_DIR.value}')


if __name__ == '__main__':
  cli.run_program(sys.modules[__name__])
