"""Pixel-identical patches: found exactly, counted in the manifest, kept off both sides."""

import collections
import hashlib
import importlib.util
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pcam_tfdata.convert import duplicates
from pcam_tfdata.convert import kaggle
from pcam_tfdata.convert import synthetic
from pcam_tfdata.convert import tiff
from pcam_tfdata.training import verify
from pcam_tfdata import schema
from conftest import error_lines, read_records, run_convert, run_tool


def test_groups_are_exactly_the_identical_patches():
  rng = np.random.default_rng(0)
  patches = [rng.integers(0, 256, (96, 96, 3), dtype=np.uint8) for _ in range(6)]
  patches[3] = patches[0].copy()
  patches[5] = patches[0].copy()
  # 1 and 2 share a key but not their pixels (a CRC collision, forced); 4 is
  # unreadable (NO_KEY), like 2 with an equal key would be.
  keys = [7, 9, 9, 7, duplicates.NO_KEY, 7]
  read = []
  def read_patches(indices):  # In any order (here reversed), as a stream.
    read.extend(indices.tolist())
    return ((i, patches[i]) for i in indices[::-1])
  groups = duplicates.find_groups(keys, read_patches)
  assert [g.tolist() for g in groups] == [[0, 3, 5]]
  assert read == [0, 1, 2, 3, 5]  # Only candidates are read again, never NO_KEY.
  assert duplicates.find_groups([1, 2, 3], read_patches) == [] and read[-1] == 5


def test_drop_plan_keeps_the_fixed_then_the_best_ranked():
  groups = [np.array([0, 2, 4]), np.array([1, 3]), np.array([5, 6, 7])]
  rank = np.array([1, 0, 0, 0, 0, 0, 0, 0])
  fixed = np.array([False, False, False, False, False, False, True, True])
  dropped, same_as = duplicates.drop_plan(groups, rank, fixed)
  # Group 1: 2 ranks before 0 (then lowest index); group 2: 1; group 3: 6 and 7 stay.
  assert dropped.tolist() == [0, 3, 4, 5]
  assert same_as.tolist() == [2, 1, 2, 6]


def test_patch_key_is_of_the_pixels_in_c_order():
  a = np.arange(96 * 96 * 3, dtype=np.uint8).reshape(96, 96, 3)
  assert duplicates.patch_key(np.asfortranarray(a)) == duplicates.patch_key(a)
  assert duplicates.patch_key(a.transpose(1, 0, 2)) != duplicates.patch_key(a)


def _plant(kaggle_dir):
  """Copies of patches under new ids, in other TIFF layouts; returns the planted groups.

  Returns: {new id: the id whose pixels it copies}, and the labels written.
  """
  labels = pd.read_csv(kaggle_dir / kaggle.LABELS_CSV)
  ids = sorted(labels['id'])
  label_of = dict(zip(labels['id'], labels['label']))
  test_id = sorted(p.stem for p in (kaggle_dir / 'test').glob('*.tif'))[0]
  plan = [  # (new id, copy of, label, layout)
      ('f' * 40, ids[5], label_of[ids[5]], 'lzw'),       # Same label, other layout.
      ('e' * 40, ids[5], 1 - label_of[ids[5]], 'raw'),   # Conflicting label.
      ('d' * 40, ids[9], label_of[ids[9]], 'deflate'),
      ('c' * 40, test_id, 0, 'raw'),                     # A labelled copy of a test patch.
  ]
  rows = []
  for new, original, label, layout in plan:
    folder = 'test' if original == test_id else 'train'
    pixels = tiff.read_patch(str(kaggle_dir / folder / f'{original}.tif'))
    path = kaggle_dir / 'train' / f'{new}.tif'
    if layout == 'raw':
      synthetic.write_tiff(str(path), pixels)
    else:
      Image.fromarray(pixels).save(path, compression={'lzw': 'tiff_lzw',
                                                      'deflate': 'tiff_adobe_deflate'}[layout])
    rows.append({'id': new, 'label': label})
  pd.concat([labels, pd.DataFrame(rows)]).to_csv(kaggle_dir / kaggle.LABELS_CSV, index=False)
  return {new: original for new, original, _, _ in plan}, test_id


def _stored(records_dir):
  """{id: (split, image bytes)} of every record."""
  return {i: (split, image) for i, (split, _, image) in read_records(records_dir).items()}


def test_planted_duplicates_are_counted(kaggle_copy, tmp_path):
  copies, test_id = _plant(kaggle_copy)
  manifest = run_convert(kaggle_copy, tmp_path / 'rec', crop_size=96, workers=2)
  info = manifest['duplicates']
  stored = _stored(tmp_path / 'rec')
  assert len(stored) == 74  # 64 labelled, 10 test: counting drops nothing.
  expected = collections.defaultdict(set)
  for new, original in copies.items():
    expected[original].update({new, original})
  assert info['groups'] == 3 and info['patches'] == 7
  assert sorted(sorted(g['ids']) for g in info['first']) == sorted(sorted(g) for g in
                                                                    expected.values())
  for group in info['first']:
    assert group['splits'] == [stored[i][0] for i in group['ids']]
    assert len({stored[i][1] for i in group['ids']}) == 1  # The same full patch.
  conflicted = [g for g in info['first'] if not g['labels_agree']]
  assert len(conflicted) == 1 == info['label_conflicts'] and 'e' * 40 in conflicted[0]['ids']
  test_group = next(g for g in info['first'] if test_id in g['ids'])
  assert test_group['labels_agree'] and sorted(test_group['labels']) == [schema.TEST_LABEL, 0]
  # Each group is counted within its one split or across every pair it spans.
  within, across = collections.Counter(), collections.Counter()
  for group in info['first']:
    names = sorted(set(group['splits']), key=schema.split_rank)
    within.update(names if len(names) == 1 else [])
    across.update(f'{a}/{b}' for i, a in enumerate(names) for b in names[i + 1:])
  assert info['within'] == dict(within) and info['across'] == dict(across)
  assert 'test' in ''.join(info['across'])  # The test copy always crosses.


def test_drop_duplicates_keeps_one_per_group_off_both_sides(kaggle_copy, tmp_path):
  copies, test_id = _plant(kaggle_copy)
  manifest = run_convert(kaggle_copy, tmp_path / 'rec', crop_size=96, drop_duplicates=True,
                         workers=2)
  stored = _stored(tmp_path / 'rec')
  dropped = manifest['duplicates']['dropped']
  # The smallest id of each labelled group stays; a copy of a test patch goes.
  assert {d['id']: d['same_as'] for d in dropped['ids']} == copies
  assert dropped['count'] == 4 and dropped['groups'] == 3 and dropped['label_conflicts'] == 1
  assert set(stored) == {i for i in _all_ids(kaggle_copy)} - set(copies)
  assert test_id in stored
  by_pixels = collections.defaultdict(set)
  for split, image in stored.values():
    by_pixels[hashlib.sha256(image).digest()].add(split)
  assert all(len(s) == 1 for s in by_pixels.values())
  assert len(by_pixels) == len(stored)  # One patch per pixel content.
  assert manifest['duplicates']['groups'] == 0
  assert manifest['settings']['drop_duplicates'] is True


def _all_ids(kaggle_dir):
  return (set(pd.read_csv(kaggle_dir / kaggle.LABELS_CSV)['id']) |
          {p.stem for p in (kaggle_dir / 'test').glob('*.tif')})


def test_dropped_duplicates_and_folds_still_partition(kaggle_copy, tmp_path):
  copies, _ = _plant(kaggle_copy)
  vals = []
  for fold in range(3):
    run_convert(kaggle_copy, tmp_path / f'fold{fold}', drop_duplicates=True, num_folds=3,
                fold=fold)
    stored = _stored(tmp_path / f'fold{fold}')
    vals.append({i for i, (split, _) in stored.items() if split == 'val'})
  labelled = set(pd.read_csv(kaggle_copy / kaggle.LABELS_CSV)['id']) - set(copies)
  assert sorted(i for v in vals for i in v) == sorted(labelled)


def test_settings_name_drop_duplicates_only_when_on(kaggle_dir, tmp_path):
  first = run_convert(kaggle_dir, tmp_path / 'a')
  second = run_convert(kaggle_dir, tmp_path / 'b', drop_duplicates=True)
  assert 'drop_duplicates' not in first['settings']
  assert first['fingerprint'] != second['fingerprint']
  assert second['duplicates']['dropped']['count'] == 0


def test_verify_reports_cross_split_duplicates(kaggle_copy, tmp_path):
  _plant(kaggle_copy)
  groups = run_convert(kaggle_copy, tmp_path / 'rec')['duplicates']['first']
  across = [g for g in groups if len(set(g['splits'])) > 1]
  assert across  # The copy of a test patch, at least.
  proc = run_tool('tools/verify_records.py', str(tmp_path / 'rec'))
  assert proc.returncode == 0, proc.stderr
  line = next(l for l in proc.stdout.splitlines() if l.startswith('cross-split duplicates'))
  assert line.startswith(f'cross-split duplicates: {len(across)} groups of identical stored '
                         '32x32 crops in more than one split'), line
  first = min(across, key=lambda g: min(g['ids']))
  assert f'e.g. {min(first["ids"])} (' in line, line
  run_convert(kaggle_copy, tmp_path / 'clean', drop_duplicates=True)
  lines = []
  verify.verify(str(tmp_path / 'clean'), log=lines.append)
  assert lines[-1] == 'cross-split duplicates: none (no identical stored 32x32 crops in two splits)'



def test_make_records_prints_one_duplicates_line(kaggle_copy, tmp_path):
  _plant(kaggle_copy)
  proc = run_tool('tools/make_records.py', f'--data_dir={kaggle_copy}', f'--out_dir={tmp_path / "r"}',
                  '--per_class=0', '--workers=1')
  assert proc.returncode == 0, proc.stderr
  lines = [l for l in proc.stdout.splitlines() if l.startswith('duplicates:')]
  assert len(lines) == 1 and '3 groups of pixel-identical patches (7 patches' in lines[0]
  assert '1 with conflicting labels' in lines[0]


def test_drop_duplicates_names_an_unreadable_patch(kaggle_copy, tmp_path):
  victim = sorted((kaggle_copy / 'train').glob('*.tif'))[7]
  victim.write_bytes(b'not a tiff')
  out = tmp_path / 'r'
  # The scan reads every patch, also those balancing would leave out.
  proc = run_tool('tools/make_records.py', f'--data_dir={kaggle_copy}', f'--out_dir={out}',
                  '--per_class=1', '--drop_duplicates', '--workers=2')
  assert proc.returncode == 1
  lines = error_lines(proc.stderr)
  assert len(lines) == 1 and str(victim) in lines[0], proc.stderr
  assert not out.exists()
  proc = run_tool('tools/make_records.py', f'--data_dir={kaggle_copy}', f'--out_dir={out}',
                  '--per_class=0', '--drop_duplicates', '--skip_bad', '--workers=2')
  assert proc.returncode == 0, proc.stderr
  manifest = json.loads((out / schema.MANIFEST_NAME).read_text())
  assert [s['id'] for s in manifest['skipped']] == [victim.stem]


needs_h5py = pytest.mark.skipif(importlib.util.find_spec('h5py') is None,
                                reason='h5py is not installed')


def _write_h5(folder, split, x, y):
  import h5py  # pylint: disable=g-import-not-at-top
  for part, data in (('x', x), ('y', np.asarray(y, np.uint8).reshape(-1, 1, 1, 1))):
    with h5py.File(folder / f'camelyonpatch_level_2_split_{split}_{part}.h5', 'w') as f:
      f.create_dataset(part, data=data)


@needs_h5py
@pytest.mark.parametrize('resplit', [False, True])
def test_h5_duplicates_are_counted_and_dropped(tmp_path, resplit):
  from pcam_tfdata.convert import from_h5, pcam_h5  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  x = {s: rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
       for s, n in (('train', 40), ('valid', 12), ('test', 10))}
  y = {s: np.arange(len(x[s])) % 2 for s in x}
  y['train'][3], y['train'][30] = 0, 1  # Only the group within train disagrees.
  x['train'][3] = x['test'][2]     # Train copy of test.
  x['valid'][4] = x['test'][2]     # Valid copy of the same.
  x['train'][30] = x['valid'][7]   # Train copy of valid.
  x['train'][10] = x['train'][11]  # Within train, labels 0 and 1 (conflict).
  folder = tmp_path / 'pcam'
  folder.mkdir()
  for s in x:
    _write_h5(folder, s, x[s], y[s])
  kwargs = dict(resplit=resplit, per_class=0, val_fraction=0.25, show_progress=False,
                log=lambda _: None, eda=False)
  source = pcam_h5.read_source(str(folder))
  counted = from_h5.convert(source, str(tmp_path / 'a'), **kwargs)['duplicates']
  assert counted['groups'] == 3 and counted['patches'] == 7 and counted['label_conflicts'] == 1
  assert sorted(sorted(g['ids']) for g in counted['first']) == [
      ['pcam-test-000002', 'pcam-train-000003', 'pcam-valid-000004'],
      ['pcam-train-000010', 'pcam-train-000011'],
      ['pcam-train-000030', 'pcam-valid-000007']]
  manifest = from_h5.convert(source, str(tmp_path / 'b'), drop_duplicates=True, **kwargs)
  dropped = {d['id']: d['same_as'] for d in manifest['duplicates']['dropped']['ids']}
  assert dropped == {'pcam-train-000003': 'pcam-test-000002',
                     'pcam-valid-000004': 'pcam-test-000002',
                     'pcam-train-000030': 'pcam-valid-000007',
                     'pcam-train-000011': 'pcam-train-000010'}
  assert manifest['duplicates']['groups'] == 0
  stored = _stored(tmp_path / 'b')
  assert len(stored) == 62 - 4 and not set(dropped) & set(stored)


def test_test_only_duplicates_are_counted_never_dropped(kaggle_copy, tmp_path):
  first, second = sorted((kaggle_copy / 'test').glob('*.tif'))[:2]
  second.write_bytes(first.read_bytes())
  manifest = run_convert(kaggle_copy, tmp_path / 'r', drop_duplicates=True, workers=2)
  info = manifest['duplicates']
  assert info['within'] == {'test': 1} and info['groups'] == 1
  assert info['dropped'] == {'count': 0, 'groups': 0, 'label_conflicts': 0, 'ids': []}
  assert manifest['splits']['test']['count'] == 10  # Every test id stays.


def test_flag_errors_come_before_the_duplicate_scan(kaggle_copy, tmp_path):
  # A bad patch the scan would stop at: the flag's error must come first.
  sorted((kaggle_copy / 'train').glob('*.tif'))[0].write_bytes(b'not a tiff')
  for flags, message in ((['--num_folds=3', '--fold=3', '--per_class=0'],
                          '--fold=3: must be in 0..2'),
                         (['--per_class=1000'], '--per_class=1000 but class 0 holds only')):
    proc = run_tool('tools/make_records.py', f'--data_dir={kaggle_copy}',
                    f'--out_dir={tmp_path / "r"}', '--drop_duplicates', '--workers=1', *flags)
    assert proc.returncode == 1
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_a_sidecar_without_keys_is_redone(tmp_path, kaggle_dir):
  from pcam_tfdata.convert import shards  # pylint: disable=g-import-not-at-top
  source = kaggle.read_source(str(kaggle_dir))
  task = {'path': str(tmp_path / 'train-00000-of-00001.tfrecord'),
          'examples': [(i, int(l), source.train_path(i))
                       for i, l in zip(source.ids[:5], source.labels[:5])],
          'crop_size': 32, 'patch_size': 96, 'skip_bad': False}
  stats = shards.write_shard(task)
  assert shards.load_done(task['path']) == stats and len(stats['keys']) == 5
  older = {k: v for k, v in stats.items() if k != 'keys'}  # As an earlier version wrote it.
  (tmp_path / 'train-00000-of-00001.tfrecord.done.json').write_text(json.dumps(older))
  assert shards.load_done(task['path']) is None


@needs_h5py
def test_h5_drop_that_empties_a_split_is_refused(tmp_path):
  from pcam_tfdata.convert import from_h5, pcam_h5, plan  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  x = {'train': rng.integers(0, 256, (20, 96, 96, 3), dtype=np.uint8),
       'test': rng.integers(0, 256, (6, 96, 96, 3), dtype=np.uint8)}
  x['valid'] = x['test'][:4].copy()  # Every valid patch is a test patch.
  folder = tmp_path / 'pcam'
  folder.mkdir()
  for s in x:
    _write_h5(folder, s, x[s], np.arange(len(x[s])) % 2)
  source = pcam_h5.read_source(str(folder))
  with pytest.raises(plan.ConvertError, match=r'split val: no example to write '
                     r'\(--drop_duplicates left out every one as a copy\)'):
    from_h5.convert(source, str(tmp_path / 'r'), drop_duplicates=True, show_progress=False,
                       log=lambda _: None, eda=False)
  assert not (tmp_path / 'r').exists()
