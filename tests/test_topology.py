"""The same global batches on any topology: a run resumed on another number of workers or
replicas goes on as the uninterrupted run would have.

In the global input order (`input_order`) every step's global batch, its augmentation draws
and its dropout masks are a function of the seed, the records and the global batch size
alone. What the float sums of two topologies cannot share is their order: a gradient summed
over one replica's 8 rows, or over two replicas' 4 and then all-reduced, rounds in the last
bits; a max-pool window whose two largest inputs lie within that rounding routes its
gradient either way, and Adam carries the difference on. So the trainer's input is compared
bit for bit, and trained weights within a tolerance measured against that drift and against
what a wrong batch, mask or augmentation gives (each test says how far apart each lies).
"""

import csv
import json
import re
import subprocess
import sys
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from pcam_tfdata import records as records_lib
from pcam_tfdata.training import config as config_lib
from pcam_tfdata.training import distribute
from pcam_tfdata.training import epochs as epochs_lib
from pcam_tfdata.training import models
from pcam_tfdata.training import trainer
from conftest import ROOT, read_records, user_env
import replica_steps as rs

_SEED = 3
_TIMEOUT = 600  # Seconds any one run may take on a loaded machine before it is a failure.


def _relative_distance(a, b, start):
  """|a - b| / |a - start| over every weight at once: 0 for equal runs, ~1 for unrelated ones."""
  flat = lambda weights: np.concatenate([np.ravel(w) for w in weights]).astype(np.float64)
  return float(np.linalg.norm(flat(a) - flat(b)) / np.linalg.norm(flat(a) - flat(start)))


# The trainer's own input on each topology: the global steps, bit for bit.

def _config(records, model_dir, **overrides):
  """The run the tests below resume: 3 epochs of 6 global batches of 8, augmented."""
  settings = dict(records_dir=str(records), model_dir=str(model_dir), model='baseline',
                  epochs=3, batch_size=8, seed=_SEED, mixed_precision='off', augment=True,
                  stain_jitter=0.05, augment_on='device', stain_jitter_on='device')
  return config_lib.Config(**{**settings, **overrides})


def _worker_input(config, records, workers, worker, strategy, position, monkeypatch):
  """(steps per epoch, the batches) the trainer of worker `worker` of `workers` feeds.

  The Setup is the one `trainer.set_up` makes on that worker (one replica per worker, or
  `strategy`'s replicas on one), and the batches come from `EpochLoop._train_input` itself,
  resumed at `position` = (epochs done, steps done into the next): the trainer's own
  arguments to its own dataset function. Only the worker's input context is given, as
  MultiWorkerMirroredStrategy would give it (no cluster in this process).
  """
  replicas = strategy.num_replicas_in_sync * workers
  setup = trainer.Setup(strategy=strategy, policy='float32', replicas=replicas,
                        pipelines=workers, chief=worker == 0, task_id=worker,
                        sync_batch_norm=False, jit_compile=False,
                        stain_on_device=trainer.stain_on_device(config),
                        dihedral_on_device=trainer.dihedral_on_device(config))
  setup.order = trainer.input_order(config, records, setup)  # (No peer to vote with here.)
  setup.data_seed = config.seed
  monkeypatch.setattr(distribute, 'input_context', lambda _: tf.distribute.InputContext(
      workers, worker, replicas))
  steps, datasets = trainer.make_data(config, records, setup)
  last_epoch, first_step = position
  run = types.SimpleNamespace(setup=setup, steps=steps, last_epoch=last_epoch,
                              first_step=first_step)
  # pylint: disable-next=protected-access
  served = epochs_lib.EpochLoop._train_input(run, datasets['train'])
  batches = []
  for element in served:
    # Each replica's share of the step, in replica order (one, or the strategy's).
    shares = zip(*(strategy.experimental_local_results(x) for x in tf.nest.flatten(element)))
    batches.append([tf.nest.pack_sequence_as(element, [t.numpy() for t in share])
                    for share in shares])
  return steps, batches


def _global_steps(config, records, topology, position, monkeypatch, ids_of):
  """The global steps `topology` trains from `position`: (ids, labels, draws) of each.

  topology: ('workers', n), or ('replicas', strategy) for one worker with its replicas.
  The workers' (or replicas') rows of each step are concatenated in replica order.
  """
  kind, value = topology
  if kind == 'workers':
    served = [_worker_input(config, records, value, k, tf.distribute.get_strategy(), position,
                            monkeypatch) for k in range(value)]
  else:
    served = [_worker_input(config, records, 1, 0, value, position, monkeypatch)]
  assert {steps for steps, _ in served} == {6}  # 48 // 8 on any topology.
  per_worker = [batches for _, batches in served]
  assert len({len(b) for b in per_worker}) == 1
  steps = []
  for parts in zip(*per_worker):
    rows = [row for worker in parts for row in worker]  # Replica order.
    images = np.concatenate([r[0] for r in rows])
    steps.append(([ids_of[image.tobytes()] for image in images],
                  np.concatenate([r[1] for r in rows]),
                  np.concatenate([r[2]['dihedral'] for r in rows]),
                  np.concatenate([r[2]['stain'] for r in rows])))
  return steps


@pytest.fixture(scope='module')
def ids_of(records):
  """{image bytes: id} of the train split (the trainer's batches carry no ids)."""
  train = {image: id_ for id_, (split, _, image) in read_records(records).items()
           if split == 'train'}
  assert len(train) == records_lib.Records.open(records).count('train')  # No two alike.
  return train


def _assert_same_steps(got, want, what):
  assert len(got) == len(want), what
  for step, (g, w) in enumerate(zip(got, want)):
    assert g[0] == w[0], f'{what}: the ids of global step {step}'
    for name, x, y in zip(('labels', 'dihedral ids', 'stain maps'), g[1:], w[1:]):
      np.testing.assert_array_equal(x, y, err_msg=f'{what}: the {name} of global step {step}')


def test_every_global_step_is_the_same_on_any_topology_and_across_a_resume_onto_another(
    records, tmp_path, mirrored, monkeypatch, ids_of):
  """The trainer's training input (augmentation drawn for the device: the 'dihedral' and
  'stain' draws travel with each row) for 3 epochs: uninterrupted on one worker; 2 workers
  for epoch 1 and 3 steps of epoch 2, then one worker resumed there; one worker for 4 steps,
  then 2 workers resumed mid-epoch 1; 2 workers, then one worker with 2 replicas. Every
  global step has the uninterrupted run's ids in its order, labels and draws. (A pipeline id
  folded into the keys, a slice at the wrong offset, a resume that restarts the epoch or
  skips a wrong number of batches: each changes some step.)"""
  config = _config(records, tmp_path / 'run')
  opened = records_lib.Records.open(records)  # As train_and_evaluate opens it, once.
  steps = lambda topology, position: _global_steps(config, opened, topology, position,
                                                   monkeypatch, ids_of)
  whole = steps(('workers', 1), (0, 0))
  assert len(whole) == 18
  for epoch in range(3):  # Each epoch a permutation of the split, drawn anew each epoch.
    ids = [i for step in whole[epoch * 6:(epoch + 1) * 6] for i in step[0]]
    assert sorted(ids) == sorted(ids_of.values())
  assert whole[0][0] != whole[6][0]
  assert len({tuple(step[2]) for step in whole}) > 1  # (The draws vary, so they are tested.)

  two = steps(('workers', 2), (0, 0))
  _assert_same_steps(two, whole, '2 workers')
  resumed = steps(('workers', 1), (1, 3))
  _assert_same_steps(two[:9] + resumed, whole, '2 workers, then 1 from epoch 2 step 3')
  one_then_two = whole[:4] + steps(('workers', 2), (0, 4))
  _assert_same_steps(one_then_two, whole, '1 worker, then 2 from epoch 1 step 4')
  on_replicas = steps(('replicas', mirrored), (1, 3))
  _assert_same_steps(two[:9] + on_replicas, whole,
                     '2 workers, then 1 worker with 2 replicas from epoch 2 step 3')


# Two replicas against one device, step by step, on the trainer's own pipeline, dropout on.

# In relative distance (`_relative_distance`), what float sums in another order leave
# after the first step (measured: 1.0e-6) and after 12 (3.6e-3 at seed 3, 1.4e-5 at seed 4:
# how soon a max-pool near-tie flips decides it; one device started from weights perturbed
# by 1e-7 drifts as far, 2.4e-3 and 2.1e-4). Each replica drawing its own rows' dropout mask
# from the one seed (Keras' way) is 0.51 apart after the first step; the replicas' masks
# swapped (as a replica fed the other's rows) 0.66; both stay above 0.5 for all 12 steps.
_FIRST_STEP_TOLERANCE = 1e-4
_STEP_TOLERANCE = 2e-2


@pytest.mark.slow
def test_two_replicas_take_the_steps_one_device_takes_with_dropout_on_the_trainers_batches(
    records, tmp_path, mirrored):
  """`train.run` itself (its pipeline in the global order, its Adam, Baseline's dropout 0.2,
  dihedral and stain augmentation in the step) on MirroredStrategy's 2 logical CPUs and on
  one: 2 epochs of 6 steps from the same seed. The weights after every step agree within
  the drift of a reordered float sum (see the tolerances); the first step, before any
  near-tie can have flipped, within 1e-4 of the step's size."""
  settings = dict(augment=True, stain_jitter=0.05, augment_on='device',
                  stain_jitter_on='device')
  one = rs.train_run(str(records), str(tmp_path / 'one'), 'baseline', dropout=True,
                     seed=_SEED, **settings)
  two = rs.train_run(str(records), str(tmp_path / 'two'), 'baseline', strategy=mirrored,
                     dropout=True, seed=_SEED, **settings)
  assert len(one) == len(two) == 1 + 2 * 6
  for a, b in zip(one[0], two[0]):  # The same initial weights, bit for bit.
    np.testing.assert_array_equal(a, b)
  distances = [_relative_distance(one[step], two[step], one[0]) for step in range(1, 13)]
  print('relative distance after each step:', ' '.join(f'{d:.1e}' for d in distances))
  assert distances[0] < _FIRST_STEP_TOLERANCE, distances
  assert max(distances) < _STEP_TOLERANCE, distances


# The bar: the command, stopped on one topology and resumed on the other.

def _flags(records, model_dir):
  return [f'--records_dir={records}', f'--model_dir={model_dir}', '--epochs=2',
          '--early_stopping_patience=100', '--batch_size=8', '--mixed_precision=off',
          f'--seed={_SEED}', '--model=baseline', '--augment', '--stain_jitter=0.05',
          '--backup_every_steps=3', '--noprogress']


# `python -m pcam_tfdata.train`, but the process that is to stop (the only one, or worker 1
# of two) sends itself SIGTERM as its first backup is written: preempted at that backup's
# step however loaded the machine is, where a signal from outside would land some steps on.
_TRAIN_STOPPING = r'''
import importlib, json, os, signal, sys
from pcam_tfdata import cli
train = importlib.import_module('pcam_tfdata.train')  # (pcam_tfdata.train is also a function.)
task = json.loads(os.environ.get('TF_CONFIG', '{"task": {"index": 1}}'))['task']['index']
run, sent = train.run, []

def run_stopping(*args, **kwargs):
  from pcam_tfdata.training import epochs
  save = epochs.EpochLoop._save_backup

  def save_then_stop(self, *a, **k):
    save(self, *a, **k)
    if task == 1 and not sent:
      sent.append(True)
      os.kill(os.getpid(), signal.SIGTERM)
  epochs.EpochLoop._save_backup = save_then_stop
  return run(*args, **kwargs)

train.run = run_stopping
sys.argv[0] = 'train'
cli.run_program(train)
'''
_LAUNCH_STOPPING = r'''
import sys
from pcam_tfdata import cli
from pcam_tfdata.commands import launch_local_cluster
launch_local_cluster.WORKER_COMMAND = (sys.executable, '-c', sys.argv[1])
sys.argv = ['launch_local_cluster.py', '--num_workers=2', '--', *sys.argv[2:]]
cli.run_program(launch_local_cluster)
'''


def _run(args):
  done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=_TIMEOUT, env=user_env())
  return done.returncode, done.stdout + done.stderr


def _one_process(records, model_dir, stop=False):
  program = ['-c', _TRAIN_STOPPING] if stop else ['-m', 'pcam_tfdata.train']
  return _run([*program, *_flags(records, model_dir)])


def _two_workers(records, model_dir, stop=False):
  program = (['-c', _LAUNCH_STOPPING, _TRAIN_STOPPING] if stop
             else ['tools/launch_local_cluster.py', '--num_workers=2', '--'])
  return _run([*program, *_flags(records, model_dir)])


def _stopped(status, output, workers):
  """(epoch, step) where the run was preempted: every worker saved there, and exited 42."""
  assert status == 42, output[-3000:]
  prefix = r'\[worker (\d)\] ' if workers > 1 else r'()'  # (One process: no prefix.)
  stops = re.findall(prefix + r'train: preempted at epoch (\d+), step (\d+): backup saved; '
                     r'rerun the same command to resume', output)
  assert sorted(w for w, _, _ in stops) == (['0', '1'] if workers > 1 else ['']), output[-3000:]
  assert len({(e, s) for _, e, s in stops}) == 1, stops  # The same step on every worker.
  _, epoch, step = stops[0]
  print(f'stopped on {workers} worker(s) at epoch {epoch}, step {step}')
  # The first backup was at epoch 1, step 3; the stop at its step (the workers agree on the
  # next step both reach: that one, or one later).
  assert epoch == '1' and step in ('3', '4'), stops
  return epoch, step


def _final_weights(model_dir):
  """The trainable weights of the run's last backup (its final weights: the backup stays)."""
  reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(model_dir / 'backup')))
  state = json.loads(reader.get_tensor('state/.ATTRIBUTES/VARIABLE_VALUE'))
  assert (state['epoch'], state['step']) == (2, 0)  # After the last epoch.
  weights, i = [], 0
  while reader.has_tensor(f'optimizer/_trainable_variables/{i}/.ATTRIBUTES/VARIABLE_VALUE'):
    weights.append(reader.get_tensor(
        f'optimizer/_trainable_variables/{i}/.ATTRIBUTES/VARIABLE_VALUE'))
    i += 1
  return weights


def _history(model_dir):
  with open(model_dir / 'history.csv') as f:
    return [(int(r['epoch']), float(r['train_loss']), float(r['val_loss']))
            for r in csv.DictReader(f)]


# Final weights (12 steps of Adam) and per-epoch losses against the uninterrupted run.
# Measured, stopped at step 4 and resumed either way: 3.6e-3 and 3.2e-3 apart in relative
# distance, losses within 3e-5 (the steps trained on 2 workers summed their gradients in
# another order; in process, one device started from weights perturbed by 1e-7 ends the
# same 12 steps 2.4e-3 away). With the pipeline id folded back into the keys (each worker
# its own permutation and draws: examples twice in a step, others never): 0.79 and 0.27
# apart, losses 3.5e-2 and 8e-3 off; with worker 1's slice at offset 0 (both workers train
# the first half of each global batch): 0.82 and 0.27, losses 2.5e-2 and 5e-3 off.
_RESUME_TOLERANCE = 3e-2
_LOSS_TOLERANCE = 1e-3


@pytest.mark.slow
def test_a_run_stopped_on_two_workers_resumes_on_one_and_the_other_way_as_one_uninterrupted(
    records, tmp_path):
  """The issue's bar, the command's path: Baseline (dropout 0.2), dihedral and stain
  augmentation, --seed, a backup every 3 steps. Begun on 2 local workers and preempted (worker
  1 SIGTERMed) at its first backup, the same flags as one process are accepted, say so in one
  line, resume at that step and finish; begun as one process and preempted there, the same
  flags on 2 workers do too. Both end as the uninterrupted one-process run: the same epochs
  in the history, losses and final weights within float-sum drift (see the tolerances)."""
  status, output = _one_process(records, tmp_path / 'whole')
  assert status == 0, output[-3000:]
  whole = _final_weights(tmp_path / 'whole')
  keras.utils.set_random_seed(_SEED)  # The trainer's initial weights, for the scale.
  start = models.build_model('baseline', records_lib.Records.open(records).image_shape,
                             dropout=None).get_weights()
  moved = [np.max(np.abs(w - s)) for w, s in zip(whole, start)]
  assert 1e-3 < max(moved) < 0.1, moved  # It trained, from these weights (Adam, 12 steps).

  # 2 workers, then one process.
  two_then_one = tmp_path / 'two_then_one'
  epoch, step = _stopped(*_two_workers(records, two_then_one, stop=True), workers=2)
  status, output = _one_process(records, two_then_one)
  assert status == 0, output[-3000:]
  assert ('resuming on 1 worker (the run began on 2 workers): the same batches; float sums '
          'may round differently') in output
  assert f'resuming epoch {epoch} at step {step} from ' in output

  # One process, then 2 workers.
  one_then_two = tmp_path / 'one_then_two'
  epoch, step = _stopped(*_one_process(records, one_then_two, stop=True), workers=1)
  status, output = _two_workers(records, one_then_two)
  assert status == 0, output[-3000:]
  assert ('[worker 0] resuming on 2 workers (the run began on 1 worker): the same batches; '
          'float sums may round differently') in output
  assert sorted(re.findall(rf'\[worker (\d)\] resuming epoch {epoch} at step {step} from ',
                           output)) == ['0', '1'], output[-3000:]

  distances, losses = {}, {}
  for name in ('two_then_one', 'one_then_two'):
    distances[name] = _relative_distance(whole, _final_weights(tmp_path / name), start)
    resumed, uninterrupted = _history(tmp_path / name), _history(tmp_path / 'whole')
    assert [r[0] for r in resumed] == [r[0] for r in uninterrupted] == [1, 2], name
    losses[name] = float(np.max(np.abs(np.subtract(resumed, uninterrupted))))
  print('relative distance of the final weights:', distances, 'losses:', losses)
  assert max(losses.values()) < _LOSS_TOLERANCE, losses
  assert max(distances.values()) < _RESUME_TOLERANCE, distances
