"""The seed's two CNNs: Baseline and BatchNorm.

Both take uint8 images and scale them inside, so the input pipeline and the
host-to-device copy move a quarter of float32's bytes. Layers follow the
global Keras precision policy; the sigmoid runs in float32 under any policy,
since the loss that follows it cannot be computed in float16.
"""

import keras

MODELS = ('baseline', 'batchnorm')


def _block(x, filters, batch_norm, sync, name):
  x = keras.layers.Conv2D(filters, 3, padding='same', name=f'{name}_conv')(x)
  if batch_norm:
    x = keras.layers.BatchNormalization(synchronized=sync, name=f'{name}_bn')(x)
  x = keras.layers.ReLU(name=f'{name}_relu')(x)
  return keras.layers.MaxPooling2D(2, name=f'{name}_pool')(x)


def build_model(name, image_shape=(32, 32, 3), sync_batch_norm=False):
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
  dropout 0.5, dense 1 sigmoid.

  Args:
    name: 'baseline' or 'batchnorm'.
    image_shape: (H, W, 3) of the uint8 images: the records' `image_shape`.
    sync_batch_norm: BatchNorm statistics over the global batch (all
      replicas, Keras' `synchronized=True`) rather than each replica's part.
      The same weights; a saved model loads and predicts on one device.

  Returns:
    A keras.Model mapping uint8 [B, H, W, 3] to float32 probabilities [B, 1].

  Raises:
    ValueError: unknown name.
  """
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}; choose one of {", ".join(MODELS)}')
  batch_norm = name == 'batchnorm'
  filters, dense, dropout = ((64, 128, 256), 256, 0.5) if batch_norm else ((32, 64, 128), 128, 0.2)
  inputs = keras.Input(tuple(image_shape), dtype='uint8', name='image')
  x = keras.layers.Rescaling(1.0 / 255, name='scale')(inputs)
  for i, f in enumerate(filters):
    x = _block(x, f, batch_norm, sync_batch_norm, f'block{i + 1}')
  x = keras.layers.Flatten(name='flatten')(x)
  x = keras.layers.Dense(dense, name='dense')(x)
  if batch_norm:
    x = keras.layers.BatchNormalization(synchronized=sync_batch_norm, name='dense_bn')(x)
  x = keras.layers.ReLU(name='dense_relu')(x)
  x = keras.layers.Dropout(dropout, name='dropout')(x)
  outputs = keras.layers.Dense(1, activation='sigmoid', dtype='float32', name='probability')(x)
  return keras.Model(inputs, outputs, name=name)
