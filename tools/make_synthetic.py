r"""Writes a synthetic PCam set in the exact Kaggle layout and TIFF format.

    python tools/make_synthetic.py --out_dir=/tmp/pcam_synth --num_train=6000 --num_test=1000
    python tools/make_synthetic.py --out_dir=/tmp/standin --num_train=24000 --difficulty=pcam

`--difficulty=demo` (the default) is a set every model solves;
`--difficulty=pcam` is the stand-in as hard as PCam, with slides.csv and
centres.csv, whose knobs are the flags below (pcam_tfdata/convert/standin.py
says what on real PCam each stands for).
"""

import dataclasses
import sys

from absl import flags

from pcam_tfdata import cli
from pcam_tfdata.convert import standin
from pcam_tfdata.convert import synthetic

_OUT_DIR = flags.DEFINE_string('out_dir', None, 'Folder to create.', required=True)
_NUM_TRAIN = flags.DEFINE_integer('num_train', 6000, 'Labelled patches in train/.')
_NUM_TEST = flags.DEFINE_integer('num_test', 1000, 'Unlabelled patches in test/.')
_SEED = flags.DEFINE_integer('seed', 0, 'The set is a function of the sizes, the knobs and the seed.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing folder.')
_WORKERS = flags.DEFINE_integer('workers', 0, 'Processes drawing patches (0: every core); '
                                'the set is byte-identical for any number.')
_DIFFICULTY = flags.DEFINE_enum('difficulty', 'demo', synthetic.DIFFICULTIES,
                                'demo: every model solves it; pcam: the stand-in as hard as PCam.')
_KNOBS = {
    field.name: (flags.DEFINE_integer if field.type is int else flags.DEFINE_float)(
        field.name, field.default, f'With --difficulty=pcam: {standin.HELP[field.name]}')
    for field in dataclasses.fields(standin.StandIn)}
PROGRAM = 'make_synthetic.py'  # How its errors name it.


def _difficulty():
  """'demo', or the StandIn the knob flags describe."""
  given = [f'--{name}' for name, flag in _KNOBS.items() if flags.FLAGS[name].present]
  if _DIFFICULTY.value == 'demo':
    if given:
      raise ValueError(f'{given[0]} is a knob of --difficulty=pcam, not of the demo')
    return 'demo'
  try:
    return standin.StandIn(**{name: flag.value for name, flag in _KNOBS.items()})
  except ValueError as e:
    raise ValueError(f'--{e}') from None


def main(argv):
  if len(argv) > 1:
    cli.fail(PROGRAM, f'unexpected arguments {" ".join(argv[1:])}')
  if _WORKERS.value < 0:
    cli.fail(PROGRAM, f'--workers={_WORKERS.value}: must be >= 0')
  try:
    difficulty = _difficulty()
    with cli.writes_to(PROGRAM, f'--out_dir={_OUT_DIR.value}'):
      synthetic.make_dataset(_OUT_DIR.value, _NUM_TRAIN.value, _NUM_TEST.value, _SEED.value,
                             overwrite=_OVERWRITE.value, workers=_WORKERS.value or None,
                             difficulty=difficulty)
  except ValueError as e:
    cli.fail(PROGRAM, e)
  print(f'wrote {_NUM_TRAIN.value} train and {_NUM_TEST.value} test patches to {_OUT_DIR.value}'
        + ('' if difficulty == 'demo' else f', with {synthetic.SLIDES_CSV} and {synthetic.CENTRES_CSV}'))


if __name__ == '__main__':
  cli.run_program(sys.modules[__name__])
