"""tools/make_records.py on bad input: one line naming the file, row or flag; exit 1; no output."""

import importlib.util
import json
import os
import re

import numpy as np
import pandas as pd
from PIL import Image
import pytest

from pcam_tfdata.convert import synthetic
from pcam_tfdata.training import verify as verify_lib
from conftest import ROOT, error_lines, run_tool

TOOL = 'tools/make_records.py'


def _ids(data_dir):
  return pd.read_csv(data_dir / 'train_labels.csv', dtype=str)['id'].tolist()


def _edit_csv(data_dir, fn):
  frame = pd.read_csv(data_dir / 'train_labels.csv', dtype=str)
  fn(frame).to_csv(data_dir / 'train_labels.csv', index=False)


def _save(data_dir, example_id, array, **kwargs):
  Image.fromarray(array).save(data_dir / 'train' / f'{example_id}.tif', format='TIFF', **kwargs)


def _patch():
  return synthetic.make_patch(np.random.default_rng(0), 0)


def _break(kind, d):
  """Breaks the Kaggle copy `d`; returns (extra flags, text the error must hold)."""
  victim = _ids(d)[7]
  tif = d / 'train' / f'{victim}.tif'
  if kind == 'no_data_dir':
    return ['--data_dir=' + str(d / 'absent')], 'absent: no such data folder'
  if kind == 'no_csv':
    os.remove(d / 'train_labels.csv')
    return [], 'train_labels.csv: no such file'
  if kind == 'no_label_column':
    _edit_csv(d, lambda f: f.rename(columns={'label': 'target'}))
    return [], "train_labels.csv: no column 'label'"
  if kind == 'label_2':
    _edit_csv(d, lambda f: f.assign(label=['2' if i == 7 else l for i, l in enumerate(f.label)]))
    return [], f"train_labels.csv line 9: label '2' for id {victim}"
  if kind == 'duplicate_id':
    _edit_csv(d, lambda f: pd.concat([f, f.iloc[[7]]]))
    return [], f'train_labels.csv line 62: duplicate id {victim} (first at line 9)'
  if kind == 'id_without_file':
    os.remove(tif)
    return [], f'train_labels.csv line 9: id {victim} has no file'
  if kind == 'zero_bytes':
    tif.write_bytes(b'')
    return [], f'{victim}.tif: empty file'
  if kind == 'zero_bytes_two_workers':
    tif.write_bytes(b'')
    return ['--workers=2'], f'{victim}.tif: empty file'
  if kind == 'truncated':
    tif.write_bytes(tif.read_bytes()[:9000])
    return [], f'{victim}.tif: unreadable or truncated'
  if kind == 'not_an_image':
    tif.write_text('hello')
    return [], f'{victim}.tif: not an image'
  if kind == 'not_96x96':
    _save(d, victim, _patch()[:64, :64])
    return [], f'{victim}.tif: 64x64 patch, expected 96x96'
  if kind == 'grayscale':
    _save(d, victim, _patch()[..., 0])
    return [], f'{victim}.tif: L pixels'
  if kind == 'rgba':
    _save(d, victim, np.dstack([_patch(), _patch()[..., :1]]))
    return [], f'{victim}.tif: RGBA pixels'
  if kind == 'sixteen_bit':
    import tifffile  # pylint: disable=g-import-not-at-top
    tifffile.imwrite(tif, _patch().astype(np.uint16) * 257, photometric='rgb')
    return [], f'{victim}.tif: 16/16/16-bit samples'
  if kind == 'per_class_too_large':
    return ['--per_class=30'], ('--per_class=30 but class 1 holds only 24 examples: '
                                '--per_class=24 is the most both classes hold, --per_class=0 '
                                'keeps every example (unbalanced)')
  flag, message = {
      'crop_odd': ('--crop_size=33', '--crop_size=33: must be even'),
      'crop_too_big': ('--crop_size=98', '--crop_size=98: must be even, 2..96'),
      'val_fraction_zero': ('--val_fraction=0', '--val_fraction=0.0: must be strictly between'),
      'val_fraction_big': ('--val_fraction=1.5', '--val_fraction=1.5: must be strictly between'),
      'num_shards_negative': ('--num_shards=-1', '--num_shards=-1: must be >= 0'),
      'num_shards_too_many': ('--num_shards=500', '--num_shards=500 but the train split'),
      'workers_zero': ('--workers=0', '--workers=0: must be >= 1'),
      'per_class_negative': ('--per_class=-3', '--per_class=-3: must be >= 0'),
      'not_a_number': ('--crop_size=big', 'crop_size'),
      'unknown_flag': ('--crop=32', 'crop'),
      'groups_missing_id': ('--groups_csv=GROUPS', 'groups.csv: no group for id'),
      'folds_with_val_fraction': ('--num_folds=5 --val_fraction=0.3',
                                  '--val_fraction=0.3 with --num_folds=5: val is one fold'),
      'one_fold': ('--num_folds=1', '--num_folds=1: must be >= 2'),
      'fold_without_folds': ('--num_folds=0 --fold=1', '--num_folds=0: must be >= 2'),
      'fold_outside': ('--num_folds=3 --fold=3', '--fold=3: must be in 0..2 (--num_folds=3)'),
      'groups_other_header': ('--groups_csv=GROUPS', 'groups.csv: no group column (expected id '
                              'and one of group, wsi, slide, centre, center; columns: id, patient)'),
  }[kind]
  if kind == 'groups_missing_id':
    pd.DataFrame({'id': _ids(d)[:10], 'group': 'a'}).to_csv(d / 'groups.csv', index=False)
    flag = f'--groups_csv={d / "groups.csv"}'
  if kind == 'groups_other_header':
    pd.DataFrame({'id': _ids(d), 'patient': 'a'}).to_csv(d / 'groups.csv', index=False)
    flag = f'--groups_csv={d / "groups.csv"}'
  return flag.split(), message


CASES = ['no_data_dir', 'no_csv', 'no_label_column', 'label_2', 'duplicate_id',
         'id_without_file', 'zero_bytes', 'zero_bytes_two_workers', 'truncated', 'not_an_image',
         'not_96x96', 'grayscale', 'rgba',
         # Pillow cannot write 16-bit RGB; only this case needs tifffile.
         pytest.param('sixteen_bit', marks=pytest.mark.skipif(
             importlib.util.find_spec('tifffile') is None, reason='tifffile is not installed')),
         'per_class_too_large', 'crop_odd',
         'crop_too_big', 'val_fraction_zero', 'val_fraction_big', 'num_shards_negative',
         'num_shards_too_many', 'workers_zero', 'per_class_negative', 'not_a_number',
         'unknown_flag', 'groups_missing_id', 'groups_other_header', 'folds_with_val_fraction',
         'one_fold', 'fold_outside', 'fold_without_folds']


@pytest.mark.parametrize('kind', CASES)
def test_bad_input_fails_with_one_line(kind, kaggle_copy, tmp_path):
  flags, message = _break(kind, kaggle_copy)
  out = tmp_path / 'out'
  proc = run_tool(TOOL, f'--data_dir={kaggle_copy}', f'--out_dir={out}', '--per_class=0',
                  '--workers=1', *flags)
  assert proc.returncode != 0
  errors = error_lines(proc.stderr)
  assert len(errors) == 1, proc.stderr
  assert message in errors[0], proc.stderr
  assert not out.exists()
  # No hidden folder that a reader could take for a finished conversion.
  for hidden in tmp_path.glob('.out.partial-*'):
    assert not (hidden / 'manifest.json').exists()


def test_skip_bad_accounts_for_every_input(kaggle_copy, tmp_path):
  ids = _ids(kaggle_copy)
  (kaggle_copy / 'train' / f'{ids[1]}.tif').write_bytes(b'')
  _save(kaggle_copy, ids[2], _patch()[..., 0])
  os.remove(kaggle_copy / 'train' / f'{ids[3]}.tif')
  test_victim = sorted(os.listdir(kaggle_copy / 'test'))[0]
  (kaggle_copy / 'test' / test_victim).write_bytes(b'II*\x00junk')
  _save(kaggle_copy, 'f' * 40, _patch())  # A file with no CSV row.
  out = tmp_path / 'out'
  proc = run_tool(TOOL, f'--data_dir={kaggle_copy}', f'--out_dir={out}', '--per_class=0',
                  '--skip_bad', '--workers=2')
  assert proc.returncode == 0, proc.stderr
  assert '1 files in train/ have no row' in proc.stdout
  manifest = json.loads((out / 'manifest.json').read_text())
  skipped = {s['id']: s for s in manifest['skipped']}
  assert set(skipped) == {ids[1], ids[2], ids[3], test_victim[:-4]}
  assert skipped[ids[3]]['split'] is None and 'no file' in skipped[ids[3]]['reason']
  assert 'empty file' in skipped[ids[1]]['reason']
  assert 'L pixels' in skipped[ids[2]]['reason']
  splits = manifest['splits']
  assert splits['train']['count'] + splits['val']['count'] + splits['train']['skipped'] \
      + splits['val']['skipped'] + 1 == len(ids)
  assert splits['test']['count'] + splits['test']['skipped'] == 10
  assert manifest['source']['unlabelled_files'] == {'count': 1, 'first': ['f' * 40 + '.tif']}


def test_demo_default_is_balanced_and_verifies(kaggle_dir, tmp_path):
  """No --data_dir: the demo folder (made once) is converted, balanced to the smaller class."""
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(kaggle_dir, tmp_path / 'records' / 'demo_kaggle')
  proc = run_tool(os.path.join(ROOT, TOOL), '--workers=1', cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  out = tmp_path / 'records' / 'demo'
  manifest = json.loads((out / 'manifest.json').read_text())
  total = {'0': 0, '1': 0}
  for split in ('train', 'val'):
    for label, n in manifest['splits'][split]['label_counts'].items():
      total[label] += n
  assert total == {'0': 24, '1': 24}

  assert verify_lib.verify(str(out), log=lambda _: None) == 58

  shard = out / manifest['splits']['val']['shards'][0]['file']
  data = bytearray(shard.read_bytes())
  data[100] ^= 1
  shard.write_bytes(bytes(data))
  with pytest.raises(verify_lib.VerifyError, match=re.escape(f'{shard}: sha256 differs')):
    verify_lib.verify(str(out), log=lambda _: None)
