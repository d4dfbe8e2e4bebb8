"""Test-split predictions, TTA, fold ensembles and the Kaggle submission (`predict`)."""

import json
import re
import shutil
import zipfile

import keras
import numpy as np
import pandas as pd
import pytest

import pcam_tfdata as pt
from pcam_tfdata.convert import tiff
from pcam_tfdata.training import augment
from pcam_tfdata.training import evaluate
from pcam_tfdata.training import models
from pcam_tfdata.training import submission
from pcam_tfdata.training import verify
from conftest import cut_after_first_record, error_lines, flip_a_byte, read_records
from conftest import run_in_terminal, run_tool


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


def _crops(kaggle_dir, folder='test'):
  """{id: center crop} of every patch in kaggle_dir/folder."""
  return {p.stem: tiff.read_patch(str(p))[32:64, 32:64]
          for p in (kaggle_dir / folder).iterdir()}


@pytest.mark.parametrize('tta', [False, True])
def test_each_test_id_gets_its_own_probability(records, kaggle_dir, tmp_path, tta):
  model, weights = _linear_model()
  ids, probs = submission.predict_test(model, str(records), batch_size=4, tta=tta)
  crops = _crops(kaggle_dir)
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
  crops = _crops(kaggle_dir)
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


def _save(model, model_dir):
  model_dir.mkdir()
  model.save(model_dir / 'model.keras')
  return model_dir


def test_predict_cli_writes_each_ids_probability(records, kaggle_dir, tmp_path):
  model, weights = _linear_model(seed=2)
  model_dir = _save(model, tmp_path / 'run')
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
  crops = _crops(kaggle_dir)
  for example_id, label in zip(written['id'], written['label']):
    # The CSV keeps 6 decimals.
    assert label == pytest.approx(_expected_probability(weights, crops[example_id], True),
                                  abs=2e-6), example_id
  # The library's call is the command: the same probabilities (in the records' order).
  ids, probs = pt.predict(model_dir, records, tta=True, batch_size=4, progress=False)
  assert sorted(ids) == sorted(written['id'])
  np.testing.assert_allclose(probs, written.set_index('id').loc[ids, 'label'], atol=1e-6)

  proc = run_tool('-m', 'pcam_tfdata.predict', f'--model_dir={tmp_path / "absent"}',
                  f'--records_dir={records}', f'--output={tmp_path / "x.csv"}', timeout=300)
  assert proc.returncode == 1 and 'model.keras: no such model' in proc.stderr
  assert not (tmp_path / 'x.csv').exists()


def test_an_ensemble_predicts_the_mean_of_each_models_own_and_its_metrics_on_labels(
    records, kaggle_dir, tmp_path):
  """Two runs on a labelled test split (as PCam's HDF5 source writes: here the val split)."""
  copy = tmp_path / 'rec'
  shutil.copytree(records, copy)
  manifest = json.loads((copy / 'manifest.json').read_text())
  manifest['splits']['test'] = manifest['splits']['val']
  (copy / 'manifest.json').write_text(json.dumps(manifest))
  pairs = [_linear_model(seed=10 + fold) for fold in range(2)]
  dirs = [_save(model, tmp_path / f'fold{fold}') for fold, (model, _) in enumerate(pairs)]
  out = tmp_path / 'ensemble.csv'
  proc = run_tool('-m', 'pcam_tfdata.predict', f'--model_dir={dirs[0]},{dirs[1]}',
                  f'--records_dir={copy}', f'--output={out}', '--tta', '--noprogress')
  assert proc.returncode == 0, proc.stderr[-2000:]
  written = pd.read_csv(out, dtype={'id': str})
  crops = _crops(kaggle_dir, 'train')
  val_ids = sorted(i for i, (split, _, _) in read_records(records).items() if split == 'val')
  assert sorted(written['id']) == val_ids and val_ids  # Every id of the split, once.
  for example_id, label in zip(written['id'], written['label']):
    own = [_expected_probability(w, crops[example_id], True) for _, w in pairs]
    assert own[0] != pytest.approx(own[1], abs=1e-4)  # Two models that disagree,
    assert label == pytest.approx(np.mean(own), abs=2e-6), example_id  # averaged.
  _, probs, labels = submission.predict_split([m for m, _ in pairs], str(copy), 'test',
                                              tta=True)
  expected = evaluate.binary_metrics(labels, probs)
  line = next(l for l in proc.stdout.splitlines() if l.startswith('test split (2 models, TTA)'))
  assert f'auc={expected["auc"]:.4f}' in line and f'accuracy={expected["accuracy"]:.4f}' in line


def test_an_ensemble_member_of_another_image_shape_is_refused(records, tmp_path):
  a = _save(_linear_model()[0], tmp_path / 'a')
  b = _save(models.build_model('baseline', (48, 48, 3)), tmp_path / 'b')
  with pytest.raises(ValueError) as e:
    submission.load_models([str(a), str(b)], (32, 32, 3), str(records))
  assert str(e.value) == (f'{b / "model.keras"}: trained on images of [48, 48, 3], but '
                          f'{records} holds [32, 32, 3]')


def test_a_damaged_or_unreadable_model_is_named(tmp_path):
  path = tmp_path / 'run' / 'model.keras'
  path.parent.mkdir()
  path.write_bytes(b'not a zip')  # Keras itself calls this "File not found".
  with pytest.raises(ValueError, match=re.escape(f'{path}: damaged model file (not the zip')):
    submission.load_models([str(path.parent)], (32, 32, 3), 'records')
  with zipfile.ZipFile(path, 'w') as z:  # A zip, but no Keras model in it.
    z.writestr('other.txt', 'x')
  with pytest.raises(ValueError, match=re.escape(f'{path}: unreadable model (')):
    submission.load_models([str(path.parent)], (32, 32, 3), 'records')


def test_an_empty_ensemble_entry_is_refused(records, tmp_path):
  _save(_linear_model()[0], tmp_path / 'a')
  _linear_model()[0].save(tmp_path / 'model.keras')  # What 'a,' would pick up from the cwd.
  proc = run_tool('-m', 'pcam_tfdata.predict', f'--model_dir={tmp_path / "a"},',
                  f'--records_dir={records}', f'--output={tmp_path / "x.csv"}', cwd=tmp_path)
  assert proc.returncode == 1
  assert error_lines(proc.stderr) == [
      f'predict: error: --model_dir={tmp_path / "a"},: an empty entry'], proc.stderr[-2000:]
  assert not (tmp_path / 'x.csv').exists()


def test_a_damaged_test_shard_is_one_line_naming_it_in_predict(records, tmp_path):
  copy, shard = flip_a_byte(records, tmp_path, 'test')
  model_dir = _save(_linear_model()[0], tmp_path / 'run')
  proc = run_tool('-m', 'pcam_tfdata.predict', f'--model_dir={model_dir}',
                  f'--records_dir={copy}', f'--output={tmp_path / "sub.csv"}')
  assert proc.returncode == 1  # Not a short submission.
  errors = error_lines(proc.stderr)
  assert len(errors) == 1 and str(shard) in errors[0], proc.stderr[-3000:]
  assert not (tmp_path / 'sub.csv').exists()


def test_a_test_shard_cut_at_a_record_boundary_gives_no_short_submission(records, tmp_path):
  copy, shard = cut_after_first_record(records, tmp_path, 'test')
  with pytest.raises(verify.CorruptShardError, match=re.escape(f'{shard}: corrupt or truncated')):
    submission.predict_split(_linear_model()[0], str(copy), 'test')
