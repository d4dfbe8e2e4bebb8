"""Models, precision, strategies, the training loop, resumption, evaluation and submission."""

import csv
import json
import re
import signal
import subprocess
import sys
import types

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from pcam_tfdata.convert import synthetic
from pcam_tfdata.convert import tiff
from pcam_tfdata import report
from pcam_tfdata import train
from pcam_tfdata.training import augment
from pcam_tfdata.training import backup
from pcam_tfdata.training import distribute
from pcam_tfdata.training import loop
from pcam_tfdata.training import models
from pcam_tfdata.training import pipeline
from pcam_tfdata.training import submission
from conftest import ROOT, error_lines, run_convert, run_in_terminal, run_tool, user_env


@pytest.fixture(autouse=True)
def float32_policy():
  yield
  keras.mixed_precision.set_global_policy('float32')


@pytest.fixture(scope='module')
def learnable_records(tmp_path_factory):
  """400 synthetic patches: enough for a model to learn the center cluster."""
  base = tmp_path_factory.mktemp('learnable')
  synthetic.make_dataset(str(base / 'kaggle'), num_train=400, num_test=0, seed=11,
                         show_progress=False)
  run_convert(base / 'kaggle', base / 'rec', per_class=0, val_fraction=0.25)
  return base / 'rec'


def _config(records, model_dir, **kwargs):
  kwargs.setdefault('epochs', 1)
  kwargs.setdefault('batch_size', 8)
  kwargs.setdefault('eval_batch_size', 16)
  kwargs.setdefault('mixed_precision', 'off')
  kwargs.setdefault('strategy', 'default')
  kwargs.setdefault('seed', 1)
  return train.Config(records_dir=str(records), model_dir=str(model_dir), **kwargs)


@pytest.mark.parametrize('name, params', [('baseline', 355649), ('batchnorm', 1422721)])
def test_parameter_counts(name, params):
  assert models.build_model(name).count_params() == params


def test_unknown_model_is_refused():
  with pytest.raises(ValueError, match="unknown model 'resnet'"):
    models.build_model('resnet')


def test_sync_batch_norm_keeps_the_weights_and_loads_on_one_device(tmp_path, mirrored):
  with mirrored.scope():
    synced = models.build_model('batchnorm', sync_batch_norm=True)
  plain = models.build_model('batchnorm')
  assert synced.count_params() == plain.count_params() == 1_422_721  # The seed's count.
  assert all(l.synchronized for l in synced.layers if 'bn' in l.name)
  images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  expected = synced(images, training=False).numpy()
  synced.save(tmp_path / 'model.keras')
  loaded = keras.models.load_model(tmp_path / 'model.keras')  # Default strategy: one device.
  np.testing.assert_allclose(loaded.predict(images, verbose=0), expected, rtol=1e-6)


@pytest.mark.parametrize('mode, replicas, expected', [
    ('auto', 1, False), ('auto', 2, True), ('on', 1, True), ('off', 2, False)])
def test_sync_batch_norm_auto_means_more_than_one_replica(mode, replicas, expected):
  assert distribute.resolve_sync_batch_norm(mode, replicas) is expected


@pytest.mark.parametrize('mode, gpus, expected', [
    ('auto', [], False), ('auto', ['GPU:0'], True), ('on', [], True), ('off', ['GPU:0'], False)])
def test_jit_compile_auto_decides_as_keras(monkeypatch, mode, gpus, expected):
  monkeypatch.setattr(tf.config, 'list_physical_devices',
                      lambda kind=None: list(gpus) if kind == 'GPU' else [])
  assert distribute.resolve_jit_compile(mode, tf.distribute.get_strategy()) is expected


def test_jit_compile_auto_is_off_under_several_replicas(monkeypatch, mirrored):
  monkeypatch.setattr(tf.config, 'list_physical_devices',
                      lambda kind=None: ['GPU:0'] if kind == 'GPU' else [])
  assert distribute.resolve_jit_compile('auto', mirrored) is False


@pytest.mark.parametrize('mode, tensor_cores, compute', [
    ('off', False, 'float32'), ('float16', False, 'float16'), ('bfloat16', False, 'bfloat16'),
    ('auto', False, 'float32'), ('auto', True, 'float16'), ('off', True, 'float32')])
def test_precision_policies(monkeypatch, mode, tensor_cores, compute):
  # Whether this host has tensor-core GPUs must not change what the test means.
  monkeypatch.setattr(distribute, '_tensor_core_gpus', lambda: tensor_cores)
  distribute.set_precision(mode)
  model = models.build_model('batchnorm')
  out = model(np.zeros((2, 32, 32, 3), np.uint8), training=False)
  assert out.dtype == tf.float32  # The sigmoid stays in float32.
  assert model.get_layer('block1_conv').compute_dtype == compute
  assert {v.dtype for v in model.weights} == {'float32'}  # Variables stay float32.


@pytest.mark.parametrize('capabilities, expected', [
    ([], False), ([(8, 0)], True), ([(7, 0), (9, 0)], True), ([(6, 1)], False),
    ([(8, 6), (6, 1)], False)])
def test_tensor_cores_means_every_gpu_has_them(monkeypatch, capabilities, expected):
  gpus = [f'GPU:{i}' for i in range(len(capabilities))]
  details = dict(zip(gpus, capabilities))
  monkeypatch.setattr(tf.config, 'list_physical_devices', lambda kind: gpus if kind == 'GPU'
                      else [])
  monkeypatch.setattr(tf.config.experimental, 'get_device_details',
                      lambda gpu: {'compute_capability': details[gpu]})
  assert distribute._tensor_core_gpus() is expected


@pytest.mark.parametrize('cluster, task_type, task_id, expected', [
    ({'worker': ['a', 'b']}, 'worker', 0, 0), ({'worker': ['a', 'b']}, 'worker', 1, 1),
    ({'chief': ['c'], 'worker': ['a', 'b']}, 'chief', 0, 0),
    ({'chief': ['c'], 'worker': ['a', 'b']}, 'worker', 0, 1),
    ({'chief': ['c'], 'worker': ['a', 'b']}, 'worker', 1, 2),
    ({}, None, None, 0)])  # MultiWorkerMirroredStrategy without TF_CONFIG: one local worker.
def test_input_pipeline_ids_number_the_chief_first(cluster, task_type, task_id, expected):
  assert distribute.id_in_cluster(cluster, task_type, task_id) == expected


@pytest.mark.parametrize('name', ['baseline', 'batchnorm'])
def test_a_step_under_mirrored_strategy_on_two_cpus(name, mirrored):
  strategy = mirrored
  assert strategy.num_replicas_in_sync == 2
  with strategy.scope():
    model = models.build_model(name)
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
  before = [w.copy() for w in model.get_weights()]
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 2, 8).astype(np.float32)
  ds = tf.data.Dataset.from_tensors((images, labels)).repeat(2)
  dist = strategy.experimental_distribute_dataset(ds)
  step = loop.make_train_fn(model, optimizer, strategy, global_batch_size=8)
  loss_sum, correct = step(iter(dist), tf.constant(2))
  assert np.isfinite(float(loss_sum)) and 0 <= float(correct) <= 16
  assert int(optimizer.iterations.numpy()) == 2
  assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def test_run_under_mirrored_strategy_writes_every_output(records, tmp_path, mirrored):
  metrics = train.run(_config(records, tmp_path / 'run', epochs=2), strategy=mirrored)
  assert metrics['strategy'] == 'mirrored' and metrics['num_replicas_in_sync'] == 2
  assert metrics['precision_policy'] == 'float32'
  for name in ('metrics.json', 'history.csv', 'model.keras', 'training_curves.png',
               'confusion_matrix.png', 'roc_curve.png'):
    assert (tmp_path / 'run' / name).is_file(), name
  on_disk = json.loads((tmp_path / 'run' / 'metrics.json').read_text())
  for key in ('train_accuracy', 'train_auc', 'val_accuracy', 'val_auc'):
    assert 0 <= on_disk[key] <= 1
  with open(tmp_path / 'run' / 'history.csv') as f:
    rows = list(csv.DictReader(f))
  assert [r['epoch'] for r in rows] == ['1', '2'] and list(rows[0])[0] == 'epoch'


def test_batch_not_divisible_by_replicas(records, tmp_path, mirrored):
  with pytest.raises(ValueError, match='--batch_size=7 is not divisible by the 2 replicas'):
    train.run(_config(records, tmp_path / 'run', batch_size=7), strategy=mirrored)


def test_xla_with_synchronized_batch_norm_over_replicas_is_refused(records, tmp_path,
                                                                     mirrored):
  with pytest.raises(ValueError, match='--jit_compile=on cannot compile synchronized BatchNorm '
                     'over 2 replicas; use --jit_compile=off or --sync_batch_norm=off'):
    train.run(_config(records, tmp_path / 'run', model='batchnorm', jit_compile='on',
                      seed=None), strategy=mirrored)
  assert not (tmp_path / 'run').exists()  # Refused before anything was written.


def test_xla_with_a_seed_on_gpus_is_refused(records, tmp_path, monkeypatch):
  """On GPU hosts --seed turns op determinism on, under which XLA fails its first step."""
  real = tf.config.list_physical_devices
  monkeypatch.setattr(tf.config, 'list_physical_devices',
                      lambda kind=None: ['GPU:0'] if kind == 'GPU' else real(kind))
  with pytest.raises(ValueError, match='--jit_compile=on with --seed on GPUs'):
    train.run(_config(records, tmp_path / 'run', jit_compile='on'))


def test_training_with_stain_jitter_and_augmentation_records_both(records, tmp_path):
  metrics = train.run(_config(records, tmp_path / 'run', augment=True, stain_jitter=0.1))
  assert metrics['augment'] is True and metrics['stain_jitter'] == 0.1
  assert np.isfinite(metrics['train_loss']) and 0 <= metrics['val_auc'] <= 1


@pytest.mark.parametrize('strategy', ['default', 'mirrored'])
def test_stain_jitter_in_the_step_and_the_per_batch_dihedral_train_as_the_pipeline(
    records, tmp_path, strategy, request):
  """The dihedral transform from the cached variants or after each gather: the
  same run, bit for bit. The stain draws applied in the training step or in
  the pipeline: the same run up to float rounding (a pixel may round the other
  way in a compiled step), far from a run without the jitter."""
  from pcam_tfdata.training import augment, loop  # pylint: disable=g-import-not-at-top
  dist = request.getfixturevalue('mirrored') if strategy == 'mirrored' else None
  runs = {}
  for name, where, gib, stain in (('variants', 'host', 4.0, 0.05), ('per_batch', 'host', 0.0, 0.05),
                                  ('device', 'device', 4.0, 0.05), ('none', 'host', 4.0, 0.0)):
    in_step = []  # Traces of the training step's stain jitter.
    step_augment = types.SimpleNamespace(
        apply_stain=lambda *a: in_step.append(1) or augment.apply_stain(*a))
    with pytest.MonkeyPatch.context() as patch:
      patch.setattr(loop, 'augment', step_augment)
      metrics = train.run(_config(records, tmp_path / name, augment=True, stain_jitter=stain,
                                  stain_jitter_on=where, augment_cache_gib=gib, batch_size=8),
                          strategy=dist)
    assert metrics['stain_jitter_on'] == (where if stain else 'off')
    assert bool(in_step) == (where == 'device')
    runs[name] = keras.saving.load_model(tmp_path / name / 'model.keras').get_weights()
  for a, b in zip(runs['variants'], runs['per_batch']):
    np.testing.assert_array_equal(a, b)
  gap = lambda x, y: max(float(np.max(np.abs(a - b))) for a, b in zip(runs[x], runs[y]))
  assert gap('variants', 'device') < 0.05 * gap('variants', 'none'), (
      gap('variants', 'device'), gap('variants', 'none'))


def test_exact_metrics_match_a_recomputation(learnable_records, tmp_path):
  """The demo model learns, and metrics.json holds the exact whole-split figures."""
  metrics = train.run(_config(learnable_records, tmp_path / 'run', epochs=4, batch_size=16,
                              model='baseline', profile_steps=(1, 3)))
  assert metrics['val_auc'] > 0.8, metrics
  assert list((tmp_path / 'run' / 'tensorboard' / 'plugins' / 'profile').glob('*/*.xplane.pb'))
  from sklearn.metrics import roc_auc_score  # pylint: disable=g-import-not-at-top
  from pcam_tfdata.training import evaluate, pipeline  # pylint: disable=g-import-not-at-top
  model = keras.models.load_model(tmp_path / 'run' / 'model.keras')
  ds = pipeline.make_dataset(str(learnable_records), 'val', batch_size=7, training=False,
                             with_ids=True)
  probs, labels, ids = evaluate.predict(evaluate.make_predict_fn(model), ds)
  assert len(ids) == len(set(ids)) == 100
  assert metrics['val_auc'] == pytest.approx(roc_auc_score(labels, probs), abs=1e-6)


# Both scripts dump the model's weights and the optimizer's variables (step
# count, Adam's moments, learning rate) to an .npz: the first as it saves the
# epoch-2 backup (then dies), the second right after the restart restores it.
_STATE = '''
import numpy as np
def dump(path, checkpoint):
  arrays = [np.asarray(w) for w in checkpoint.model.get_weights()]
  arrays += [np.asarray(v) for v in checkpoint.optimizer.variables]
  np.savez(path, *arrays)
'''
_KILL_AFTER_SECOND_BACKUP = _STATE + '''
import os, signal, sys
from pcam_tfdata import train
from pcam_tfdata.training import backup
real = backup.Backup.save
def save_then_die(self, epoch, state):
  real(self, epoch, state)
  if epoch == 2:
    dump(sys.argv[3], self._checkpoint)
    os.kill(os.getpid(), signal.SIGKILL)
backup.Backup.save = save_then_die
train.run(train.Config(records_dir=sys.argv[1], model_dir=sys.argv[2], epochs=4, batch_size=8,
                       eval_batch_size=16, mixed_precision='off', strategy='default', seed=1))
'''
_RESUME_THROUGH_THE_CLI = _STATE + '''
import sys
from absl import app
from pcam_tfdata import train
from pcam_tfdata.training import backup
real = backup.Backup.restore
out = sys.argv[1]
def restore_and_dump(self):
  result = real(self)
  dump(out, self._checkpoint)
  return result
backup.Backup.restore = restore_and_dump
sys.argv = ['train'] + sys.argv[2:]
app.run(train.main)
'''


def test_killed_run_resumes_with_the_weights_and_optimizer_of_its_last_epoch(records, tmp_path):
  model_dir = tmp_path / 'run'
  proc = subprocess.run([sys.executable, '-c', _KILL_AFTER_SECOND_BACKUP, str(records),
                         str(model_dir), str(tmp_path / 'saved.npz')], cwd=ROOT,
                        capture_output=True, text=True, timeout=600, env=user_env())
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  assert not (model_dir / 'metrics.json').exists()
  proc = subprocess.run([sys.executable, '-c', _RESUME_THROUGH_THE_CLI,
                         str(tmp_path / 'restored.npz'), f'--records_dir={records}',
                         f'--model_dir={model_dir}', '--epochs=4', '--batch_size=8',
                         '--mixed_precision=off', '--strategy=default', '--seed=1'],
                        cwd=ROOT, capture_output=True, text=True, timeout=600, env=user_env())
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'resuming after epoch 2' in proc.stdout
  saved, restored = np.load(tmp_path / 'saved.npz'), np.load(tmp_path / 'restored.npz')
  assert saved.files == restored.files
  for key in saved.files:  # Every weight, moment and counter, bit for bit.
    np.testing.assert_array_equal(restored[key], saved[key], err_msg=key)
  model = models.build_model('baseline')
  steps = int(np.asarray(restored[f'arr_{len(model.weights)}']))  # optimizer.iterations
  assert steps == 2 * (48 // 8)  # Two epochs of 6 steps, not a fresh optimizer.
  with open(model_dir / 'history.csv') as f:
    assert [r['epoch'] for r in csv.DictReader(f)] == ['1', '2', '3', '4']
  metrics = json.loads((model_dir / 'metrics.json').read_text())
  assert metrics['epochs_run'] == 4


def test_callback_state_follows_keras_semantics():
  state = loop.CallbackState()
  lr = 1e-3
  trace = []
  for epoch, auc in enumerate([0.80, 0.85, 0.84, 0.83, 0.86, 0.85, 0.85, 0.85], start=1):
    improved, lr = state.update(epoch, auc, early_stopping_patience=3, reduce_lr_patience=2,
                                lr=lr)
    trace.append((improved, lr, state.stopped_early))
    if state.stopped_early:
      break
  assert [t[0] for t in trace] == [True, True, False, False, True, False, False, False]
  assert [t[1] for t in trace] == [1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 5e-4, 2.5e-4, 2.5e-4]
  assert trace[-1][2] and state.best_epoch == 5 and state.best == 0.86


def _linear_model(seed=0):
  """sigmoid(w . pixels/255 + b) with fixed random weights: its answer for an image is
  known in NumPy, and differs between an image's 8 flips and rotations."""
  inputs = keras.Input((32, 32, 3), dtype='uint8')
  x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
  dense = keras.layers.Dense(1, activation='sigmoid')
  model = keras.Model(inputs, dense(x))
  rng = np.random.default_rng(seed)
  dense.set_weights([rng.normal(0, 0.02, (32 * 32 * 3, 1)).astype(np.float32),
                     np.array([0.1], np.float32)])
  return model, dense.get_weights()


def _expected_probability(weights, image, tta):
  """The linear model's probability for one uint8 crop, computed in NumPy."""
  kernel, bias = weights
  table = augment.dihedral_permutations(32)  # np.rot90-built, independent of the TF code.
  views = [image.reshape(-1, 3)[table[k]].reshape(32, 32, 3) for k in (range(8) if tta else [0])]
  logits = [v.reshape(-1).astype(np.float64) / 255 @ kernel[:, 0] + bias[0] for v in views]
  return float(np.mean([1 / (1 + np.exp(-z)) for z in logits]))


def _test_crops(kaggle_dir):
  return {p.stem: tiff.read_patch(str(p))[32:64, 32:64] for p in (kaggle_dir / 'test').iterdir()}


@pytest.mark.parametrize('tta', [False, True])
def test_each_test_id_gets_its_own_probability(records, kaggle_dir, tmp_path, tta):
  model, weights = _linear_model()
  ids, probs = submission.predict_test(model, str(records), batch_size=4, tta=tta)
  crops = _test_crops(kaggle_dir)
  assert sorted(ids) == sorted(crops) and len(ids) == len(set(ids))
  expected = {i: _expected_probability(weights, crops[i], tta) for i in crops}
  gaps = np.diff(sorted(expected.values()))
  assert gaps.min() > 1e-4  # Far apart, against the 2e-6 of the check below.
  out = tmp_path / 'submission.csv'
  sample = kaggle_dir / 'sample_submission.csv'
  submission.write_submission(ids, probs, str(out), str(sample))
  written = pd.read_csv(out, dtype={'id': str})
  assert written['id'].tolist() == pd.read_csv(sample, dtype={'id': str})['id'].tolist()
  for example_id, label in zip(written['id'], written['label']):
    assert label == pytest.approx(expected[example_id], abs=2e-6), example_id


def test_tta_averages_the_eight_views(records, kaggle_dir):
  """An asymmetric model: TTA that skipped or repeated a view would miss the average."""
  model, weights = _linear_model(seed=4)
  ids, plain = submission.predict_test(model, str(records), batch_size=4)
  _, tta = submission.predict_test(model, str(records), batch_size=4, tta=True)
  crops = _test_crops(kaggle_dir)
  for example_id, p, q in zip(ids, plain, tta):
    assert q == pytest.approx(_expected_probability(weights, crops[example_id], True), abs=1e-6)
    assert abs(p - q) > 1e-4  # The views really differ, so the check above means something.


def test_a_sample_id_missing_from_the_records_is_refused(tmp_path):
  broken = tmp_path / 'sample.csv'
  pd.DataFrame({'id': ['0' * 40], 'label': [0]}).to_csv(broken, index=False)
  with pytest.raises(ValueError, match=f'id {"0" * 40} is not in the test records'):
    submission.write_submission(np.array(['1' * 40]), np.array([0.5]),
                                str(tmp_path / 'x.csv'), str(broken))
  assert not (tmp_path / 'x.csv').exists()


def test_tta_of_a_symmetric_model_equals_plain_prediction(records):
  inputs = keras.Input((32, 32, 3), dtype='uint8')
  x = keras.layers.Rescaling(1 / 255)(inputs)
  outputs = keras.layers.Dense(1, activation='sigmoid')(keras.layers.GlobalAveragePooling2D()(x))
  model = keras.Model(inputs, outputs)  # Invariant to flips and rotations.
  _, plain = submission.predict_test(model, str(records), batch_size=4)
  _, tta = submission.predict_test(model, str(records), batch_size=4, tta=True)
  np.testing.assert_allclose(plain, tta, atol=1e-6)


def test_multi_worker_without_a_cluster_trains_as_one_local_worker(records, tmp_path):
  env = {k: v for k, v in user_env().items() if k not in ('TF_CONFIG', 'SLURM_JOB_ID')}
  proc = run_tool('-m', 'pcam_tfdata.train', f'--records_dir={records}',
                  f'--model_dir={tmp_path / "run"}', '--epochs=1', '--batch_size=8',
                  '--mixed_precision=off', '--strategy=multi_worker', env=env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads((tmp_path / 'run' / 'metrics.json').read_text())['strategy'] == 'multi_worker'


@pytest.mark.parametrize('flags, message', [
    (['--model=resnet'], 'model'),
    (['--strategy=mirrored', '--num_cpu_devices=2', '--batch_size=7'],
     '--batch_size=7 is not divisible by the 2 replicas'),
    (['--records_dir=/nonexistent/records'], '/nonexistent/records: no such records folder'),
    (['--epochs=0'], '--epochs=0: must be >= 1'),
    (['--profile_steps=5'], '--profile_steps=5: expected START,STOP'),
    (['--strategy=multi_worker', 'TF_CONFIG={"cluster": '], 'TF_CONFIG: not valid JSON'),
    (['--seed=-1'], '--seed=-1: must be in 0..4294967295'),
    (['--stain_jitter=1.5'], '--stain_jitter=1.5: must be in [0, 1)'),
    (['--sync_batch_norm=maybe'], 'sync_batch_norm'),
    (['--augment_cache_gib=-1'], '--augment_cache_gib=-1.0: must be a number of GiB'),
    (['--augment_cache_gib=inf'], '--augment_cache_gib=inf: must be a number of GiB'),
    (['--stain_jitter_on=gpu'], 'stain_jitter_on'),
    (['--strategy=mirrored', '--num_cpu_devices=2', '--model=batchnorm', '--jit_compile=on',
      '--batch_size=8'],
     '--jit_compile=on cannot compile synchronized BatchNorm over 2 replicas'),
])
def test_bad_flags_fail_with_one_line(records, tmp_path, flags, message):
  args = ['-m', 'pcam_tfdata.train', f'--records_dir={records}', f'--model_dir={tmp_path / "r"}']
  env = dict(f.split('=', 1) for f in flags if f.startswith('TF_CONFIG='))
  flags = [f for f in flags if not f.startswith('TF_CONFIG=')]
  # As a user runs it (no TF_CPP_MIN_LOG_LEVEL), with TensorFlow's noisiest start-up on
  # every CPU (conftest.user_env), and no GPU to change the replica count.
  proc = run_tool(*args, *flags, timeout=300, env=user_env(CUDA_VISIBLE_DEVICES='', **env))
  assert proc.returncode != 0
  errors = error_lines(proc.stderr)
  assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
  assert not (tmp_path / 'r' / 'metrics.json').exists()


def test_report_prints_the_seed_table(tmp_path):
  for name, auc in (('baseline', 0.9271), ('batchnorm', 0.9537)):
    (tmp_path / name).mkdir()
    (tmp_path / name / 'metrics.json').write_text(json.dumps({
        'model': name, 'train_accuracy': 0.9, 'train_auc': 0.95, 'val_accuracy': 0.85,
        'val_auc': auc, 'best_epoch': 3, 'precision_policy': 'float32',
        'num_replicas_in_sync': 1}))
  text = report.table([str(tmp_path / 'baseline'), str(tmp_path / 'batchnorm')])
  assert '| Baseline | 0.9000 | 0.9500 | 0.8500 | 0.9271 |' in text
  assert '| BatchNorm | 0.9000 | 0.9500 | 0.8500 | 0.9537 |' in text
  with pytest.raises(ValueError, match='no finished run'):
    report.table([str(tmp_path / 'absent')])


@pytest.mark.parametrize('mode, policy', [('float16', 'mixed_float16'),
                                          ('bfloat16', 'mixed_bfloat16')])
def test_mixed_precision_run_trains_with_finite_loss(records, tmp_path, mode, policy):
  metrics = train.run(_config(records, tmp_path / 'run', mixed_precision=mode))
  assert metrics['precision_policy'] == policy
  with open(tmp_path / 'run' / 'history.csv') as f:
    row = next(csv.DictReader(f))
  assert np.isfinite(float(row['train_loss'])) and np.isfinite(float(row['val_loss']))
  model = keras.models.load_model(tmp_path / 'run' / 'model.keras')
  assert model.get_layer('block1_conv').compute_dtype == policy.split('_')[1]
  assert model.get_layer('probability').compute_dtype == 'float32'


def test_predict_cli_writes_each_ids_probability(records, kaggle_dir, tmp_path):
  model_dir = tmp_path / 'run'
  model_dir.mkdir()
  model, weights = _linear_model(seed=2)
  model.save(model_dir / 'model.keras')
  out = tmp_path / 'submission.csv'
  sample = kaggle_dir / 'sample_submission.csv'
  status, text = run_in_terminal('-m', 'pcam_tfdata.predict', f'--model_dir={model_dir}',
                                 f'--records_dir={records}', f'--output={out}',
                                 f'--sample_submission={sample}', '--tta', '--batch_size=4')
  assert status == 0, text[-2000:]
  assert re.search(r'predicting with TTA x8: +100%\|[^|]*\| *3/3', text), text[-2000:]
  written = pd.read_csv(out, dtype={'id': str})
  assert written['id'].tolist() == pd.read_csv(sample, dtype={'id': str})['id'].tolist()
  assert list(written.columns) == ['id', 'label']
  crops = _test_crops(kaggle_dir)
  for example_id, label in zip(written['id'], written['label']):
    # The CSV keeps 6 decimals.
    assert label == pytest.approx(_expected_probability(weights, crops[example_id], True),
                                  abs=2e-6), example_id

  proc = run_tool('-m', 'pcam_tfdata.predict', f'--model_dir={tmp_path / "absent"}',
                  f'--records_dir={records}', f'--output={tmp_path / "x.csv"}', timeout=300)
  assert proc.returncode == 1 and 'model.keras: no such model' in proc.stderr
  assert not (tmp_path / 'x.csv').exists()


def test_an_ensemble_of_two_runs_predicts_the_mean_of_each_models_own(records, kaggle_dir,
                                                                      tmp_path):
  weights = []
  for fold in range(2):
    (tmp_path / f'fold{fold}').mkdir()
    model, w = _linear_model(seed=10 + fold)
    model.save(tmp_path / f'fold{fold}' / 'model.keras')
    weights.append(w)
  out = tmp_path / 'ensemble.csv'
  proc = run_tool('-m', 'pcam_tfdata.predict',
                  f'--model_dir={tmp_path / "fold0"},{tmp_path / "fold1"}',
                  f'--records_dir={records}', f'--output={out}', '--tta', '--noprogress')
  assert proc.returncode == 0, proc.stderr[-2000:]
  written = pd.read_csv(out, dtype={'id': str})
  crops = _test_crops(kaggle_dir)
  assert sorted(written['id']) == sorted(crops)  # Every test id, once.
  for example_id, label in zip(written['id'], written['label']):
    own = [_expected_probability(w, crops[example_id], True) for w in weights]
    assert own[0] != pytest.approx(own[1], abs=1e-4)  # Two models that disagree,
    assert label == pytest.approx(np.mean(own), abs=2e-6), example_id  # averaged.


def test_an_ensemble_member_of_another_image_shape_is_refused(records, tmp_path):
  (tmp_path / 'a').mkdir()
  (tmp_path / 'b').mkdir()
  _linear_model()[0].save(tmp_path / 'a' / 'model.keras')
  models.build_model('baseline', (48, 48, 3)).save(tmp_path / 'b' / 'model.keras')
  proc = run_tool('-m', 'pcam_tfdata.predict', f'--model_dir={tmp_path / "a"},{tmp_path / "b"}',
                  f'--records_dir={records}', f'--output={tmp_path / "x.csv"}')
  assert proc.returncode == 1
  assert error_lines(proc.stderr) == [
      f'predict: error: {tmp_path / "b" / "model.keras"}: trained on images of [48, 48, 3], but '
      f'{records} holds [32, 32, 3]'], proc.stderr[-2000:]
  assert not (tmp_path / 'x.csv').exists()


def test_an_empty_ensemble_entry_is_refused(records, tmp_path):
  (tmp_path / 'a').mkdir()
  _linear_model()[0].save(tmp_path / 'a' / 'model.keras')
  _linear_model()[0].save(tmp_path / 'model.keras')  # What 'a,' would pick up from the cwd.
  proc = run_tool('-m', 'pcam_tfdata.predict', f'--model_dir={tmp_path / "a"},',
                  f'--records_dir={records}', f'--output={tmp_path / "x.csv"}', cwd=tmp_path)
  assert proc.returncode == 1
  assert error_lines(proc.stderr) == [
      f'predict: error: --model_dir={tmp_path / "a"},: an empty entry'], proc.stderr[-2000:]
  assert not (tmp_path / 'x.csv').exists()


def test_predict_prints_the_ensembles_metrics_on_a_labelled_test_split(records, tmp_path):
  from pcam_tfdata.training import evaluate  # pylint: disable=g-import-not-at-top
  # A labelled test split (as PCam's HDF5 source writes): the val split, renamed.
  import shutil  # pylint: disable=g-import-not-at-top
  copy = tmp_path / 'rec'
  shutil.copytree(records, copy)
  manifest = json.loads((copy / 'manifest.json').read_text())
  manifest['splits']['test'] = manifest['splits']['val']
  (copy / 'manifest.json').write_text(json.dumps(manifest))
  models_ = [_linear_model(seed=20 + i)[0] for i in range(2)]
  for i, model in enumerate(models_):
    (tmp_path / f'm{i}').mkdir()
    model.save(tmp_path / f'm{i}' / 'model.keras')
  proc = run_tool('-m', 'pcam_tfdata.predict', f'--model_dir={tmp_path / "m0"},{tmp_path / "m1"}',
                  f'--records_dir={copy}', f'--output={tmp_path / "x.csv"}', '--noprogress')
  assert proc.returncode == 0, proc.stderr[-2000:]
  _, probs, labels = submission.predict_split(models_, str(copy), 'test')
  expected = evaluate.binary_metrics(labels, probs)
  line = next(l for l in proc.stdout.splitlines() if l.startswith('test split (2 models)'))
  assert f'auc={expected["auc"]:.4f}' in line and f'accuracy={expected["accuracy"]:.4f}' in line


def _flip_a_byte(records, tmp_path, split):
  """A copy of the records with one byte of the split's first shard flipped."""
  import shutil  # pylint: disable=g-import-not-at-top
  copy = tmp_path / 'rec'
  shutil.copytree(records, copy)
  manifest = json.loads((copy / 'manifest.json').read_text())
  shard = copy / manifest['splits'][split]['shards'][0]['file']
  data = bytearray(shard.read_bytes())
  data[100] ^= 1  # Inside the first record's image.
  shard.write_bytes(bytes(data))
  return copy, shard


def _cut_after_first_record(records, tmp_path, split):
  """A copy of the records whose split's first shard of 2+ records ends after its first."""
  import shutil  # pylint: disable=g-import-not-at-top
  import struct  # pylint: disable=g-import-not-at-top
  copy = tmp_path / 'rec'
  shutil.copytree(records, copy)
  manifest = json.loads((copy / 'manifest.json').read_text())
  shard = copy / next(s['file'] for s in manifest['splits'][split]['shards'] if s['count'] > 1)
  data = shard.read_bytes()
  length = struct.unpack('<Q', data[:8])[0]
  shard.write_bytes(data[:8 + 4 + length + 4])  # A whole record: no read error of its own.
  return copy, shard


@pytest.mark.parametrize('damage, split', [('flipped byte', 'train'),
                                           ('cut at a record boundary', 'train'),
                                           ('cut at a record boundary', 'val')])
def test_a_damaged_shard_is_one_line_naming_it_in_train(records, tmp_path, damage, split):
  damaged = _flip_a_byte if damage == 'flipped byte' else _cut_after_first_record
  copy, shard = damaged(records, tmp_path, split)
  proc = run_tool('-m', 'pcam_tfdata.train', f'--records_dir={copy}',
                  f'--model_dir={tmp_path / "run"}', '--epochs=1', '--batch_size=8',
                  '--mixed_precision=off', '--strategy=default', '--noprogress')
  # Not metrics of fewer examples: a cut shard reads without an error of its own.
  assert proc.returncode == 1, proc.stdout[-2000:]
  errors = error_lines(proc.stderr)
  assert len(errors) == 1 and str(shard) in errors[0], proc.stderr[-3000:]
  assert 'tools/verify_records.py' in errors[0] and 'Traceback' not in proc.stderr
  assert not (tmp_path / 'run' / 'metrics.json').exists()


def test_a_damaged_backup_is_named_not_blamed_on_the_records(records, tmp_path, monkeypatch):
  model_dir = tmp_path / 'run'
  monkeypatch.setattr(backup.Backup, 'remove', lambda self: None)  # Keep it, as a kill would.
  train.run(_config(records, model_dir, epochs=1))
  monkeypatch.undo()
  data = next((model_dir / 'backup').glob('ckpt-1.data-*'))
  damaged = bytearray(data.read_bytes())
  damaged[len(damaged) // 2] ^= 0xFF
  data.write_bytes(bytes(damaged))
  (model_dir / 'metrics.json').unlink()
  with pytest.raises(ValueError, match='backup of an interrupted run cannot be restored') as e:
    train.run(_config(records, model_dir, epochs=2))
  assert 'verify_records' not in str(e.value) and str(model_dir / 'backup') in str(e.value)


@pytest.mark.parametrize('damage', ['flipped byte', 'cut at a record boundary'])
def test_a_damaged_test_shard_is_one_line_naming_it_in_predict(records, tmp_path, damage):
  damaged = _flip_a_byte if damage == 'flipped byte' else _cut_after_first_record
  copy, shard = damaged(records, tmp_path, 'test')
  model_dir = tmp_path / 'run'
  model_dir.mkdir()
  _linear_model()[0].save(model_dir / 'model.keras')
  proc = run_tool('-m', 'pcam_tfdata.predict', f'--model_dir={model_dir}',
                  f'--records_dir={copy}', f'--output={tmp_path / "sub.csv"}')
  assert proc.returncode == 1  # Not a short submission.
  errors = error_lines(proc.stderr)
  assert len(errors) == 1 and str(shard) in errors[0], proc.stderr[-3000:]
  assert not (tmp_path / 'sub.csv').exists()


_KILL_BEFORE_THE_BEST_MODEL_IS_COMMITTED = '''
import os, signal, sys
from pcam_tfdata import rundir, train
real = rundir.commit_best
def die_at_epoch_1(model_dir, epoch):
  if epoch == 1:  # The first epoch always improves: its best model is pending.
    os.kill(os.getpid(), signal.SIGKILL)
  real(model_dir, epoch)
rundir.commit_best = die_at_epoch_1
train.run(train.Config(records_dir=sys.argv[1], model_dir=sys.argv[2], epochs=3, batch_size=8,
                       eval_batch_size=16, mixed_precision='off', strategy='default', seed=1,
                       early_stopping_patience=5))
'''


def test_the_best_model_and_the_backup_agree_after_a_kill_between_them(records, tmp_path):
  model_dir = tmp_path / 'run'
  proc = subprocess.run([sys.executable, '-c', _KILL_BEFORE_THE_BEST_MODEL_IS_COMMITTED,
                         str(records), str(model_dir)], cwd=ROOT, capture_output=True,
                        text=True, timeout=600, env=user_env())
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  assert (model_dir / '.best-epoch1.keras').exists() and not (model_dir / 'model.keras').exists()
  with open(model_dir / 'history.csv') as f:
    rows = list(csv.DictReader(f))
  # Epoch 1 was backed up, so the restart must commit epoch 1's model, not lose it.
  train.run(_config(records, model_dir, epochs=1, early_stopping_patience=5))
  assert not list(model_dir.glob('.best-epoch*'))
  metrics = json.loads((model_dir / 'metrics.json').read_text())
  assert metrics['best_epoch'] == 1 and metrics['epochs_run'] == 1
  model = keras.models.load_model(model_dir / 'model.keras')
  from pcam_tfdata.training import evaluate  # pylint: disable=g-import-not-at-top
  ds = pipeline.make_dataset(str(records), 'val', batch_size=16, training=False, with_ids=True)
  probs, labels, _ = evaluate.predict(evaluate.make_predict_fn(model), ds)
  assert evaluate.binary_metrics(labels, probs)['auc'] == pytest.approx(
      float(rows[0]['val_auc']), abs=1e-6)


_KILL_AT_STEP = r'''
import os, signal, sys
from absl import app
from pcam_tfdata import train
from pcam_tfdata.training import loop
kill_at = int(sys.argv[1])
make_train_fn = loop.make_train_fn
def killing_train_fn(*args, **kwargs):
  train_steps = make_train_fn(*args, **kwargs)
  calls = [0]
  def wrapped(iterator, n):
    calls[0] += 1
    if calls[0] == kill_at:
      os.kill(os.getpid(), signal.SIGKILL)  # Mid-epoch, as a power cut would.
    return train_steps(iterator, n)
  return wrapped
loop.make_train_fn = killing_train_fn
sys.argv = ['train'] + sys.argv[2:]
app.run(train.main)
'''


def _final_digest(stdout):
  return re.findall(r'final weights sha256 (\w+)', stdout)


def _saved_weights(model_dir):
  return keras.models.load_model(model_dir / 'model.keras').get_weights()


# mirrored: 48 examples in per-replica batches of 16 are 3 batches, of which
# each epoch's one step of 32 takes 2: the third must not open the next epoch.
@pytest.mark.parametrize('strategy, batch_size, kill_at', [('default', 8, 9),
                                                           ('mirrored', 32, 2)])
def test_a_seeded_run_killed_mid_epoch_ends_bit_identical_to_an_uninterrupted_one(
    records, tmp_path, strategy, batch_size, kill_at):
  flags = ['--epochs=3', f'--batch_size={batch_size}', '--mixed_precision=off', '--seed=5',
           '--augment',
           '--noprogress', f'--records_dir={records}', '--early_stopping_patience=5',
           f'--strategy={strategy}', f'--num_cpu_devices={2 if strategy == "mirrored" else 1}']
  whole = run_tool('-m', 'pcam_tfdata.train', f'--model_dir={tmp_path / "whole"}', *flags)
  assert whole.returncode == 0, whole.stderr[-3000:]
  again = run_tool('-m', 'pcam_tfdata.train', f'--model_dir={tmp_path / "again"}', *flags)
  assert _final_digest(again.stdout) == _final_digest(whole.stdout)  # Reruns agree,
  killed_dir = tmp_path / 'killed'
  # Default: 6 steps per epoch, call 9 is step 3 of epoch 2; mirrored: 1 step
  # per epoch, call 2 is epoch 2's. Both after epoch 1's backup.
  killed = subprocess.run([sys.executable, '-c', _KILL_AT_STEP, str(kill_at),
                           f'--model_dir={killed_dir}', *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=user_env())
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert not (killed_dir / 'metrics.json').exists()
  resumed = run_tool('-m', 'pcam_tfdata.train', f'--model_dir={killed_dir}', *flags)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resuming after epoch 1' in resumed.stdout
  # and so does a resumed run: every weight bit, the last epoch's and the best's.
  assert _final_digest(resumed.stdout) == _final_digest(whole.stdout)
  for a, b in zip(_saved_weights(killed_dir), _saved_weights(tmp_path / 'whole')):
    np.testing.assert_array_equal(a, b)
  with open(killed_dir / 'history.csv') as f, open(tmp_path / 'whole' / 'history.csv') as g:
    key = lambda rows: [(r['epoch'], r['train_loss'], r['val_auc']) for r in rows]
    assert key(csv.DictReader(f)) == key(csv.DictReader(g))
