"""The training loop under several replicas: the same numbers as one device.

Each test trains from the same initial weights on the same global batches,
with SGD (whose update is proportional to the gradient, so a loss divided by
the per-replica instead of the global batch, a gradient summed twice, or a
loss scale never undone all show) and no dropout.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from pcam_tfdata.commands import launch_local_cluster
from conftest import ROOT, once_per_run
import replica_steps as rs


# float32 sums in another order differ by a few ulps of the largest value.
_TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def _one():
  return tf.distribute.get_strategy()


def _assert_close(a, b, **tolerance):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, **(tolerance or _TOLERANCE))


def _max_change(a, b):
  return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


@pytest.mark.parametrize('name', ['baseline', 'batchnorm'])
def test_two_replicas_compute_what_one_does(name, mirrored):
  images, labels = rs.data()
  one, _ = rs.train(name, _one(), images, labels, sync=True)
  two, _ = rs.train(name, mirrored, images, labels, sync=True)
  assert _max_change(one[0], rs.initial_weights(name)) > 1e-3  # It trained.
  _assert_close(two[0], one[0])  # Every weight, BatchNorm's moving statistics too,
  _assert_close(two[1], two[0], rtol=0, atol=0)  # and both replicas alike, bit for bit.


def test_without_sync_batch_norm_two_replicas_differ(mirrored):
  """What --sync_batch_norm=off gives: statistics of half a batch, replicas apart."""
  images, labels = rs.data()
  one, _ = rs.train('batchnorm', _one(), images, labels)
  two, _ = rs.train('batchnorm', mirrored, images, labels, sync=False)
  assert _max_change(two[0], one[0]) > 1e-3
  assert _max_change(two[0], two[1]) > 1e-3  # The moving statistics drift apart.


def test_float16_loss_scaling_is_undone_exactly_once(mirrored):
  images, labels = rs.data()
  exact, _ = rs.train('baseline', _one(), images, labels)
  one, scale_one = rs.train('baseline', _one(), images, labels, policy='mixed_float16')
  two, scale_two = rs.train('baseline', mirrored, images, labels, policy='mixed_float16')
  assert scale_one == [32768.0] and scale_two == [32768.0] * 2  # Every step was applied.
  moved = _max_change(exact[0], rs.initial_weights('baseline'))
  # float16 arithmetic, not a factor of 2 or 32768 off: within 10% of the
  # float32 update, on one replica and on two.
  assert _max_change(one[0], exact[0]) < 0.1 * moved
  assert _max_change(two[0], exact[0]) < 0.1 * moved
  _assert_close(two[1], two[0], rtol=0, atol=0)


@pytest.mark.parametrize('bad', ['first', 'last'])
def test_a_non_finite_gradient_on_one_replica_is_skipped_by_all(bad, mirrored):
  half = rs.GLOBAL_BATCH // 2
  images, labels = rs.data(nan_in=(0, half) if bad == 'first' else (half, 2 * half))
  replicas, scales = rs.train('baseline', mirrored, images, labels, policy='mixed_float16',
                              steps=1)
  start = rs.initial_weights('baseline')
  for weights in replicas:  # Unchanged (and so finite) on every replica,
    _assert_close(weights, start, rtol=0, atol=0)
  assert scales == [16384.0, 16384.0]  # and every replica halved the scale.


def test_jit_compiled_step_matches_the_plain_one():
  images, labels = rs.data()
  plain, _ = rs.train('batchnorm', _one(), images, labels)
  compiled, _ = rs.train('batchnorm', _one(), images, labels, jit=True)
  _assert_close(compiled[0], plain[0], rtol=1e-4, atol=1e-5)


_HALF = rs.GLOBAL_BATCH // 2
# Every case the two workers run, in one pair of processes for the whole module.
_WORKER_CASES = {
    'baseline': {'model': 'baseline', 'policy': 'float32', 'sync': True, 'steps': rs.STEPS},
    'batchnorm': {'model': 'batchnorm', 'policy': 'float32', 'sync': True, 'steps': rs.STEPS},
    'nan_on_0': {'model': 'baseline', 'policy': 'mixed_float16', 'sync': False, 'steps': 1,
                 'nan_in': [0, _HALF]},
    'nan_on_1': {'model': 'baseline', 'policy': 'mixed_float16', 'sync': False, 'steps': 1,
                 'nan_in': [_HALF, 2 * _HALF]},
    'from_chief': {'from_chief': True},
}


def _run_two_workers(out_dir):
  ports = launch_local_cluster.free_ports(2)
  procs = []
  for index in range(2):
    # This process's environment (its oneDNN setting too): the same kernels
    # as the one-device runs they are compared with.
    env = dict(os.environ, TF_CONFIG=launch_local_cluster.tf_config(ports, index))
    with open(out_dir / f'worker{index}.log', 'w') as log:  # Files: no pipe can fill and block.
      procs.append(subprocess.Popen(
          [sys.executable, os.path.join('tests', 'replica_steps.py'), str(out_dir),
           json.dumps(_WORKER_CASES)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env))
  try:
    for index, proc in enumerate(procs):
      # A hang (workers that disagree on a collective) fails here, not forever.
      assert proc.wait(timeout=600) == 0, (out_dir / f'worker{index}.log').read_text()[-3000:]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope='session')
def two_workers(tmp_path_factory):
  """Runs tests/replica_steps.py as 2 local MultiWorkerMirroredStrategy workers, every case.

  Once per test run, however the tests are spread over test processes.
  Returns fn(case) -> [worker 0's result, worker 1's]: (weights, loss
  scales), or the chief's figures for 'from_chief'.
  """
  with once_per_run(tmp_path_factory, 'two_workers') as (out_dir, first):
    if first:
      _run_two_workers(out_dir)

  def results(case):
    out = []
    for index in range(2):
      figures = json.loads((out_dir / f'{case}.{index}.json').read_text())
      if case == 'from_chief':
        out.append(figures)
      else:
        saved = np.load(out_dir / f'{case}.{index}.npz')
        out.append(([saved[k] for k in saved.files], figures['scales']))
    return out

  return results


@pytest.mark.slow
@pytest.mark.parametrize('name', ['baseline', 'batchnorm'])
def test_two_workers_compute_what_one_device_does(name, two_workers):
  images, labels = rs.data()
  one, _ = rs.train(name, _one(), images, labels, sync=True)
  (first, _), (second, _) = two_workers(name)
  _assert_close(first, one[0])
  _assert_close(second, first, rtol=0, atol=0)


@pytest.mark.parametrize('bad', [0, 1])
def test_a_non_finite_gradient_on_one_worker_is_skipped_by_both(bad, two_workers):
  start = rs.initial_weights('baseline')
  results = two_workers(f'nan_on_{bad}')
  for weights, _ in results:
    _assert_close(weights, start, rtol=0, atol=0)
  assert [scales for _, scales in results] == [[16384.0], [16384.0]]


def test_every_worker_takes_the_chiefs_figures(two_workers):
  # Bit for bit (float64, not rounded to float32), whatever the other offered.
  assert two_workers('from_chief') == [{'auc': 0.1, 'loss': 1e-300}] * 2
