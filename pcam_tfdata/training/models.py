"""The seed's two CNNs (Baseline, BatchNorm) and two Keras applications (ResNet50V2,
EfficientNetV2B0).

All take uint8 images and scale them inside (each family its own
preprocessing), so the input pipeline and the host-to-device copy move a
quarter of float32's bytes. Layers follow the global Keras precision policy;
the sigmoid runs in float32 under any policy, since the loss that follows it
cannot be computed in float16.
"""

import io
import os
import re

import keras
import tensorflow as tf

from pcam_tfdata import fs
from pcam_tfdata.training import config as config_lib

MODELS = ('baseline', 'batchnorm', 'resnet50v2', 'efficientnetv2b0')
APPLICATIONS = ('resnet50v2', 'efficientnetv2b0')
_MIN_SIDE = 32  # What both applications accept without their top.


def load_model(source):
  """`keras.models.load_model` (safe mode) of a .keras file on any filesystem, or its bytes.

  Args:
    source: a path or URL, or a binary file object of the archive. A URL is
      read into memory and loaded from there: Keras would first copy it to a
      local temporary file.
  """
  if not isinstance(source, io.IOBase):
    if not fs.is_url(source):
      return keras.models.load_model(source, safe_mode=True)
    source = io.BytesIO(fs.read_bytes(source))
  source.seek(0)
  from keras.src.saving import saving_lib  # pylint: disable=g-import-not-at-top
  # (The public load_model takes paths only; this is what it calls for a .keras zip.)
  return saving_lib.load_model(source, safe_mode=True)


def load_weights(model, path):
  """`model.load_weights(path)` of a .keras file on any filesystem (see `load_model`)."""
  if fs.is_url(path):
    model.set_weights(load_model(path).get_weights())
  else:
    model.load_weights(path)


def sublayers(model):
  """Every layer of `model`, those of the models nested in it (an application) included."""
  for layer in model.layers:
    yield layer
    if isinstance(layer, keras.Model):
      yield from sublayers(layer)


def global_batch_dropout(layer):
  """Makes a Keras Dropout layer draw the global batch's mask, each replica taking its rows.

  Keras keeps a dropout layer's random state in one variable, mirrored on
  every replica, so under MirroredStrategy or MultiWorkerMirroredStrategy
  each replica drew the same seed, and the k-th example of every replica
  the same mask: with 8 replicas one pattern eight times per step. Here
  every replica draws, from that one seed, the mask of the whole global
  batch (replicas x its rows) and keeps its own rows: independent masks
  within a step, and the same mask for each example of the global batch
  on 1, 2 or 8 replicas (the input pipeline gives replica r rows r*B... of
  each global batch), so a run resumed on another number of GPUs or
  workers drops what the uninterrupted run dropped. On one replica the
  masks are Keras' own, bit for bit.

  Only the layer's `call` is replaced, on this instance: model.keras holds
  a stock Dropout and loads with stock Keras.
  """
  if getattr(layer, 'seed_generator', None) is None:  # (None at rate 0.)
    return layer

  def call(inputs, training=False):
    if not training or not layer.rate:
      return inputs
    return dropout_rows(inputs, layer.rate, layer.seed_generator.next(), layer.noise_shape)

  layer.call = call
  return layer


def dropout_rows(x, rate, seed, noise_shape=None):
  """`tf.nn.experimental.stateless_dropout` of this replica's rows of the global batch.

  As TensorFlow's (scale, then keep where the uniform draw >= rate) and
  Keras' seed cast, so one replica gives Keras' result bit for bit.
  """
  context = tf.distribute.get_replica_context()
  replicas, replica = ((context.num_replicas_in_sync, context.replica_id_in_sync_group)
                       if context is not None else (1, 0))
  if seed.dtype != tf.int32:  # keras.src.backend.tensorflow.random._cast_seed.
    seed = tf.cast(tf.math.floormod(seed, tf.int32.max - 1), tf.int32)
  shape = tf.unstack(tf.shape(x)) if noise_shape is None else [
      tf.shape(x)[i] if d is None else d for i, d in enumerate(noise_shape)]
  rows = tf.shape(x)[0]
  per_example = noise_shape is None or noise_shape[0] is None
  if per_example and replicas > 1:
    shape[0] = rows * replicas
  noise = tf.random.stateless_uniform(tf.stack(shape), seed, dtype=x.dtype)
  if per_example and replicas > 1:
    noise = noise[replica * rows:(replica + 1) * rows]
  kept = tf.multiply(x, tf.constant(1 / (1 - rate), x.dtype))
  return tf.where(noise >= rate, kept, tf.zeros([], x.dtype))


def _block(x, filters, batch_norm, sync, name):
  x = keras.layers.Conv2D(filters, 3, padding='same', name=f'{name}_conv')(x)
  if batch_norm:
    x = keras.layers.BatchNormalization(synchronized=sync, name=f'{name}_bn')(x)
  x = keras.layers.ReLU(name=f'{name}_relu')(x)
  return keras.layers.MaxPooling2D(2, name=f'{name}_pool')(x)


def build_model(name, image_shape=(32, 32, 3), sync_batch_norm=False, weights='none',
                dropout=None):
  """Builds an uncompiled model.

  Example, compiled as the seed trains it:

    import keras
    import pcam_tfdata as pt
    model = pt.build_model('batchnorm', pt.Records.open('records/demo').image_shape)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss='binary_crossentropy',
                  metrics=['accuracy', keras.metrics.AUC(name='auc')])

  Baseline: conv 32/64/128 (3x3 same, ReLU, 2x2 max pool), flatten, dense 128
  + ReLU, dropout 0.2, dense 1 sigmoid. BatchNorm: conv 64/128/256 each with
  batch normalization before the ReLU, dense 256 + batch normalization + ReLU,
  dropout 0.5, dense 1 sigmoid. resnet50v2 and efficientnetv2b0: the Keras
  applications without their top, global average pooling, dense 1 sigmoid;
  ResNet50V2's inputs scaled to [-1, 1] as its `preprocess_input`,
  EfficientNetV2B0's own preprocessing layer kept; any image of at least
  32x32.

  Args:
    name: one of MODELS.
    image_shape: (H, W, 3) of the uint8 images: the records' `image_shape`.
    sync_batch_norm: BatchNorm statistics over the global batch (all
      replicas, Keras' `synchronized=True`) rather than each replica's part.
      The same weights; a saved model loads and predicts on one device.
      (Under any strategy each replica draws its rows of the global
      batch's dropout mask: `global_batch_dropout`.)

    weights: 'none' or, for the applications, 'imagenet' (Keras' published
      weights, fetched once into ~/.keras/models).
    dropout: the rate of the dropout before the output layer; None for the
      seed's (0.2 Baseline, 0.5 BatchNorm); the applications get such a
      layer only for a rate > 0.

  Returns:
    A keras.Model mapping uint8 [B, H, W, 3] to float32 probabilities [B, 1].

  Raises:
    ValueError: unknown name; images too small for an application; ImageNet
      weights that cannot be fetched (one line naming what).
  """
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}; choose one of {", ".join(MODELS)}')
  if name in APPLICATIONS:
    return _application(name, tuple(image_shape), sync_batch_norm, weights, dropout or 0.0)
  if weights != 'none':
    raise ValueError(f'--weights={weights}: --model={name} has no published weights')
  batch_norm = name == 'batchnorm'
  filters, dense = ((64, 128, 256), 256) if batch_norm else ((32, 64, 128), 128)
  if dropout is None:
    dropout = config_lib.SEED_DROPOUT[name]
  inputs = keras.Input(tuple(image_shape), dtype='uint8', name='image')
  x = keras.layers.Rescaling(1.0 / 255, name='scale')(inputs)
  for i, f in enumerate(filters):
    x = _block(x, f, batch_norm, sync_batch_norm, f'block{i + 1}')
  x = keras.layers.Flatten(name='flatten')(x)
  x = keras.layers.Dense(dense, name='dense')(x)
  if batch_norm:
    x = keras.layers.BatchNormalization(synchronized=sync_batch_norm, name='dense_bn')(x)
  x = keras.layers.ReLU(name='dense_relu')(x)
  x = global_batch_dropout(keras.layers.Dropout(dropout, name='dropout'))(x)
  outputs = keras.layers.Dense(1, activation='sigmoid', dtype='float32', name='probability')(x)
  return keras.Model(inputs, outputs, name=name)


def _offline_hint(detail):
  """Where Keras looks for the weights file before fetching it, so that it can be copied there."""
  try:
    from keras.src.backend.config import keras_home  # pylint: disable=g-import-not-at-top
    home = keras_home()
  except ImportError:  # (A private name: a later Keras may move it.)
    home = os.environ.get('KERAS_HOME', os.path.join(os.path.expanduser('~'), '.keras'))
  url = re.search(r'https?://\S+?\.h5', detail)
  what = os.path.basename(url[0]) if url else 'the weights file'
  return (f'offline, copy {what} (from {url[0] if url else "a machine that can fetch it"}) '
          f'into {os.path.join(home, "models")}, Keras\' cache, or train with --weights=none')


def _application(name, image_shape, sync_batch_norm, weights, dropout):
  """A Keras application without its top, as a binary classifier of uint8 images."""
  if min(image_shape[:2]) < _MIN_SIDE:
    raise ValueError(f'--model={name} needs images of at least {_MIN_SIDE}x{_MIN_SIDE}; '
                     f'the records hold {image_shape[0]}x{image_shape[1]} (--crop_size)')
  inputs = keras.Input(image_shape, dtype='uint8', name='image')
  common = dict(include_top=False, weights=None if weights == 'none' else weights,
                input_shape=image_shape, pooling='avg')
  try:
    if name == 'resnet50v2':
      x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name='scale')(inputs)
      base = keras.applications.ResNet50V2(**common)
    else:  # EfficientNetV2 rescales [0, 255] itself (include_preprocessing).
      x = keras.layers.Rescaling(1.0, name='scale')(inputs)  # (uint8 to floats.)
      base = keras.applications.EfficientNetV2B0(include_preprocessing=True, **common)
  except Exception as e:  # pylint: disable=broad-except
    if weights == 'none':
      raise
    # Keras' get_file: "URL fetch failure on https://...: None -- [Errno -3] ...".
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f'--weights={weights}: could not fetch or load the {name} ImageNet '
                     f'weights ({detail}); {_offline_hint(detail)}') from None
  for layer in sublayers(base):
    if isinstance(layer, keras.layers.BatchNormalization):
      layer.synchronized = sync_batch_norm  # Read when called; saved in the config.
    if isinstance(layer, keras.layers.Dropout):
      global_batch_dropout(layer)
  x = base(x)
  if dropout:  # (Without, the model is the one every earlier run saved.)
    x = global_batch_dropout(keras.layers.Dropout(dropout, name='dropout'))(x)
  outputs = keras.layers.Dense(1, activation='sigmoid', dtype='float32', name='probability')(x)
  return keras.Model(inputs, outputs, name=name)
