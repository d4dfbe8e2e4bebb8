r"""Writes the Kaggle submission: id,label with label the probability of class 1.

    python -m pcam_tfdata.predict --model_dir=runs/demo/batchnorm \
        --records_dir=records/demo --output=submission.csv \
        --sample_submission=records/demo_kaggle/sample_submission.csv --tta
"""

import os
import zipfile

from absl import app
from absl import flags

from pcam_tfdata import cli
from pcam_tfdata import rundir
from pcam_tfdata import schema

_MODEL_DIR = flags.DEFINE_string('model_dir', None, 'A finished run (holds model.keras).')
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


def main(argv):
  if len(argv) > 1:
    cli.fail('predict', f'unexpected arguments {" ".join(argv[1:])}')
  if not _MODEL_DIR.value:
    cli.fail('predict', '--model_dir is required')
  if _BATCH_SIZE.value < 1:
    cli.fail('predict', f'--batch_size={_BATCH_SIZE.value}: must be >= 1')
  path = os.path.join(_MODEL_DIR.value, rundir.MODEL_FILE)
  if not os.path.isfile(path):
    cli.fail('predict', f'{path}: no such model (train first)')
  try:
    schema.load_manifest(_RECORDS_DIR.value)  # A wrong folder fails before TF starts.
  except schema.ManifestError as e:
    cli.fail('predict', e)
  cli.import_tensorflow(_VERBOSE.value)
  import keras  # pylint: disable=g-import-not-at-top
  from pcam_tfdata import submission  # pylint: disable=g-import-not-at-top
  try:
    # safe_mode (Keras' default, kept explicit): a model file cannot run code on load.
    model = keras.models.load_model(path, safe_mode=True)
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    cli.fail('predict', f'{path}: unreadable model ({str(e).splitlines()[0] if str(e) else e})')
  try:
    ids, probs = submission.predict_test(model, _RECORDS_DIR.value, _BATCH_SIZE.value,
                                         _TTA.value, show_progress=_PROGRESS.value)
    frame = submission.write_submission(ids, probs, _OUTPUT.value, _SAMPLE_SUBMISSION.value)
  except ValueError as e:  # schema.ManifestError is one.
    cli.fail('predict', e)
  print(f'wrote {len(frame)} predictions to {_OUTPUT.value}')


if __name__ == '__main__':
  app.run(main)
