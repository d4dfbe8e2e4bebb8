r"""Writes the Kaggle submission: id,label with label the probability of class 1.

    python -m pcam_tfdata.predict --model_dir=runs/demo/batchnorm \
        --records_dir=records/demo --output=submission.csv \
        --sample_submission=records/demo_kaggle/sample_submission.csv --tta
"""

import os
import sys

from absl import app
from absl import flags

_MODEL_DIR = flags.DEFINE_string('model_dir', None, 'A finished run (holds model.keras).')
_RECORDS_DIR = flags.DEFINE_string('records_dir', 'records/demo', 'Records with a test split.')
_OUTPUT = flags.DEFINE_string('output', 'submission.csv', 'The CSV to write.')
_SAMPLE_SUBMISSION = flags.DEFINE_string(
    'sample_submission', None, "Kaggle's sample_submission.csv: rows in its order, and every "
    'id in it must be in the records.')
_TTA = flags.DEFINE_bool('tta', False, 'Average the 8 flips and rotations of each patch.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 128, 'Prediction batch, as the seed.')


def main(argv):
  if len(argv) > 1:
    print(f'predict: error: unexpected arguments {" ".join(argv[1:])}', file=sys.stderr)
    sys.exit(1)
  import keras  # pylint: disable=g-import-not-at-top
  from pcam_tfdata import schema  # pylint: disable=g-import-not-at-top
  from pcam_tfdata import submission  # pylint: disable=g-import-not-at-top
  from pcam_tfdata import trainer  # pylint: disable=g-import-not-at-top
  if not _MODEL_DIR.value:
    print('predict: error: --model_dir is required', file=sys.stderr)
    sys.exit(1)
  path = os.path.join(_MODEL_DIR.value, trainer.MODEL_FILE)
  if not os.path.isfile(path):
    print(f'predict: error: {path}: no such model (train first)', file=sys.stderr)
    sys.exit(1)
  try:
    model = keras.models.load_model(path)
    ids, probs = submission.predict_test(model, _RECORDS_DIR.value, _BATCH_SIZE.value,
                                         _TTA.value)
    frame = submission.write_submission(ids, probs, _OUTPUT.value, _SAMPLE_SUBMISSION.value)
  except (ValueError, schema.ManifestError) as e:
    print(f'predict: error: {e}', file=sys.stderr)
    sys.exit(1)
  print(f'wrote {len(frame)} predictions to {_OUTPUT.value}')


if __name__ == '__main__':
  app.run(main)
