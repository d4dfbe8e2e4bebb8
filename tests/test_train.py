"""Models, precision, strategies, the training loop, resumption, evaluation and submission."""

import csv
import json
import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from pcam_tfdata import distribute
from pcam_tfdata import loop
from pcam_tfdata import models
from pcam_tfdata import report
from pcam_tfdata import submission
from pcam_tfdata import synthetic
from pcam_tfdata import train
from conftest import ROOT, run_convert, run_tool


@pytest.fixture(autouse=True)
def float32_policy():
  yield
  keras.mixed_precision.set_global_policy('float32')


@pytest.fixture(scope='module')
def mirrored():
  """One MirroredStrategy over the two logical CPUs for the whole module.

  A second strategy in the same process would reuse the first one's collective
  instance keys (and fail with a shape mismatch); a real run has one.
  """
  return tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])


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


@pytest.mark.parametrize('mode, compute', [('off', 'float32'), ('float16', 'float16'),
                                           ('bfloat16', 'bfloat16'), ('auto', 'float32')])
def test_precision_policies(mode, compute):
  distribute.set_precision(mode)
  model = models.build_model('batchnorm')
  out = model(np.zeros((2, 32, 32, 3), np.uint8), training=False)
  assert out.dtype == tf.float32  # The sigmoid stays in float32.
  assert model.get_layer('block1_conv').compute_dtype == compute
  assert {v.dtype for v in model.weights} == {'float32'}  # Variables stay float32.


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


def test_exact_metrics_match_a_recomputation(learnable_records, tmp_path):
  """The demo model learns, and metrics.json holds the exact whole-split figures."""
  metrics = train.run(_config(learnable_records, tmp_path / 'run', epochs=4, batch_size=16,
                              model='baseline', profile_steps=(1, 3)))
  assert metrics['val_auc'] > 0.8, metrics
  assert list((tmp_path / 'run' / 'tensorboard' / 'plugins' / 'profile').glob('*/*.xplane.pb'))
  from sklearn.metrics import roc_auc_score  # pylint: disable=g-import-not-at-top
  from pcam_tfdata import evaluate, pipeline  # pylint: disable=g-import-not-at-top
  model = keras.models.load_model(tmp_path / 'run' / 'model.keras')
  ds = pipeline.make_dataset(str(learnable_records), 'val', batch_size=7, training=False,
                             with_ids=True)
  probs, labels, ids = evaluate.predict(evaluate.make_predict_fn(model), ds)
  assert len(ids) == len(set(ids)) == 100
  assert metrics['val_auc'] == pytest.approx(roc_auc_score(labels, probs), abs=1e-6)


_KILL_AFTER_SECOND_BACKUP = '''
import os, signal, sys
from pcam_tfdata import loop, train
real = loop.Backup.save
def save_then_die(self, epoch, state):
  real(self, epoch, state)
  if epoch == 2:
    os.kill(os.getpid(), signal.SIGKILL)
loop.Backup.save = save_then_die
train.run(train.Config(records_dir=sys.argv[1], model_dir=sys.argv[2], epochs=4, batch_size=8,
                       eval_batch_size=16, mixed_precision='off', strategy='default', seed=1))
'''


def test_killed_run_resumes_at_its_last_finished_epoch(records, tmp_path):
  model_dir = tmp_path / 'run'
  proc = subprocess.run([sys.executable, '-c', _KILL_AFTER_SECOND_BACKUP, str(records),
                         str(model_dir)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  assert not (model_dir / 'metrics.json').exists()
  proc = run_tool('-m', 'pcam_tfdata.train', f'--records_dir={records}', f'--model_dir={model_dir}',
                  '--epochs=4', '--batch_size=8', '--mixed_precision=off', '--strategy=default',
                  '--seed=1', timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'resuming after epoch 2' in proc.stdout
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


def test_submission_covers_the_test_split(records, kaggle_dir, tmp_path):
  model = models.build_model('baseline')
  ids, probs = submission.predict_test(model, str(records), batch_size=4, tta=True)
  test_ids = sorted(p.stem for p in (kaggle_dir / 'test').iterdir())
  assert sorted(ids) == test_ids and len(ids) == len(set(ids))
  assert ((probs >= 0) & (probs <= 1)).all()
  out = tmp_path / 'submission.csv'
  sample = kaggle_dir / 'sample_submission.csv'
  submission.write_submission(ids, probs, str(out), str(sample))
  written = pd.read_csv(out, dtype={'id': str})
  assert written['id'].tolist() == pd.read_csv(sample, dtype={'id': str})['id'].tolist()
  broken = tmp_path / 'sample.csv'
  pd.DataFrame({'id': ['0' * 40], 'label': [0]}).to_csv(broken, index=False)
  with pytest.raises(ValueError, match=f'id {"0" * 40} is not in the test records'):
    submission.write_submission(ids, probs, str(tmp_path / 'x.csv'), str(broken))
  assert not (tmp_path / 'x.csv').exists()


def test_tta_of_a_symmetric_model_equals_plain_prediction(records):
  inputs = keras.Input((32, 32, 3), dtype='uint8')
  x = keras.layers.Rescaling(1 / 255)(inputs)
  outputs = keras.layers.Dense(1, activation='sigmoid')(keras.layers.GlobalAveragePooling2D()(x))
  model = keras.Model(inputs, outputs)  # Invariant to flips and rotations.
  _, plain = submission.predict_test(model, str(records), batch_size=4)
  _, tta = submission.predict_test(model, str(records), batch_size=4, tta=True)
  np.testing.assert_allclose(plain, tta, atol=1e-6)


@pytest.mark.parametrize('flags, message', [
    (['--model=resnet'], 'model'),
    (['--strategy=mirrored', '--num_cpu_devices=2', '--batch_size=7'],
     '--batch_size=7 is not divisible by the 2 replicas'),
    (['--records_dir=/nonexistent/records'], '/nonexistent/records: no such records folder'),
    (['--epochs=0'], '--epochs=0: must be >= 1'),
    (['--profile_steps=5'], '--profile_steps=5: expected START,STOP'),
])
def test_bad_flags_fail_with_one_line(records, tmp_path, flags, message):
  args = ['-m', 'pcam_tfdata.train', f'--records_dir={records}', f'--model_dir={tmp_path / "r"}']
  proc = run_tool(*args, *flags, timeout=300)
  assert proc.returncode != 0
  errors = [l for l in proc.stderr.splitlines() if 'error' in l.lower()]
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


def test_predict_cli_writes_the_submission(records, kaggle_dir, tmp_path):
  model_dir = tmp_path / 'run'
  train.run(_config(records, model_dir))
  out = tmp_path / 'submission.csv'
  sample = kaggle_dir / 'sample_submission.csv'
  proc = run_tool('-m', 'pcam_tfdata.predict', f'--model_dir={model_dir}',
                  f'--records_dir={records}', f'--output={out}', f'--sample_submission={sample}',
                  '--tta', timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  written = pd.read_csv(out, dtype={'id': str})
  assert written['id'].tolist() == pd.read_csv(sample, dtype={'id': str})['id'].tolist()
  assert list(written.columns) == ['id', 'label'] and written['label'].between(0, 1).all()

  proc = run_tool('-m', 'pcam_tfdata.predict', f'--model_dir={tmp_path / "absent"}',
                  f'--records_dir={records}', f'--output={tmp_path / "x.csv"}', timeout=300)
  assert proc.returncode == 1 and 'model.keras: no such model' in proc.stderr
  assert not (tmp_path / 'x.csv').exists()
