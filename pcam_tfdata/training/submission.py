"""Test-split predictions (optionally with test-time augmentation) and the Kaggle CSV."""

import io
import zipfile

import numpy as np
import pandas as pd
import tensorflow as tf

from pcam_tfdata.convert import kaggle
from pcam_tfdata import fs
from pcam_tfdata import records as records_lib
from pcam_tfdata import rundir
from pcam_tfdata.training import augment
from pcam_tfdata.training import models as models_lib
from pcam_tfdata.training import pipeline
from pcam_tfdata import progress
from pcam_tfdata.training import verify


def load_models(model_dirs, image_shape, records_path):
  """Each run's model.keras, checked against the records' image shape.

  Keras' safe mode (its default, kept explicit): a model file cannot run
  code on load.

  Raises:
    ValueError: naming the file: missing, unreadable, or trained on
      images of another shape than `records_path` holds.
  """
  models = []
  for model_dir in model_dirs:
    path = fs.join(model_dir, rundir.MODEL_FILE)
    if not fs.isfile(path):
      raise ValueError(f'{path}: no such model (train first)')
    # A URL is read once, into memory (Keras would copy it to a local file).
    source = io.BytesIO(fs.read_bytes(path)) if fs.is_url(path) else path
    if not zipfile.is_zipfile(source):  # (Keras would call it "File not found".)
      raise ValueError(f'{path}: damaged model file (not the zip archive a .keras file is; '
                       'truncated or overwritten?)')
    try:
      model = models_lib.load_model(source)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
      detail = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise ValueError(f'{path}: unreadable model ({detail})') from None
    shape = tuple(model.input_shape[1:])
    if shape != tuple(image_shape):
      raise ValueError(f'{path}: trained on images of {list(shape)}, but {records_path} '
                       f'holds {list(image_shape)}')
    models.append(model)
  return models


def predict_test(model, records_dir, batch_size=128, tta=False, show_progress=False):
  """Probabilities of class 1 for every test id.

  Args:
    model: a Keras model of uint8 images to probabilities [B, 1], or a list
      of them (a fold ensemble: their probabilities are averaged).
    records_dir: records with a test split (a records.Records or a path).
    batch_size: images per forward pass (times 8 with `tta`).
    tta: average each model over the 8 dihedral transforms of each image.
    show_progress: show a progress bar (or log lines) over the batches.

  Returns:
    (ids, probabilities) in the records' order.
  """
  ids, probs, _ = predict_split(model, records_dir, 'test', batch_size, tta, show_progress)
  return ids, probs


def predict_split(models, records_dir, split='test', batch_size=128, tta=False,
                  show_progress=False):
  """(ids, mean probability of the models, labels) for every example of a split.

  Args: as `predict_test`, and `split` to read.
  """
  models = list(models) if isinstance(models, (list, tuple)) else [models]
  records = records_lib.Records.of(records_dir)
  ds = pipeline.make_dataset(records, split, batch_size=batch_size, training=False,
                             with_ids=True)
  transforms = range(8) if tta else range(1)
  what = ' with TTA x8' if tta else ''
  what += f', {len(models)} models' if len(models) > 1 else ''
  bar = progress.Progress(int(ds.cardinality()), 'predicting' + what,
                          images_per_step=batch_size, enabled=show_progress)

  @tf.function(reduce_retracing=True)
  def forward(images):
    # Each model's own mean over the views, then the mean over the models:
    # with equal view counts, the same as one mean over everything.
    outs = [model(augment.dihedral_transform(images, k), training=False)
            for model in models for k in transforms]
    return tf.reshape(tf.reduce_mean(tf.stack(outs), 0), [-1])

  ids, probs, labels = [], [], []
  with verify.reading(records), bar:  # TF's messages name no file: find it.
    for step, (images, batch_labels, batch_ids) in enumerate(ds, 1):
      probs.append(forward(images).numpy())
      labels.append(batch_labels.numpy())
      ids.extend(i.decode() for i in batch_ids.numpy())
      bar.update(step)
  return np.asarray(ids), np.concatenate(probs), np.concatenate(labels)


def write_submission(ids, probs, output, sample_submission=None):
  """Writes id,label (label: the probability of class 1); in sample_submission's order when given.

  Example:

    import pcam_tfdata as pt
    ids, probs = pt.predict('runs/demo/batchnorm', 'records/demo', tta=True)
    pt.write_submission(ids, probs, 'submission.csv',
                        'records/demo_kaggle/sample_submission.csv')

  Returns:
    The frame written (a pandas.DataFrame of id, label).

  Raises:
    ValueError: an id of the sample submission is not among the predictions,
      or the sample has no `id` column or repeats an id.
  """
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
  fs.write_text(tmp, frame.to_csv(index=False, float_format='%.6f'))
  fs.replace(tmp, output)  # No half-written submission under the real name.
  return frame
