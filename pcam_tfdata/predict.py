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


def predict_test(model, records_dir, batch_size=128, tta=False):
  """Probabilities of class 1 for every test id.

  Returns:
    (ids, probabilities) in the records' order.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from pcam_tfdata import pipeline  # pylint: disable=g-import-not-at-top
  ds = pipeline.make_dataset(records_dir, 'test', batch_size=batch_size, training=False,
                             with_ids=True)
  transforms = range(8) if tta else range(1)

  @tf.function(reduce_retracing=True)
  def forward(images):
    outs = [model(pipeline.dihedral_transform(images, k), training=False) for k in transforms]
    return tf.reshape(tf.reduce_mean(tf.stack(outs), 0), [-1])

  ids, probs = [], []
  for images, _, batch_ids in ds:
    probs.append(forward(images).numpy())
    ids.extend(i.decode() for i in batch_ids.numpy())
  return np.asarray(ids), np.concatenate(probs)


def write_submission(ids, probs, output, sample_submission=None):
  """Writes id,label; in sample_submission's order when given.

  Raises:
    ValueError: an id of the sample submission is not among the predictions,
      or the sample has no `id` column or repeats an id.
  """
  import pandas as pd  # pylint: disable=g-import-not-at-top
  from pcam_tfdata import kaggle  # pylint: disable=g-import-not-at-top
  frame = pd.DataFrame({'id': ids, 'label': probs})
  if sample_submission:
    try:
      order = kaggle.read_id_csv(sample_submission, 'label')['id']
    except kaggle.SourceError as e:
      raise ValueError(str(e)) from None
    known = set(ids)
    missing = [i for i in order if i not in known]
    if missing:
      raise ValueError(f'{sample_submission}: id {missing[0]} is not in the test records '
                       f'({len(missing)} such ids)')
    frame = frame.set_index('id').loc[order.to_numpy()].reset_index()
  tmp = output + '.partial'
  frame.to_csv(tmp, index=False, float_format='%.6f')
  os.replace(tmp, output)  # No half-written submission under the real name.
  return frame


def main(argv):
  if len(argv) > 1:
    print(f'predict: error: unexpected arguments {" ".join(argv[1:])}', file=sys.stderr)
    sys.exit(1)
  import keras  # pylint: disable=g-import-not-at-top
  from pcam_tfdata import schema  # pylint: disable=g-import-not-at-top
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
    ids, probs = predict_test(model, _RECORDS_DIR.value, _BATCH_SIZE.value, _TTA.value)
    frame = write_submission(ids, probs, _OUTPUT.value, _SAMPLE_SUBMISSION.value)
  except (ValueError, schema.ManifestError) as e:
    print(f'predict: error: {e}', file=sys.stderr)
    sys.exit(1)
  print(f'wrote {len(frame)} predictions to {_OUTPUT.value}')


if __name__ == '__main__':
  app.run(main)
