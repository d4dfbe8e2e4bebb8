"""The PCam HDF5 source: exact round trip (plain and gzipped), splits, bad input."""

import gzip
import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

import pcam_tfdata as pt
from pcam_tfdata.convert import from_h5
from pcam_tfdata.convert import pcam_h5
from pcam_tfdata.training import verify
from pcam_tfdata import records as records_lib
from pcam_tfdata import schema
from conftest import ROOT, error_lines, read_records, run_tool, user_env

# Writing PCam files takes h5py; saying that it is missing does not.
needs_h5py = pytest.mark.skipif(importlib.util.find_spec('h5py') is None,
                                reason='h5py is not installed')

SIZES = {'train': 300, 'valid': 60, 'test': 40}
SLIDES = {'train': [f'train_slide{i}' for i in range(10)], 'valid': ['valid_a', 'valid_b'],
          'test': ['test_a', 'test_b']}


def _write_split(folder, split, count, seed, *, gz, chunked, x_shape=None, x_dtype=np.uint8,
                 y_count=None, labels=None):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 256, x_shape or (count, 96, 96, 3)).astype(x_dtype)
  y = labels if labels is not None else rng.permutation(np.arange(y_count or count) % 2)
  y = np.asarray(y, np.uint8).reshape(-1, 1, 1, 1)
  import h5py  # pylint: disable=g-import-not-at-top
  paths = []
  for part, data in (('x', x), ('y', y)):
    path = folder / f'camelyonpatch_level_2_split_{split}_{part}.h5'
    with h5py.File(path, 'w') as f:
      f.create_dataset(part, data=data, chunks=(16,) + data.shape[1:] if chunked else None)
    if gz:
      with open(path, 'rb') as src, gzip.open(str(path) + '.gz', 'wb') as dst:
        shutil.copyfileobj(src, dst)
      os.remove(path)
      path = folder / (path.name + '.gz')
    paths.append(path)
  slides = SLIDES[split]
  pd.DataFrame({'coord_y': 0, 'coord_x': 0, 'tumor_patch': y.reshape(-1) > 0,
                'center_tumor_patch': y.reshape(-1) > 0,
                'wsi': [slides[i % len(slides)] for i in range(len(y))]}).to_csv(
                    folder / f'camelyonpatch_level_2_split_{split}_meta.csv', index=False)
  return x, y.reshape(-1)


def _make(folder, gz, chunked=False):
  folder.mkdir(parents=True, exist_ok=True)
  return {s: _write_split(folder, s, n, i, gz=gz, chunked=chunked)
          for i, (s, n) in enumerate(SIZES.items())}


def _read_all(out_dir):
  return schema.load_manifest(str(out_dir)), read_records(out_dir)


def _convert(data_dir, out_dir, **kwargs):
  source = pcam_h5.read_source(str(data_dir))
  return from_h5.convert(source, str(out_dir), show_progress=False, log=lambda _: None,
                            **kwargs)


@needs_h5py
@pytest.mark.parametrize('gz, chunked', [(False, False), (True, True), (True, False)])
def test_round_trip_keeps_pcam_splits(tmp_path, gz, chunked):
  arrays = _make(tmp_path / 'pcam', gz, chunked)
  manifest = _convert(tmp_path / 'pcam', tmp_path / 'rec')
  _, got = _read_all(tmp_path / 'rec')
  ours = {'train': 'train', 'valid': 'val', 'test': 'test'}
  assert len(got) == sum(SIZES.values())
  for pcam, (x, y) in arrays.items():
    for i in range(len(y)):
      split, label, image = got[pcam_h5.example_id(pcam, i)]
      assert split == ours[pcam] and label == y[i]
      assert image == x[i, 32:64, 32:64].tobytes()
  assert {s: manifest['splits'][s]['count'] for s in manifest['splits']} == {
      'train': 300, 'val': 60, 'test': 40}
  assert manifest['splits']['train']['slides'] == 10
  assert manifest['splits']['test']['label_counts'] == {'0': 20, '1': 20}  # Labels kept.


@needs_h5py
def test_shards_mix_classes_and_verify(tmp_path):
  _make(tmp_path / 'pcam', gz=True)
  _convert(tmp_path / 'pcam', tmp_path / 'rec', num_shards=4)
  manifest = schema.load_manifest(str(tmp_path / 'rec'))
  assert [s['count'] for s in manifest['splits']['train']['shards']] == [75, 75, 75, 75]
  for shard in records_lib.Records.open(tmp_path / 'rec').shard_paths('train'):
    parsed = [tf.io.parse_single_example(r, schema.feature_spec())
              for r in tf.data.TFRecordDataset(shard)]
    index = [int(p['id'].numpy().decode().rsplit('-', 1)[1]) for p in parsed]
    assert {int(p['label']) for p in parsed} == {0, 1}  # Mixed classes,
    assert min(index) < 50 and max(index) > 250  # from the whole file.
  assert verify.verify(str(tmp_path / 'rec'), log=lambda _: None) == sum(SIZES.values())


@needs_h5py
def test_pcam_splits_stand_unless_per_class_or_val_fraction_is_given(tmp_path):
  """Through pt.make_records, the command's options: either one asks for a re-split."""
  _make(tmp_path / 'pcam', gz=False)
  make = lambda out, **kw: pt.make_records(tmp_path / 'pcam', tmp_path / out, source='pcam_h5',
                                           show_progress=False, log=lambda _: None, **kw)
  counts = lambda m: {s: m['splits'][s]['count'] for s in m['splits']}
  assert counts(make('own')) == {'train': 300, 'val': 60, 'test': 40}  # PCam's own.
  resplit = make('val_fraction', val_fraction=0.5)  # train and valid pooled, then halved.
  assert counts(resplit) == {'train': 180, 'val': 180, 'test': 40}
  balanced = counts(make('per_class', per_class=100))  # 100 a class, split by whole slides.
  assert balanced['train'] + balanced['val'] == 200 and balanced['test'] == 40


@needs_h5py
def test_resplit_is_balanced_and_slide_disjoint(tmp_path):
  _make(tmp_path / 'pcam', gz=False)
  manifest = _convert(tmp_path / 'pcam', tmp_path / 'rec', resplit=True, per_class=150,
                      val_fraction=0.25)
  _, got = _read_all(tmp_path / 'rec')
  meta = pd.concat([pd.read_csv(tmp_path / 'pcam' / f'camelyonpatch_level_2_split_{s}_meta.csv')
                    .assign(id=[pcam_h5.example_id(s, i) for i in range(SIZES[s])])
                    for s in ('train', 'valid')])
  slide = dict(zip(meta['id'], meta['wsi']))
  train = {slide[i] for i, v in got.items() if v[0] == 'train'}
  val = {slide[i] for i, v in got.items() if v[0] == 'val'}
  assert train and val and not train & val
  counts = manifest['splits']
  assert int(counts['train']['label_counts']['0']) + int(counts['val']['label_counts']['0']) == 150
  assert int(counts['train']['label_counts']['1']) + int(counts['val']['label_counts']['1']) == 150
  assert counts['test']['count'] == 40


def _bad(kind, folder):
  folder.mkdir()
  if kind == 'missing_y':
    _write_split(folder, 'train', 20, 0, gz=False, chunked=False)
    os.remove(folder / 'camelyonpatch_level_2_split_train_y.h5')
    return 'camelyonpatch_level_2_split_train_x.h5: no matching camelyonpatch_level_2_split_train_y.h5'
  if kind == 'lengths_differ':
    _write_split(folder, 'train', 20, 0, gz=False, chunked=False, y_count=18)
    return 'camelyonpatch_level_2_split_train_y.h5: 18 labels but'
  if kind == 'wrong_shape':
    _write_split(folder, 'train', 20, 0, gz=False, chunked=False, x_shape=(20, 64, 64, 3))
    return 'camelyonpatch_level_2_split_train_x.h5: x is uint8 [20, 64, 64, 3]'
  if kind == 'wrong_dtype':
    _write_split(folder, 'train', 20, 0, gz=False, chunked=False, x_dtype=np.float32)
    return 'camelyonpatch_level_2_split_train_x.h5: x is float32'
  if kind == 'label_2':
    _write_split(folder, 'train', 20, 0, gz=False, chunked=False, labels=[0] * 19 + [2])
    return 'camelyonpatch_level_2_split_train_y.h5: label 2 at index 19 is not 0 or 1'
  if kind == 'truncated_gzip':
    _write_split(folder, 'train', 200, 0, gz=True, chunked=False)
    path = folder / 'camelyonpatch_level_2_split_train_x.h5.gz'
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    return 'camelyonpatch_level_2_split_train_x.h5.gz: '
  if kind == 'no_files':
    return 'no camelyonpatch_level_2_split_{train,valid,test}_x.h5[.gz] files'
  raise ValueError(kind)


@needs_h5py
@pytest.mark.parametrize('kind', ['missing_y', 'lengths_differ', 'wrong_shape', 'wrong_dtype',
                                  'label_2', 'truncated_gzip', 'no_files'])
def test_bad_input_fails_with_one_line(tmp_path, kind):
  message = _bad(kind, tmp_path / 'pcam')
  out = tmp_path / 'out'
  proc = run_tool('tools/make_records.py', '--source=pcam_h5', f'--data_dir={tmp_path / "pcam"}',
                  f'--out_dir={out}')
  assert proc.returncode == 1
  errors = error_lines(proc.stderr)
  assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
  assert not out.exists()


def test_without_h5py_the_tool_says_what_to_install(tmp_path):
  """Runs on every machine: h5py is hidden from the tool, installed or not."""
  hide = ("import runpy, sys; sys.modules['h5py'] = None; sys.argv = sys.argv[1:]; "
          "runpy.run_path(sys.argv[0], run_name='__main__')")
  (tmp_path / 'pcam').mkdir()
  proc = subprocess.run([sys.executable, '-c', hide, 'tools/make_records.py', '--source=pcam_h5',
                         f'--data_dir={tmp_path / "pcam"}', f'--out_dir={tmp_path / "out"}'],
                        cwd=ROOT, capture_output=True, text=True, env=user_env(), timeout=300)
  assert proc.returncode == 1
  assert error_lines(proc.stderr) == [
      "make_records.py: error: --source=pcam_h5 needs h5py: pip install -e '.[h5]'"], proc.stderr
  assert not (tmp_path / 'out').exists()
