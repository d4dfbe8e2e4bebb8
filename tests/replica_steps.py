"""A few training steps of one model on fixed global batches, under any strategy.

Shared by tests/test_loop.py (in process, on 2 logical CPUs) and by the
MultiWorkerMirroredStrategy workers it starts (`python tests/replica_steps.py`).
"""

import importlib
import json
import os
import sys

import keras
import numpy as np
import tensorflow as tf

from pcam_tfdata.training import loop
from pcam_tfdata.training import models

SHAPE = (16, 16, 3)
GLOBAL_BATCH = 8
STEPS = 3


def data(seed=0, nan_in=None):
  """STEPS global batches; nan_in=(lo, hi) puts NaN labels in [lo, hi) of the first batch."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (STEPS * GLOBAL_BATCH, *SHAPE), dtype=np.uint8)
  labels = rng.integers(0, 2, STEPS * GLOBAL_BATCH).astype(np.float32)
  if nan_in:
    labels[nan_in[0]:nan_in[1]] = np.nan  # A NaN loss there: non-finite gradients.
  return images, labels


def initial_weights(name):
  keras.utils.set_random_seed(0)
  return models.build_model(name, SHAPE).get_weights()


def train(name, strategy, images, labels, *, policy='float32', sync=False, jit=False,
          worker=None, steps=STEPS, learning_rate=0.05):
  """Trains from `initial_weights(name)` with SGD and no dropout.

  Args:
    worker: (index, count) when this process is one of `count` workers that
      each feed their own slice of every global batch; else the strategy
      splits each global batch over its replicas.

  Returns:
    ([weights of each replica, as lists of arrays], [loss scale of each replica] or None).
  """
  start = initial_weights(name)
  keras.mixed_precision.set_global_policy(policy)
  try:
    with strategy.scope():
      model = models.build_model(name, SHAPE, sync_batch_norm=sync)
      model.get_layer('dropout').rate = 0.0  # Equal numbers need equal (no) dropout.
      model.set_weights(start)
      optimizer = keras.optimizers.SGD(learning_rate)
      if policy == 'mixed_float16':
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
      optimizer.build(model.trainable_variables)
    train_steps = loop.make_train_fn(model, optimizer, strategy, GLOBAL_BATCH, jit_compile=jit)
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(GLOBAL_BATCH)
    if worker:
      index, count = worker
      part = GLOBAL_BATCH // count
      ds = ds.map(lambda x, y: (x[index * part:(index + 1) * part],
                                y[index * part:(index + 1) * part]))
    elif strategy.num_replicas_in_sync > 1:
      ds = strategy.experimental_distribute_dataset(ds)
    train_steps(iter(ds), tf.constant(steps))
    per_replica = [[strategy.experimental_local_results(v.value)[r].numpy() for v in model.weights]
                   for r in range(len(strategy.experimental_local_results(model.weights[0].value)))]
    scales = None
    if policy == 'mixed_float16':
      scales = [float(s) for s in strategy.experimental_local_results(optimizer.dynamic_scale.value)]
    return per_replica, scales
  finally:
    keras.mixed_precision.set_global_policy('float32')


def train_run(records, model_dir, name, strategy=None, datasets=None, sgd=False, seed=5,
              dropout=False, **settings):
  """`train.run` of `name` for 2 seeded epochs: the weights after each step.

  Dropout is off unless `dropout`: the replay tests step one device from
  each step's weights, and a replica's mask is its rows of the global
  batch's (models.global_batch_dropout). BatchNorm is synchronized on one
  device too:
  Keras' synchronized moments are E[x^2] - E[x]^2, its plain ones two-pass,
  and the two drift apart by 1e-4 in 4 steps here. With `sgd`, SGD(0.05)
  replaces the run's Adam: where a gradient is zero by construction (a bias
  before BatchNorm) Adam divides its rounding noise by its own size and
  steps the weight by +-lr, on any two paths. Everything else is the
  command's path (one step per compiled call, --steps_per_execution=1).
  `settings` add to or override RUN_SETTINGS (augmentation, say).

  Returns:
    [initial weights, weights after step 1, ..., after the last step], each
    a list of arrays (BatchNorm's moving statistics included); the last is
    before the chief (alone) restores its best epoch's.
  """
  train = importlib.import_module('pcam_tfdata.train')  # The command's module.
  weights, build, make_train_fn = [], models.build_model, loop.make_train_fn
  adam = keras.optimizers.Adam

  def built(*args, **kwargs):
    model = build(*args, **kwargs)
    if not dropout:
      model.get_layer('dropout').rate = 0.0
    return model

  def keeping_each_steps_weights(model, *args, **kwargs):
    train_steps = make_train_fn(model, *args, **kwargs)
    weights.append(model.get_weights())

    def steps(iterator, n):
      assert int(n) == 1, n  # (So that every step's weights are seen.)
      out = train_steps(iterator, n)
      weights.append(model.get_weights())
      return out
    return steps

  models.build_model, loop.make_train_fn = built, keeping_each_steps_weights
  if sgd:
    keras.optimizers.Adam = keras.optimizers.SGD
  try:
    # Without a strategy: one device (not `auto`, which takes every logical CPU).
    train.run(train.Config(records_dir=records, model_dir=model_dir, model=name,
                           strategy='default', learning_rate=0.05 if sgd else 1e-3,
                           seed=seed, **{**RUN_SETTINGS, **settings}), strategy=strategy,
              datasets=datasets)
  finally:
    models.build_model, loop.make_train_fn = build, make_train_fn
    keras.optimizers.Adam = adam
  return weights


# Of `train_run`: batches of 4 per worker.
RUN_SETTINGS = dict(epochs=2, batch_size=8, eval_batch_size=16, mixed_precision='off',
                    sync_batch_norm='on', progress=False, steps_per_execution=1)


def dropout_masks(strategy, seed=1, calls=2, rows=8):
  """The BatchNorm CNN's dropout masks, `calls` times: [call][replica (here)] bool [rows, 256].

  Every replica is given the same inputs (ones), so only the seeds differ.
  """
  keras.utils.set_random_seed(seed)
  with strategy.scope():
    layer = models.build_model('batchnorm').get_layer('dropout')
  ones = tf.ones([rows, 256])
  draw = tf.function(lambda: strategy.run(lambda: layer(ones, training=True)))
  return [[m.numpy() != 0 for m in strategy.experimental_local_results(draw())]
          for _ in range(calls)]


def _worker_main(out_dir, cases):
  """One MultiWorkerMirroredStrategy worker (TF_CONFIG set by the test), every case in turn.

  One strategy for all cases, as one pair of processes serves every test:
  each case writes {name}.{worker}.npz (weights) and .json (loss scales or
  the chief's figures).
  """
  strategy = tf.distribute.MultiWorkerMirroredStrategy()
  index = strategy.cluster_resolver.task_id
  for name, case in cases.items():
    out = os.path.join(out_dir, f'{name}.{index}')
    if case.get('from_chief'):  # Each worker offers its own figures; all must take worker 0's.
      from pcam_tfdata.training import distribute  # pylint: disable=g-import-not-at-top
      mine = {'auc': 0.1 + index / 3, 'loss': float('nan') if index else 1e-300}
      _write_json(f'{out}.json', distribute.make_from_chief(strategy)(mine))
      continue
    if case.get('dropout_masks'):
      np.savez(f'{out}.tmp.npz', *[m for call in dropout_masks(strategy) for m in call])
      os.replace(f'{out}.tmp.npz', f'{out}.npz')
      _write_json(f'{out}.json', {'scales': None})
      continue
    if 'train_run' in case:
      steps = train_run(case['records'], os.path.join(out_dir, name), case['train_run'],
                        strategy, sgd=case['sgd'], seed=case['seed'])
      np.savez(f'{out}.tmp.npz', **{f'{step}/{i}': w for step, weights in enumerate(steps)
                                    for i, w in enumerate(weights)})
      os.replace(f'{out}.tmp.npz', f'{out}.npz')
      _write_json(f'{out}.json', {'scales': None})
      continue
    images, labels = data(nan_in=case.get('nan_in'))
    weights, scales = train(case['model'], strategy, images, labels, policy=case['policy'],
                            sync=case['sync'], worker=(index, 2), steps=case['steps'])
    np.savez(f'{out}.tmp.npz', *weights[0])
    os.replace(f'{out}.tmp.npz', f'{out}.npz')
    _write_json(f'{out}.json', {'scales': scales})


def _write_json(path, obj):
  with open(f'{path}.tmp', 'w') as f:
    json.dump(obj, f)
  os.replace(f'{path}.tmp', path)


if __name__ == '__main__':
  _worker_main(sys.argv[1], json.loads(sys.argv[2]))
