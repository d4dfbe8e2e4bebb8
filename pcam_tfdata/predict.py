r"""Writes the Kaggle submission: id,label with label the probability of class 1.

    python -m pcam_tfdata.predict --model_dir=runs/demo/batchnorm \
        --records_dir=records/demo --output=submission.csv \
        --sample_submission=records/demo_kaggle/sample_submission.csv --tta

Several runs (e.g. one per cross-validation fold), comma-separated, make an
ensemble: the mean of their probabilities. On a labelled test split (PCam's
HDF5 source) the metrics of that mean are printed too.
"""

import sys

import numpy as np

from absl import flags

from pcam_tfdata import cli
from pcam_tfdata import fs
from pcam_tfdata import records as records_lib
from pcam_tfdata import rundir
from pcam_tfdata import schema

_MODEL_DIR = flags.DEFINE_list(
    'model_dir', None, 'A finished run (holds model.keras), or several, comma-separated: '
    'their mean probability (a fold ensemble).')
_RECORDS_DIR = flags.DEFINE_string('records_dir', 'records/demo', 'Records with a test split.')
_OUTPUT = flags.DEFINE_string('output', 'submission.csv', 'The CSV to write.')
_SAMPLE_SUBMISSION = flags.DEFINE_string(
    'sample_submission', None, "Kaggle's sample_submission.csv: rows in its order, and every "
    'id in it must be in the records.')
_TTA = flags.DEFINE_bool('tta', False, 'Average the 8 flips and rotations of each patch.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 128, 'Prediction batch, as the seed.')
_PROGRESS = flags.DEFINE_bool('progress', True, 'Show progress over the test batches '
                              '(--noprogress for none).')
_VERBOSE = flags.DEFINE_bool('verbose', False, "Show TensorFlow's C++ info and warning lines.")
PROGRAM = 'predict'  # How its errors name it (also as __main__).


def main(argv):
  if len(argv) > 1:
    cli.fail(PROGRAM, f'unexpected arguments {" ".join(argv[1:])}')
  if not _MODEL_DIR.value:
    cli.fail(PROGRAM, '--model_dir is required')
  if _BATCH_SIZE.value < 1:
    cli.fail(PROGRAM, f'--batch_size={_BATCH_SIZE.value}: must be >= 1')
  if '' in _MODEL_DIR.value:  # 'a,' would otherwise read ./model.keras as a member.
    cli.fail(PROGRAM, f'--model_dir={",".join(_MODEL_DIR.value)}: an empty entry')
  cli.import_tensorflow_for((*_MODEL_DIR.value, _RECORDS_DIR.value, _OUTPUT.value,
                            _SAMPLE_SUBMISSION.value), _VERBOSE.value)
  for model_dir in _MODEL_DIR.value:  # Before TF starts (but for URLs), as the records below.
    path = fs.join(model_dir, rundir.MODEL_FILE)
    if not fs.isfile(path):
      cli.fail(PROGRAM, f'{path}: no such model (train first)')
  try:
    records = records_lib.Records.open(_RECORDS_DIR.value)
  except schema.ManifestError as e:
    cli.fail(PROGRAM, e)
  _check_output(_OUTPUT.value)
  cli.import_tensorflow(_VERBOSE.value)
  from pcam_tfdata.training import api  # pylint: disable=g-import-not-at-top
  from pcam_tfdata.training import evaluate  # pylint: disable=g-import-not-at-top
  from pcam_tfdata.training import submission  # pylint: disable=g-import-not-at-top
  try:
    ids, probs, labels = api.predict(_MODEL_DIR.value, records, 'test', tta=_TTA.value,
                                     batch_size=_BATCH_SIZE.value, with_labels=True,
                                     progress=_PROGRESS.value)
    with cli.writes_to(PROGRAM, f'--output={_OUTPUT.value}'):
      frame = submission.write_submission(ids, probs, _OUTPUT.value, _SAMPLE_SUBMISSION.value)
  except ValueError as e:  # schema.ManifestError and verify.CorruptShardError are ones.
    cli.fail(PROGRAM, e)
  if len(labels) and np.isin(labels, (0, 1)).all():  # Labelled (PCam's test split).
    metrics = evaluate.binary_metrics(labels, probs)
    count = len(_MODEL_DIR.value)
    print(f'test split ({count} model{"s" if count > 1 else ""}'
          f'{", TTA" if _TTA.value else ""}): ' +
          ' '.join(f'{k}={v:.4f}' for k, v in metrics.items()))
  print(f'wrote {len(frame)} predictions to {_OUTPUT.value}')


def _check_output(output):
  """Fails in one line, before any prediction, where --output cannot be written."""
  folder = fs.dirname(fs.abspath(output))
  if fs.isdir(output):
    cli.fail(PROGRAM, f'cannot write --output={output}: it is a folder')
  if not fs.is_url(output) and not fs.isdir(folder):  # (A bucket has no folders to make.)
    what = 'is a file' if fs.exists(folder) else 'does not exist'
    cli.fail(PROGRAM, f'cannot write --output={output}: its folder {folder} {what}')
  with cli.writes_to(PROGRAM, f'--output={output}'):
    rundir.check_writable(folder)


if __name__ == '__main__':
  cli.run_program(sys.modules[__name__])
