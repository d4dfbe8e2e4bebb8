"""Identical patches and stored crops: found exactly, counted, kept off both sides."""

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
  # 1 and 2 share a key but not their pixels (a CRC collision, forced); 4 and
  # 6 are unreadable (NO_KEY): two of them share that key, and are no candidates.
  patches.append(None)
  keys = [7, 9, 9, 7, duplicates.NO_KEY, 7, duplicates.NO_KEY]
  read = []
  def read_patches(indices):  # In any order (here reversed), as a stream.
    read.extend(indices.tolist())
    return ((i, patches[i]) for i in indices[::-1])
  groups, crop_groups = duplicates.find_groups(keys, read_patches)
  assert [g.tolist() for g in groups] == [[0, 3, 5]]
  assert crop_groups is groups  # At crop 96 the crop is the patch: one grouping.
  assert read == [0, 1, 2, 3, 5]  # Only candidates are read again, never NO_KEY.
  assert duplicates.find_groups([1, 2, 3], read_patches) == ([], []) and read[-1] == 5


def _with_border(pixels, seed, crop_size=32):
  """`pixels` with the same centre `crop_size` square and a new random border."""
  out = np.random.default_rng(seed).integers(0, 256, pixels.shape, dtype=np.uint8)
  c = (96 - crop_size) // 2
  out[c:c + crop_size, c:c + crop_size] = pixels[c:c + crop_size, c:c + crop_size]
  return out


def test_crop_groups_hold_patches_with_other_borders():
  rng = np.random.default_rng(1)
  base, other = (rng.integers(0, 256, (96, 96, 3), dtype=np.uint8) for _ in range(2))
  # 0, 1 and 3 share their centre 32x32; 0 and 3 are one patch; 2 and 4 are
  # unrelated, with crop keys made equal (a CRC collision, forced).
  patches = [base, _with_border(base, 2), other, base.copy(), _with_border(other, 3, 16)]
  keys, crop_keys = map(list, zip(*(duplicates.patch_keys(p, 32) for p in patches)))
  crop_keys[4] = crop_keys[2]
  read = []
  def read_patches(indices):
    read.extend(indices.tolist())
    return ((i, patches[i]) for i in indices)
  groups, crop_groups = duplicates.find_groups(keys, read_patches, 32, crop_keys)
  assert [g.tolist() for g in groups] == [[0, 3]]
  assert [g.tolist() for g in crop_groups] == [[0, 1, 3]]
  assert read == [0, 1, 2, 3, 4]  # Each candidate once, of either kind or both.
  # At crop 96 one key is taken, and the borders count.
  full, crop = duplicates.patch_keys(base, 96)
  assert full == crop == duplicates.patch_key(base)
  assert duplicates.find_groups(keys, read_patches, 96)[1][0].tolist() == [0, 3]


def test_drop_plan_keeps_the_fixed_then_the_best_ranked_and_no_conflicting_label():
  crop_groups = [np.array(g) for g in ([0, 2, 4], [1, 3], [5, 6, 7], [8, 9, 10, 11],
                                       [12, 13, 14])]
  patch_groups = [np.array([2, 4]), np.array([5, 7])]  # Inside crop groups.
  rank = np.array([1] + [0] * 14)
  t = schema.TEST_LABEL
  labels = np.array([0, 1, 0, 1, 0, 1, t, t, 1, 0, 0, 0, t, 0, 1])
  fixed = labels == t
  plan = duplicates.drop_plan(crop_groups, patch_groups, rank, labels, fixed, t)
  got = {int(d): (int(k), r) for d, k, r in zip(plan.dropped, plan.same_as, plan.reasons)}
  same_patch, same_crop = duplicates.SAME_PATCH, duplicates.SAME_CROP
  conflict = duplicates.CONFLICTING_LABELS
  assert got == {
      0: (2, same_crop), 4: (2, same_patch),  # 2 ranks before 0 (then lowest index).
      3: (1, same_crop),
      5: (7, same_patch),  # Fixed 6 and 7 stay; 5 names the one it is identical to.
      # 8 has the lowest index, but its label conflicts: the group keeps none.
      8: (9, conflict), 9: (8, conflict), 10: (8, conflict), 11: (8, conflict),
      13: (12, conflict), 14: (12, conflict)}  # The fixed 12 stays all the same.
  assert plan.dropped.tolist() == sorted(got)
  info = duplicates.describe_dropped(np.array([f'id{i:02d}' for i in range(15)]), plan)
  assert info['count'] == 10 and info['groups'] == 5 and info['label_conflicts'] == 2
  assert info['reasons'] == {same_patch: 2, same_crop: 2, conflict: 6}
  assert info['ids'][0] == {'id': 'id00', 'same_as': 'id02', 'reason': same_crop}


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


def _plant_crops(kaggle_dir):
  """Patches whose centre 32x32 is another's, under other borders.

  Returns:
    The planted groups of identical 32x32 crops, each a sorted list of ids:
    A, labels 1, 0, 0, 0, where the 1 has the smallest id of all (its last
    two members are one full patch); B, a copy of a labelled patch with the
    same label; C, a test patch and two labelled copies, labels 0 and 1.
  """
  labels = pd.read_csv(kaggle_dir / kaggle.LABELS_CSV)
  ids = sorted(labels['id'])
  label_of = dict(zip(labels['id'], labels['label']))
  test_id = sorted(p.stem for p in (kaggle_dir / 'test').glob('*.tif'))[1]
  base = np.random.default_rng(7).integers(0, 256, (96, 96, 3), dtype=np.uint8)
  fourth = _with_border(base, 13)
  original = lambda folder, i: tiff.read_patch(str(kaggle_dir / folder / f'{i}.tif'))
  plant = [  # (new id, pixels, label)
      ('0' * 40, _with_border(base, 10), 1), ('2' * 40, _with_border(base, 11), 0),
      ('4' * 40, fourth, 0), ('6' * 40, fourth.copy(), 0),
      ('8' * 40, _with_border(original('train', ids[7]), 14), label_of[ids[7]]),
      ('a' * 40, _with_border(original('test', test_id), 15), 0),
      ('b' * 40, _with_border(original('test', test_id), 16), 1),
  ]
  for new, pixels, _ in plant:
    synthetic.write_tiff(str(kaggle_dir / 'train' / f'{new}.tif'), pixels)
  rows = pd.DataFrame([{'id': new, 'label': label} for new, _, label in plant])
  pd.concat([labels, rows]).to_csv(kaggle_dir / kaggle.LABELS_CSV, index=False)
  return [['0' * 40, '2' * 40, '4' * 40, '6' * 40], sorted([ids[7], '8' * 40]),
          sorted([test_id, 'a' * 40, 'b' * 40])]


def _splits_of_crops(stored):
  """{digest of a stored image: the splits holding it}."""
  splits = collections.defaultdict(set)
  for split, image in stored.values():
    splits[hashlib.sha256(image).digest()].add(split)
  return splits


def _recount(groups):
  """(within, across) counted again from each group's splits: within its one split, or
  across every pair of splits it spans."""
  within, across = collections.Counter(), collections.Counter()
  for group in groups:
    names = sorted(set(group['splits']), key=schema.split_rank)
    within.update(names if len(names) == 1 else [])
    across.update(f'{a}/{b}' for i, a in enumerate(names) for b in names[i + 1:])
  return dict(within), dict(across)


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
  assert (info['within'], info['across']) == _recount(info['first'])
  assert 'test' in ''.join(info['across'])  # The test copy always crosses.
  # At crop 96 the stored crop is the patch: the same groups, under the crop entry too.
  assert {k: v for k, v in info['crop'].items() if k != 'method'} == {
      k: v for k, v in info.items() if k not in ('method', 'crop')}


def test_identical_crops_are_counted_beside_identical_patches(kaggle_copy, tmp_path):
  copies, _ = _plant(kaggle_copy)
  crop_groups = _plant_crops(kaggle_copy)
  manifest = run_convert(kaggle_copy, tmp_path / 'rec', workers=2)
  info, crop = manifest['duplicates'], manifest['duplicates']['crop']
  stored = _stored(tmp_path / 'rec')
  assert len(stored) == 81  # 71 labelled, 10 test: counting drops nothing.
  # Full patches: the 3 groups of _plant (7 patches) and A's last two.
  assert info['groups'] == 4 and info['patches'] == 9 and info['label_conflicts'] == 1
  # Crops: those 4 groups, A grown to 4, B and C.
  assert crop['groups'] == 6 and crop['patches'] == 16 and crop['label_conflicts'] == 3
  assert '32x32' in crop['method']
  expected = collections.defaultdict(set)
  for new, original in copies.items():
    expected[original].update({new, original})
  assert sorted(sorted(g['ids']) for g in crop['first']) == sorted(
      [sorted(g) for g in expected.values()] + crop_groups)
  for group in crop['first']:
    assert group['splits'] == [stored[i][0] for i in group['ids']]
    assert len({stored[i][1] for i in group['ids']}) == 1  # One stored crop.
  assert (crop['within'], crop['across']) == _recount(crop['first'])
  assert crop['across'].get('train/val')  # The leak the crop key is for.
  spanning = sum(len(set(g['splits'])) > 1 for g in crop['first'])
  lines = []
  verify.verify(str(tmp_path / 'rec'), log=lines.append)  # It sees what the manifest says.
  assert lines[-1].startswith(f'cross-split duplicates: {spanning} groups of identical stored '
                              '32x32 crops in more than one split'), lines[-1]
  line = duplicates.summary_line(info, len(stored), 32)
  assert '\n' not in line and '4 groups of pixel-identical patches (9 patches' in line
  assert '; 6 groups of identical stored 32x32 crops (16 patches; groups ' in line
  assert '3 with conflicting labels' in line


def test_drop_duplicates_judges_the_stored_crop(kaggle_copy, tmp_path):
  copies, test_id = _plant(kaggle_copy)
  crop_groups = _plant_crops(kaggle_copy)
  conflicting_a, (b_kept, b_copy), group_c = crop_groups
  manifest = run_convert(kaggle_copy, tmp_path / 'rec', drop_duplicates=True, workers=2)
  dropped = manifest['duplicates']['dropped']
  got = {d['id']: (d['same_as'], d['reason']) for d in dropped['ids']}
  conflict = duplicates.CONFLICTING_LABELS
  ids5 = copies['f' * 40]
  first = lambda group, i: min(j for j in group if j != i)
  assert got == {
      # Full copies of _plant: one group with conflicting labels, two without.
      **{i: (first([ids5, 'e' * 40, 'f' * 40], i), conflict) for i in (ids5, 'e' * 40, 'f' * 40)},
      'd' * 40: (copies['d' * 40], duplicates.SAME_PATCH),
      'c' * 40: (test_id, duplicates.SAME_PATCH),
      # A: labels 1, 0, 0, 0; the 1 sorts first and is dropped with the rest.
      **{i: (first(conflicting_a, i), conflict) for i in conflicting_a},
      b_copy: (b_kept, duplicates.SAME_CROP),
      # C: the test patch stays; both labelled copies go.
      **{i: (group_c[0], conflict) for i in group_c[1:]},
  }
  assert dropped['reasons'] == {duplicates.SAME_PATCH: 2, duplicates.SAME_CROP: 1,
                                conflict: 9}
  assert dropped['count'] == 12 and dropped['groups'] == 6 and dropped['label_conflicts'] == 3
  stored = _stored(tmp_path / 'rec')
  assert set(stored) == _all_ids(kaggle_copy) - set(got)
  assert {test_id, group_c[0]} <= set(stored)  # Test patches are never dropped.
  splits = _splits_of_crops(stored)
  assert len(splits) == len(stored)  # Every stored crop once: none in two splits.
  assert manifest['duplicates']['crop']['groups'] == 0
  lines = []
  verify.verify(str(tmp_path / 'rec'), log=lines.append)
  assert lines[-1] == 'cross-split duplicates: none (no identical stored 32x32 crops in two splits)'


def test_drop_duplicates_at_crop_96_judges_whole_patches(kaggle_copy, tmp_path):
  copies, test_id = _plant(kaggle_copy)
  _plant_crops(kaggle_copy)  # At crop 96 their borders make them other images.
  manifest = run_convert(kaggle_copy, tmp_path / 'rec', crop_size=96, drop_duplicates=True,
                         workers=2)
  stored = _stored(tmp_path / 'rec')
  dropped = manifest['duplicates']['dropped']
  got = {d['id']: (d['same_as'], d['reason']) for d in dropped['ids']}
  ids5, conflict = copies['f' * 40], duplicates.CONFLICTING_LABELS
  # e copies ids[5] under the other label: none of the three is kept. The
  # smallest id of a group that agrees stays; a copy of a test patch goes.
  assert got == {ids5: ('e' * 40, conflict), 'e' * 40: (ids5, conflict),
                 'f' * 40: (ids5, conflict),
                 'd' * 40: (copies['d' * 40], duplicates.SAME_PATCH),
                 'c' * 40: (test_id, duplicates.SAME_PATCH),
                 '6' * 40: ('4' * 40, duplicates.SAME_PATCH)}
  assert dropped['count'] == 6 and dropped['groups'] == 4 and dropped['label_conflicts'] == 1
  assert set(stored) == _all_ids(kaggle_copy) - set(got)
  assert test_id in stored
  assert len(_splits_of_crops(stored)) == len(stored)  # One record per pixel content.
  info = manifest['duplicates']
  assert info['groups'] == 0 and info['crop']['groups'] == 0
  assert manifest['settings']['drop_duplicates'] is True


def _all_ids(kaggle_dir):
  return (set(pd.read_csv(kaggle_dir / kaggle.LABELS_CSV)['id']) |
          {p.stem for p in (kaggle_dir / 'test').glob('*.tif')})


def test_dropped_duplicates_and_folds_still_partition(kaggle_copy, tmp_path):
  _plant(kaggle_copy)
  _plant_crops(kaggle_copy)
  vals, dropped = [], []
  # Every fold, and another seed: neither changes what goes.
  for name, fold, seed in (('fold0', 0, 0), ('fold1', 1, 0), ('fold2', 2, 0), ('seed5', 0, 5)):
    manifest = run_convert(kaggle_copy, tmp_path / name, drop_duplicates=True, num_folds=3,
                           fold=fold, seed=seed)
    dropped.append(manifest['duplicates']['dropped'])
    stored = _stored(tmp_path / name)
    vals.append({i for i, (split, _) in stored.items() if split == 'val'})
    assert all(len(s) == 1 for s in _splits_of_crops(stored).values())
  assert all(d == dropped[0] for d in dropped) and dropped[0]['count'] == 12
  labelled = set(pd.read_csv(kaggle_copy / kaggle.LABELS_CSV)['id'])
  assert sorted(i for v in vals[:3] for i in v) == sorted(
      labelled - {d['id'] for d in dropped[0]['ids']})


def test_settings_name_drop_duplicates_only_when_on(kaggle_dir, tmp_path):
  first = run_convert(kaggle_dir, tmp_path / 'a')
  second = run_convert(kaggle_dir, tmp_path / 'b', drop_duplicates=True)
  assert 'drop_duplicates' not in first['settings']
  assert first['fingerprint'] != second['fingerprint']
  assert second['duplicates']['dropped']['count'] == 0


@pytest.mark.slow  # (8 s; to keep the default tier within 4 minutes from a fresh clone)
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
  _plant_crops(kaggle_copy)
  proc = run_tool('tools/make_records.py', f'--data_dir={kaggle_copy}', f'--out_dir={tmp_path / "r"}',
                  '--per_class=0', '--workers=1', '--drop_duplicates')
  assert proc.returncode == 0, proc.stderr
  lines = [l for l in proc.stdout.splitlines() if l.startswith('duplicates:')]
  # What is left after the drop: no identical patch or crop, and what went.
  assert lines == ['duplicates: no pixel-identical patches among the 69 written; no identical '
                   'stored 32x32 crops; --drop_duplicates left out 12 patches of 6 groups '
                   'before the split (9 for conflicting labels)'], proc.stdout


def test_duplicates_line_names_both_kinds(kaggle_copy, tmp_path):
  _plant(kaggle_copy)
  _plant_crops(kaggle_copy)
  for crop_size in (32, 96):
    info = run_convert(kaggle_copy, tmp_path / f'r{crop_size}', crop_size=crop_size)['duplicates']
    line = duplicates.summary_line(info, 81, crop_size)
    assert line.startswith('duplicates: 4 groups of pixel-identical patches (9 patches; groups ')
    assert '1 with conflicting labels' in line and '\n' not in line
    crops = '; 6 groups of identical stored 32x32 crops (16 patches; groups '
    assert (crops in line) == (crop_size == 32), line
    assert line.endswith('; --drop_duplicates keeps one patch of each crop group (none of its '
                         'labelled patches if their labels conflict)')
  older = {k: v for k, v in info.items() if k != 'crop'}  # An earlier version's manifest.
  assert 'crops not counted' in duplicates.summary_line(older, 81, 32)


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
  y['train'][3], y['train'][30], y['train'][20] = 0, 1, 1
  x['train'][3] = x['test'][2]     # Train copy of test.
  x['valid'][4] = x['test'][2]     # Valid copy of the same.
  x['train'][30] = x['valid'][7]   # Train copy of valid.
  x['train'][10] = x['train'][11]  # Within train, labels 0 and 1 (conflict).
  # Crops only, under other borders: a train copy of a valid crop (labels
  # agree), and test 6 with train 14 and 15 (labels 0, 0, 1: conflict).
  x['train'][20] = _with_border(x['valid'][5], 20)
  x['train'][14] = _with_border(x['test'][6], 21)
  x['train'][15] = _with_border(x['test'][6], 22)
  folder = tmp_path / 'pcam'
  folder.mkdir()
  for s in x:
    _write_h5(folder, s, x[s], y[s])
  kwargs = dict(resplit=resplit, per_class=0, val_fraction=0.25, show_progress=False,
                log=lambda _: None, eda=False)
  source = pcam_h5.read_source(str(folder))
  counted = from_h5.convert(source, str(tmp_path / 'a'), **kwargs)['duplicates']
  assert counted['groups'] == 3 and counted['patches'] == 7 and counted['label_conflicts'] == 1
  full_groups = [['pcam-test-000002', 'pcam-train-000003', 'pcam-valid-000004'],
                 ['pcam-train-000010', 'pcam-train-000011'],
                 ['pcam-train-000030', 'pcam-valid-000007']]
  assert sorted(sorted(g['ids']) for g in counted['first']) == full_groups
  crop = counted['crop']
  assert crop['groups'] == 5 and crop['patches'] == 12 and crop['label_conflicts'] == 2
  assert sorted(sorted(g['ids']) for g in crop['first']) == sorted(full_groups + [
      ['pcam-test-000006', 'pcam-train-000014', 'pcam-train-000015'],
      ['pcam-train-000020', 'pcam-valid-000005']])
  manifest = from_h5.convert(source, str(tmp_path / 'b'), drop_duplicates=True, **kwargs)
  dropped = {d['id']: (d['same_as'], d['reason'])
             for d in manifest['duplicates']['dropped']['ids']}
  conflict = duplicates.CONFLICTING_LABELS
  # Test, then valid, is kept; but every split is labelled here, test too, so
  # a group whose labels conflict loses every member.
  assert dropped == {'pcam-train-000003': ('pcam-test-000002', duplicates.SAME_PATCH),
                     'pcam-valid-000004': ('pcam-test-000002', duplicates.SAME_PATCH),
                     'pcam-train-000030': ('pcam-valid-000007', duplicates.SAME_PATCH),
                     'pcam-train-000010': ('pcam-train-000011', conflict),
                     'pcam-train-000011': ('pcam-train-000010', conflict),
                     'pcam-train-000020': ('pcam-valid-000005', duplicates.SAME_CROP),
                     'pcam-test-000006': ('pcam-train-000014', conflict),
                     'pcam-train-000014': ('pcam-test-000006', conflict),
                     'pcam-train-000015': ('pcam-test-000006', conflict)}
  assert manifest['duplicates']['groups'] == 0 == manifest['duplicates']['crop']['groups']
  stored = _stored(tmp_path / 'b')
  assert len(stored) == 62 - 9 and not set(dropped) & set(stored)
  assert len(_splits_of_crops(stored)) == len(stored)  # No stored crop twice.
  lines = []
  verify.verify(str(tmp_path / 'b'), log=lines.append)
  assert lines[-1] == 'cross-split duplicates: none (no identical stored 32x32 crops in two splits)'


def test_test_only_duplicates_are_counted_never_dropped(kaggle_copy, tmp_path):
  first, second = sorted((kaggle_copy / 'test').glob('*.tif'))[:2]
  second.write_bytes(first.read_bytes())
  manifest = run_convert(kaggle_copy, tmp_path / 'r', drop_duplicates=True, workers=2)
  info = manifest['duplicates']
  assert info['within'] == {'test': 1} and info['groups'] == 1
  assert info['dropped'] == {'count': 0, 'groups': 0, 'label_conflicts': 0, 'reasons': {},
                             'ids': []}
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
  assert stats['crop_keys'] == [duplicates.patch_keys(tiff.read_patch(p), 32)[1]
                                for _, _, p in task['examples']]
  for lacking in ('keys', 'crop_keys'):  # As earlier versions wrote it.
    older = {k: v for k, v in stats.items() if k != lacking}
    (tmp_path / 'train-00000-of-00001.tfrecord.done.json').write_text(json.dumps(older))
    assert shards.load_done(task['path']) is None, lacking


@needs_h5py
def test_h5_output_of_another_drop_is_stale(tmp_path, monkeypatch):
  """An output whose drop differs (an earlier version's rule) is not taken as current."""
  from pcam_tfdata.convert import from_h5, outdir, pcam_h5  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  x = {'train': rng.integers(0, 256, (40, 96, 96, 3), dtype=np.uint8),
       'valid': rng.integers(0, 256, (8, 96, 96, 3), dtype=np.uint8)}
  x['train'][5] = _with_border(x['train'][4], 1)  # Identical crops only.
  folder = tmp_path / 'pcam'
  folder.mkdir()
  for s in x:
    _write_h5(folder, s, x[s], np.zeros(len(x[s])))
  source = pcam_h5.read_source(str(folder))
  kwargs = dict(drop_duplicates=True, show_progress=False, log=lambda _: None, eda=False)
  manifest = from_h5.convert(source, str(tmp_path / 'r'), **kwargs)
  assert [d['id'] for d in manifest['duplicates']['dropped']['ids']] == ['pcam-train-000005']
  assert from_h5.convert(source, str(tmp_path / 'r'), **kwargs) == manifest  # Current.
  # The full-patch rule of earlier versions drops nothing here (same shard counts).
  earlier = {'indices': {}, 'info': manifest['duplicates']['dropped']}
  monkeypatch.setattr(from_h5, '_find_duplicates', lambda *_: earlier)
  with pytest.raises(outdir.OutDirError, match='--overwrite'):
    from_h5.convert(source, str(tmp_path / 'r'), **kwargs)


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
                     r'\(--drop_duplicates left out every one\)'):
    from_h5.convert(source, str(tmp_path / 'r'), drop_duplicates=True, show_progress=False,
                       log=lambda _: None, eda=False)
  assert not (tmp_path / 'r').exists()
