"""The library as users compose it: `import pcam_tfdata as pt`, Keras `fit`, the README session."""

import contextlib
import importlib
import inspect
import json
import re
import subprocess
import sys

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

import pcam_tfdata as pt
from pcam_tfdata.convert import kaggle
from pcam_tfdata.convert import plan
from pcam_tfdata.training import api
from conftest import ROOT, run_tool, user_env

# What differs between two runs of the same conversion or training: when and where.
_CIRCUMSTANCES = ('seconds', 'out_dir', 'records_dir')


@pytest.mark.parametrize('command', ['train', 'predict'])
def test_import_pcam_tfdata_imports_no_tensorflow(command):
  """Nor does naming the API, or importing a command's module (which must not hide pt.<name>)."""
  code = ('import sys, pcam_tfdata as pt\n'
          'pt.make_records, pt.make_synthetic, pt.Records, pt.train, pt.predict\n'
          f'import pcam_tfdata.{command}\n'
          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))\n"
          f'print(pt.{command}.__module__, pt.{command}.__name__)')
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                        env=user_env(), timeout=120, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.splitlines() == ['[]', f'pcam_tfdata.training.api {command}']


def test_every_public_name_is_documented_with_an_example():
  assert sorted(pt.__all__) == sorted(set(pt.__all__)) and set(pt.__all__) <= set(dir(pt))
  for name in pt.__all__:
    doc = inspect.getdoc(getattr(pt, name)) or ''
    assert f'pt.{name}' in doc, f'{name}: no example in its docstring'


def test_dir_shows_the_public_names_and_the_version_is_the_installed_one():
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  assert dir(pt) == sorted(pt.__all__ + ['__version__'])  # (Not importlib, sys, types.)
  assert pt.__version__ == metadata.version('pcam_tfdata') and re.fullmatch(
      r'\d+\.\d+\.\d+', pt.__version__)


def test_train_stays_a_function_when_its_commands_module_loads():
  module = importlib.import_module('pcam_tfdata.train')  # (One command's flags a process.)
  assert inspect.ismodule(module) and hasattr(module, 'main')
  assert pt.train is api.train and list(inspect.signature(pt.train).parameters)[:2] == [
      'records_dir', 'model_dir']
  from pcam_tfdata.train import Config, run  # pylint: disable=g-import-not-at-top
  assert callable(run) and Config(records_dir='r', model_dir='m').epochs == 10
  with pytest.raises(AttributeError, match='no attribute'):
    pt.no_such_name  # pylint: disable=pointless-statement


def _without(manifest, keys=_CIRCUMSTANCES):
  """The manifest minus what depends on when and where it was written."""
  if isinstance(manifest, dict):
    return {k: _without(v, keys) for k, v in manifest.items() if k not in keys}
  return manifest


def test_make_records_is_the_command(kaggle_dir, tmp_path):
  manifest = pt.make_records(kaggle_dir, tmp_path / 'api', per_class=20, val_fraction=0.25,
                             show_progress=False, log=lambda _: None)
  proc = run_tool('tools/make_records.py', f'--data_dir={kaggle_dir}',
                  f'--out_dir={tmp_path / "cli"}', '--per_class=20', '--val_fraction=0.25')
  assert proc.returncode == 0, proc.stderr[-2000:]
  written = json.loads((tmp_path / 'cli' / 'manifest.json').read_text())
  assert manifest == json.loads((tmp_path / 'api' / 'manifest.json').read_text())
  # The same records, byte for byte (the shards' checksums are in the manifest).
  assert _without(manifest) == _without(written)
  assert manifest['splits']['train']['label_counts'] == {'0': 15, '1': 15}
  assert manifest['splits']['val']['label_counts'] == {'0': 5, '1': 5}
  # A rerun returns the finished manifest, writing nothing.
  assert pt.make_records(kaggle_dir, tmp_path / 'api', per_class=20, val_fraction=0.25,
                         show_progress=False, log=lambda _: None) == manifest


@pytest.mark.parametrize('options, error, message', [
    ({'crop_size': 33}, plan.ConvertError, r'--crop_size=33: must be even'),
    ({'num_folds': 1}, plan.ConvertError, r'--num_folds=1: must be >= 2'),
    ({'fold': 1, 'val_fraction': 0.3}, plan.ConvertError, r'val is one fold of K'),
    ({'per_class': 1000}, ValueError, r'--per_class=1000'),
    ({'source': 'pcam_h5', 'groups_csv': 'g.csv'}, plan.ConvertError, r'--groups_csv=g.csv'),
    ({'source': 'tiff'}, plan.ConvertError, r'--source=tiff: choose one of kaggle, pcam_h5'),
    ({'per_clas': 10}, TypeError, r'per_clas'),
])
def test_make_records_raises_the_commands_errors_and_writes_nothing(kaggle_dir, tmp_path,
                                                                    options, error, message):
  with pytest.raises(error, match=message):
    pt.make_records(kaggle_dir, tmp_path / 'out', show_progress=False, **options)
  assert not (tmp_path / 'out').exists()
  with pytest.raises(kaggle.SourceError, match='no such data folder'):
    pt.make_records(tmp_path / 'absent', tmp_path / 'out')


_UNGUARDED_SCRIPT = '''
import sys, types
# As after `import keras`: TensorFlow loaded, so the converter spawns its workers.
sys.modules['tensorflow'] = types.ModuleType('tensorflow')
import pcam_tfdata as pt
print('the script ran')
pt.make_synthetic(sys.argv[1] + '/kaggle', num_train=300, num_test=20, workers=2,
                  show_progress=False)
pt.make_records(sys.argv[1] + '/kaggle', sys.argv[1] + '/rec', per_class=0, workers=2,
                show_progress=False)
print('converted')
'''


def test_a_script_without_a_main_guard_converts_with_spawned_workers(tmp_path):
  """Spawned workers re-import the main script; ours must not run its calls again (a hang)."""
  script = tmp_path / 'notebook_export.py'
  script.write_text(_UNGUARDED_SCRIPT)
  proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                        text=True, env=user_env(), timeout=240, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.splitlines() == ['the script ran', 'converted']
  manifest = json.loads((tmp_path / 'rec' / 'manifest.json').read_text())
  assert sum(s['count'] for s in manifest['splits'].values()) == 320


def _fit(records, strategy=None, epochs=3):
  """The notebook way: seeded Keras, the library's datasets, `model.fit`."""
  keras.utils.set_random_seed(0)
  tf.config.experimental.enable_op_determinism()  # (Undone after each test, conftest.)
  with strategy.scope() if strategy else contextlib.nullcontext():
    train = pt.make_dataset(records, 'train', batch_size=8, training=True, augment=True,
                            seed=1)
    val = pt.make_dataset(records, 'val', batch_size=16, training=False)
    model = pt.build_model('baseline', pt.Records.open(records).image_shape)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss='binary_crossentropy',
                  metrics=['accuracy'])
  history = model.fit(train, validation_data=val, epochs=epochs, verbose=0)
  return model, train, history.history


def _first_batch_of_epoch(records, epoch):
  return next(iter(pt.make_dataset(records, 'train', batch_size=8, training=True,
                                   augment=True, seed=1, first_epoch=epoch)))


def test_seeded_fit_twice_gives_identical_weights_over_different_epochs(records):
  first, train, history = _fit(records)
  second, _, _ = _fit(records)
  assert len(history['val_loss']) == 3 and np.isfinite(history['loss']).all()
  for a, b in zip(first.get_weights(), second.get_weights()):
    np.testing.assert_array_equal(a, b)
  # `fit` iterated the dataset once per epoch: 1, 2, 3. The next is epoch 4.
  images, labels = next(iter(train))
  expected_images, expected_labels = _first_batch_of_epoch(records, 4)
  np.testing.assert_array_equal(images, expected_images)
  np.testing.assert_array_equal(labels, expected_labels)


def test_fit_in_mirrored_strategy_scope_with_the_datasets_made_there(records, mirrored):
  model, train, history = _fit(records, mirrored, epochs=2)
  assert len(history['loss']) == 2 and np.isfinite(history['loss'] + history['val_loss']).all()
  # Two different epochs, then the next: 3, or 4 when Keras' `fit` peeks at a
  # batch through an iteration of its own first (it does under a strategy).
  images, _ = next(iter(train))
  assert any(np.array_equal(images, _first_batch_of_epoch(records, e)[0]) for e in (3, 4))
  assert model.predict(next(iter(train))[0], verbose=0).shape == (8, 1)


@pytest.mark.slow  # (11 s; to keep the default tier within 4 minutes from a fresh clone)
def test_train_is_the_command_and_predict_reads_any_split(records, tmp_path):
  settings = dict(epochs=2, batch_size=8, mixed_precision='off',
                  strategy='default', seed=1, progress=False)
  metrics = pt.train(records, tmp_path / 'api', **settings)
  proc = run_tool('-m', 'pcam_tfdata.train', f'--records_dir={records}',
                  f'--model_dir={tmp_path / "cli"}', *[
                      f'--{k}={v}' for k, v in settings.items() if k != 'progress'],
                  '--noprogress', timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  written = json.loads((tmp_path / 'cli' / 'metrics.json').read_text())
  assert _without(metrics) == _without(written) and metrics['epochs_run'] == 2
  models = [keras.models.load_model(tmp_path / run / 'model.keras') for run in ('api', 'cli')]
  for a, b in zip(*(m.get_weights() for m in models)):
    np.testing.assert_array_equal(a, b)
  # pt.predict against the command: tests/test_predict.py. Any split, with its
  # labels; a list of runs is an ensemble (here of one, twice).
  ids, probs, labels = pt.predict([tmp_path / 'api', tmp_path / 'cli'], records, 'val',
                                  with_labels=True, progress=False)
  assert len(ids) == len(probs) == len(labels) == 12 and set(labels) <= {0.0, 1.0}
  with pytest.raises(TypeError, match="unknown option 'epoch'; the options are model, "):
    pt.train(records, tmp_path / 'bad', epoch=3)
  with pytest.raises(ValueError, match='--batch_size=0: must be >= 1'):
    pt.train(records, tmp_path / 'bad', batch_size=0)
  with pytest.raises(ValueError, match='model.keras: no such model'):
    pt.predict(tmp_path / 'absent', records)
  assert not (tmp_path / 'bad').exists()


@pytest.mark.slow
def test_the_readme_python_session_runs_as_written(tmp_path):
  """In a fresh interpreter, as a notebook kernel is (and as a script: no main guard)."""
  text = (ROOT / 'README.md').read_text()
  section = text.split('\n## Python API\n', 1)[1].split('\n## ', 1)[0]
  (tmp_path / 'session.py').write_text(re.search(r'```python\n(.*?)```', section, re.S).group(1))
  proc = subprocess.run([sys.executable, 'session.py'], capture_output=True, text=True,
                        env=user_env(), timeout=600, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Nothing from the interpreter's exit either (a preemption handler's thread
  # once ran its __del__ there: "Exception ignored ... cannot join current thread").
  assert 'Exception ignored' not in proc.stderr and 'Traceback' not in proc.stderr, proc.stderr
  submission = pd.read_csv(tmp_path / 'nb' / 'submission.csv', dtype={'id': str})
  sample = pd.read_csv(tmp_path / 'nb' / 'kaggle' / 'sample_submission.csv', dtype={'id': str})
  assert list(submission['id']) == list(sample['id']) and len(sample) == 100
  assert submission['label'].between(0, 1).all()
  metrics = json.loads((tmp_path / 'nb' / 'run' / 'metrics.json').read_text())
  assert metrics['epochs_run'] >= 1 and metrics['strategy'] == 'default'
  assert "'accuracy':" in proc.stdout  # model.evaluate's dict, printed.
