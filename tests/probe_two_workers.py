"""Why two-worker BatchNorm agrees with one device only up to a max-pool near-tie (BUILD.md).

  python tests/probe_two_workers.py /tmp/probe 5,6,7,8

For each seed: the largest weight difference after each of 4 steps between
two MultiWorkerMirroredStrategy workers and one device on the same global
batches (tests/test_loop.py's cases), and between one device and itself
started from weights perturbed by 1e-7 (relative, Gaussian): the rounding
of another summation order. Then, on the first global batch, how far that
perturbation moves each weight's gradient, and the 2x2 max-pool windows of
each block whose two largest values lie within 1e-6 of each other.
"""

import contextlib
import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pcam_tfdata import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

tf = cli.import_tensorflow()
import keras  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from pcam_tfdata.training import models  # pylint: disable=wrong-import-position
import replica_steps as rs  # pylint: disable=wrong-import-position
import test_loop as tl  # pylint: disable=wrong-import-position

_BUILD = models.build_model


def _perturbed(eps):
  def build(*args, **kwargs):
    model = _BUILD(*args, **kwargs)
    rng = np.random.default_rng(0)
    model.set_weights([w * (1 + eps * rng.standard_normal(w.shape)).astype(w.dtype)
                       for w in model.get_weights()])
    return model
  return build


def _one_device(out, name, seed, sgd, eps=0.0):
  if eps:
    models.build_model = _perturbed(eps)
  try:
    return rs.train_run(str(out / 'rec'), str(out / f'one_{name}_{seed}_{eps}'), name,
                        datasets=tl._both_pipelines(out / 'rec', seed), sgd=sgd, seed=seed)  # pylint: disable=protected-access
  finally:
    models.build_model = _BUILD


def _gradients_and_ties(out, seed, eps=1e-7):
  keras.utils.set_random_seed(seed)
  model = _BUILD('batchnorm', (32, 32, 3), sync_batch_norm=True)
  model.get_layer('dropout').rate = 0.0
  images, labels = next(iter(tl._both_pipelines(out / 'rec', seed)['train'](None, 1, 2, 0)))  # pylint: disable=protected-access
  labels = tf.reshape(tf.cast(labels, tf.float32), [-1, 1])

  def gradients(weights):
    model.set_weights(weights)
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(keras.losses.binary_crossentropy(labels, model(images, training=True)))
    return [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]

  start = model.get_weights()
  plain = gradients(start)
  rng = np.random.default_rng(0)
  moved = gradients([w * (1 + eps * rng.standard_normal(w.shape)).astype(w.dtype) for w in start])
  model.set_weights(start)
  for v, a, b in zip(model.trainable_variables, plain, moved):
    if 'kernel' in v.path or 'gamma' in v.path:
      print(f'    gradient of {v.path}: moved by {np.abs(a - b).max() / np.abs(a).max():.2g} '
            'of its largest entry')
  for block in ('block1', 'block2', 'block3'):
    r = keras.Model(model.inputs, model.get_layer(f'{block}_relu').output)(images, training=True)
    b, h, w, c = r.shape
    windows = np.sort(r.numpy().reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
                      .reshape(-1, 4), 1)
    near = (windows[:, 3] > 0) & (windows[:, 3] - windows[:, 2] <= 1e-6 * windows[:, 3])
    print(f'    {block} max pool: {int(near.sum())} of {int((windows[:, 3] > 0).sum())} windows '
          'with their two largest values within 1e-6')


def main(out, seeds):
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  cases = {case: c for case, c in tl._TRAINING_CASES.items() if c['seed'] in seeds}  # pylint: disable=protected-access
  if not (out / '.done').exists():
    tl._run_two_workers(out, cases)  # pylint: disable=protected-access
    (out / '.done').touch()
  results = tl._two_workers(None, 'unused', cases)  # pylint: disable=protected-access
  for case, c in cases.items():
    workers, _ = results(case)  # (Worker 0, worker 1: alike, bit for bit.)
    one = _one_device(out, c['train_run'], c['seed'], c['sgd'])
    perturbed = _one_device(out, c['train_run'], c['seed'], c['sgd'], eps=1e-7)
    print(f'{case}: max |difference| after steps 1-4, two workers against one device: '
          + ', '.join(f'{tl._max_change(a, b):.2g}' for a, b in zip(workers[1:], one[1:]))  # pylint: disable=protected-access
          + '; one device against itself perturbed by 1e-7: '
          + ', '.join(f'{tl._max_change(a, b):.2g}' for a, b in zip(perturbed[1:], one[1:])))  # pylint: disable=protected-access
    if c['train_run'] == 'batchnorm':
      _gradients_and_ties(out, c['seed'])


@contextlib.contextmanager
def _found(tmp_path_factory, name):  # tl._two_workers' folder: the one made above.
  del tmp_path_factory, name
  yield _OUT[0], False


_OUT = []

if __name__ == '__main__':
  _OUT.append(pathlib.Path(sys.argv[1]))
  tl.once_per_run = _found
  main(sys.argv[1], [int(s) for s in sys.argv[2].split(',')])
