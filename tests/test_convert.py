"""The converter: exact round trip, balance, splits, groups, determinism, resumption."""

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from pcam_tfdata.convert import from_kaggle
from pcam_tfdata.convert import kaggle
from pcam_tfdata.convert import outdir
from pcam_tfdata.convert import plan
from pcam_tfdata.convert import splits
from pcam_tfdata.convert import synthetic
from pcam_tfdata.convert import tfds_metadata
from pcam_tfdata.convert import tiff
from pcam_tfdata import records as records_lib
from pcam_tfdata import schema
from conftest import ROOT, error_lines, run_convert, run_tool


def read_split(out_dir, split):
  """[(id, label, image bytes)] of a split, in shard order."""
  ds = tf.data.TFRecordDataset(records_lib.Records.open(out_dir).shard_paths(split))
  out = []
  for batch in ds.batch(1000).map(lambda x: tf.io.parse_example(x, schema.feature_spec())):
    out.extend(zip([i.decode() for i in batch[schema.ID_KEY].numpy()],
                   batch[schema.LABEL_KEY].numpy().tolist(), batch[schema.IMAGE_KEY].numpy()))
  return out


def shard_bytes(out_dir):
  return {f: (out_dir / f).read_bytes() for f in sorted(os.listdir(out_dir))
          if f.endswith('.tfrecord')}


def test_round_trip_ids_labels_and_crop_bytes(kaggle_dir, tmp_path):
  out = tmp_path / 'rec'
  manifest = run_convert(kaggle_dir, out, crop_size=32, per_class=0)
  labels = pd.read_csv(kaggle_dir / 'train_labels.csv', dtype={'id': str})
  expected = dict(zip(labels['id'], labels['label']))
  got = read_split(out, 'train') + read_split(out, 'val')
  assert len(got) == len(expected)
  assert {i: l for i, l, _ in got} == expected
  for example_id, _, image in got:
    source = tiff.read_patch(str(kaggle_dir / 'train' / f'{example_id}.tif'))
    assert image == source[32:64, 32:64].tobytes()
  test = read_split(out, 'test')
  assert sorted(i for i, _, _ in test) == sorted(p[:-4] for p in os.listdir(kaggle_dir / 'test'))
  assert {l for _, l, _ in test} == {schema.TEST_LABEL}
  assert manifest['image_shape'] == [32, 32, 3]
  assert manifest['splits']['train']['count'] + manifest['splits']['val']['count'] == 60


@pytest.mark.parametrize('crop_size', [2, 48, 96])
def test_other_crop_sizes(kaggle_dir, tmp_path, crop_size):
  out = tmp_path / 'rec'
  run_convert(kaggle_dir, out, crop_size=crop_size)
  example_id, _, image = read_split(out, 'val')[0]
  c = (96 - crop_size) // 2
  source = tiff.read_patch(str(kaggle_dir / 'train' / f'{example_id}.tif'))
  assert image == source[c:c + crop_size, c:c + crop_size].tobytes()


def test_balance_and_split_counts(kaggle_dir, tmp_path):
  manifest = run_convert(kaggle_dir, tmp_path / 'rec', per_class=20, val_fraction=0.25)
  assert manifest['splits']['train']['label_counts'] == {'0': 15, '1': 15}
  assert manifest['splits']['val']['label_counts'] == {'0': 5, '1': 5}
  counts = [s['count'] for s in manifest['splits']['train']['shards']]
  assert len(counts) == 30 and sum(counts) == 30  # 32 wanted, capped at one per example.


def test_shards_mix_classes(kaggle_dir, tmp_path):
  out = tmp_path / 'rec'
  run_convert(kaggle_dir, out, per_class=20, num_shards=2)
  manifest = schema.load_manifest(str(out))
  assert [len(s) for s in (manifest['splits']['train']['shards'],)] == [2]
  first = read_split(out, 'train')[:15]
  assert {l for _, l, _ in first} == {0, 1}


@pytest.mark.parametrize('column', ['group', 'wsi', 'slide'])
def test_groups_never_cross_splits(kaggle_dir, tmp_path, column):
  ids = pd.read_csv(kaggle_dir / 'train_labels.csv', dtype=str)['id']
  # `wsi`: the community patch-to-slide file (patch_id_wsi_full.csv) as it is.
  groups = pd.DataFrame({'id': ids, column: [f'slide{i % 9}' for i in range(len(ids))]})
  groups_csv = tmp_path / 'groups.csv'
  groups.to_csv(groups_csv, index=False)
  lookup = dict(zip(groups['id'], groups[column]))
  from pcam_tfdata.convert import kaggle  # pylint: disable=g-import-not-at-top
  source = kaggle.read_source(str(kaggle_dir))
  out = tmp_path / 'rec'
  from_kaggle.convert(source, str(out), per_class=0, groups=kaggle.read_groups(str(groups_csv), source.ids),
                  eda=False, show_progress=False, log=lambda _: None)
  train = {lookup[i] for i, _, _ in read_split(out, 'train')}
  val = {lookup[i] for i, _, _ in read_split(out, 'val')}
  assert train and val and not train & val
  assert len(train | val) == 9


def _fold_conversions(kaggle_dir, tmp_path, num_folds, groups_csv=None, **kwargs):
  from pcam_tfdata.convert import kaggle  # pylint: disable=g-import-not-at-top
  source = kaggle.read_source(str(kaggle_dir))
  groups = kaggle.read_groups(str(groups_csv), source.ids) if groups_csv else None
  out = []
  for fold in range(num_folds):
    path = tmp_path / f'fold{fold}'
    manifest = from_kaggle.convert(source, str(path), per_class=0, groups=groups, eda=False,
                               show_progress=False, log=lambda _: None, num_folds=num_folds,
                               fold=fold, **kwargs)
    assert manifest['settings']['num_folds'] == num_folds
    assert manifest['settings']['fold'] == fold
    out.append({split: read_split(path, split) for split in ('train', 'val')})
  return out


def test_k_folds_by_slide_partition_the_examples(kaggle_dir, tmp_path):
  ids = pd.read_csv(kaggle_dir / 'train_labels.csv', dtype=str)['id']
  wsi = pd.DataFrame({'id': ids, 'wsi': [f'slide{i % 12}' for i in range(len(ids))]})
  wsi.to_csv(tmp_path / 'patch_id_wsi_full.csv', index=False)  # The community file's header.
  slide = dict(zip(wsi['id'], wsi['wsi']))
  folds = _fold_conversions(kaggle_dir, tmp_path, 5, tmp_path / 'patch_id_wsi_full.csv')
  val_ids = [i for f in folds for i, _, _ in f['val']]
  assert sorted(val_ids) == sorted(ids)  # Every example in exactly one val.
  positive_share = (pd.read_csv(kaggle_dir / 'train_labels.csv')['label'] == 1).mean()
  for f in folds:
    train_ids = {i for i, _, _ in f['train']}
    assert len(train_ids) + len(f['val']) == len(ids)  # train = every other fold.
    assert not {slide[i] for i in train_ids} & {slide[i] for i, _, _ in f['val']}
    share = np.mean([label for _, label, _ in f['val']])
    assert abs(share - positive_share) < 0.15, share  # As balanced as 12 slides allow.


def test_slide_folds_are_never_empty_and_balance_each_class():
  rng = np.random.default_rng(0)
  # Two single-class slides and K = 2: one slide per fold, not both in fold 0.
  folds = splits.assign_folds(np.array([0] * 5 + [1] * 5), 2, rng,
                              np.array(['a'] * 5 + ['b'] * 5))
  assert sorted(set(folds[:5])) != sorted(set(folds[5:]))
  # One tumour slide with 30% of the positives among 8 smaller tumour slides
  # and 15 normal ones: its fold still gets its share of normal tissue.
  labels, groups = [], []
  for g, (n, label) in enumerate([(30, 1)] + [(9, 1)] * 8 + [(10, 0)] * 15):
    labels += [label] * n
    groups += [f's{g}'] * n
  labels, groups = np.array(labels), np.array(groups)
  for seed in range(5):
    folds = splits.assign_folds(labels, 5, np.random.default_rng(seed), groups)
    for k in range(5):
      assert (labels[folds == k] == 0).sum() >= 20, (seed, k)  # 150 / 5 = 30 each, +- a slide.


def test_group_values_are_stripped_and_never_empty(tmp_path):
  from pcam_tfdata.convert import kaggle  # pylint: disable=g-import-not-at-top
  (tmp_path / 'g.csv').write_text('id,wsi\na,slide1\nb,slide1 \nc, slide2\n')
  assert kaggle.read_groups(str(tmp_path / 'g.csv'), np.array(['a', 'b', 'c'])).tolist() == [
      'slide1', 'slide1', 'slide2']
  (tmp_path / 'e.csv').write_text('id,wsi\na,slide1\nb, \n')
  with pytest.raises(kaggle.SourceError, match='e.csv line 3: empty wsi for id b'):
    kaggle.read_groups(str(tmp_path / 'e.csv'), np.array(['a', 'b']))


def test_k_folds_without_groups_are_stratified(kaggle_dir, tmp_path):
  folds = _fold_conversions(kaggle_dir, tmp_path, 4, seed=3)
  val_ids = [i for f in folds for i, _, _ in f['val']]
  assert len(val_ids) == len(set(val_ids)) == 60
  positives = [sum(label for _, label, _ in f['val']) for f in folds]
  sizes = [len(f['val']) for f in folds]
  assert max(positives) - min(positives) <= 1 and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize('num_folds, fold, message', [
    (5, 5, '--fold=5: must be in 0..4'), (61, 0, '--num_folds=61: must be 2..60'),
    (13, 0, '--num_folds=13: must be 2..12 (the number of groups)')])
def test_bad_folds_are_refused(kaggle_dir, tmp_path, num_folds, fold, message):
  from pcam_tfdata.convert import kaggle  # pylint: disable=g-import-not-at-top
  source = kaggle.read_source(str(kaggle_dir))
  groups = [f'slide{i % 12}' for i in range(len(source.ids))] if 'groups' in message else None
  with pytest.raises(plan.ConvertError, match=re.escape(message)):
    from_kaggle.convert(source, str(tmp_path / 'out'), per_class=0, groups=groups, eda=False,
                    show_progress=False, log=lambda _: None, num_folds=num_folds, fold=fold)
  assert not (tmp_path / 'out').exists()


def test_same_inputs_and_seed_give_identical_shards(kaggle_dir, tmp_path):
  run_convert(kaggle_dir, tmp_path / 'a', seed=5, workers=1)
  run_convert(kaggle_dir, tmp_path / 'b', seed=5, workers=2)
  run_convert(kaggle_dir, tmp_path / 'c', seed=6, workers=1)
  a, b, c = (shard_bytes(tmp_path / x) for x in 'abc')
  assert a == b
  assert a.keys() == c.keys() and a != c


def test_complete_output_is_kept_unless_overwrite(kaggle_dir, tmp_path):
  out = tmp_path / 'rec'
  first = run_convert(kaggle_dir, out, seed=1)
  mtime = os.path.getmtime(out / schema.MANIFEST_NAME)
  assert run_convert(kaggle_dir, out, seed=1) == first  # Up to date: nothing rewritten.
  assert os.path.getmtime(out / schema.MANIFEST_NAME) == mtime
  with pytest.raises(outdir.OutDirError, match='--overwrite'):
    run_convert(kaggle_dir, out, seed=2)
  assert json.loads((out / schema.MANIFEST_NAME).read_text())['fingerprint'] == first['fingerprint']
  second = run_convert(kaggle_dir, out, seed=2, overwrite=True)
  assert second['fingerprint'] != first['fingerprint']
  assert [p for p in os.listdir(tmp_path) if p.startswith('.')] == []


_KILLER = '''
import os, signal, sys
from pcam_tfdata.convert import shards, kaggle, from_kaggle
real = shards.write_shard
done = []
def write_then_die(task, progress=None):
  stats = real(task, progress)
  done.append(stats)
  if len(done) == 3:
    os.kill(os.getpid(), signal.SIGKILL)
  return stats
shards.write_shard = write_then_die
source = kaggle.read_source(sys.argv[1])
from_kaggle.convert(source, sys.argv[2], per_class=0, workers=1, eda=False, show_progress=False)
'''


def test_killed_conversion_resumes_to_the_same_bytes(kaggle_dir, tmp_path):
  reference = tmp_path / 'reference'
  run_convert(kaggle_dir, reference)
  out = tmp_path / 'rec'
  proc = subprocess.run([sys.executable, '-c', _KILLER, str(kaggle_dir), str(out)], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == -signal.SIGKILL, proc.stderr
  assert not out.exists()  # Nothing that looks complete.
  partial = [p for p in os.listdir(tmp_path) if p.startswith('.rec.partial-')]
  assert len(partial) == 1
  assert len([f for f in os.listdir(tmp_path / partial[0]) if f.endswith('.done.json')]) == 3
  logged = []
  run_convert(kaggle_dir, out, log=logged.append)
  assert any('3 of' in line for line in logged), logged
  assert shard_bytes(out) == shard_bytes(reference)
  assert not (out / 'train-00000-of-00032.tfrecord.done.json').exists()
  assert [p for p in os.listdir(tmp_path) if p.startswith('.')] == []


def test_eda_pictures_are_written(kaggle_dir, tmp_path):
  out = tmp_path / 'rec'
  run_convert(kaggle_dir, out, eda=True)
  for name in ('eda_class_balance.png', 'eda_samples.png'):
    assert (out / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def _tree(folder):
  """{relative path: bytes} of every file under `folder`."""
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*'))
          if p.is_file()}


@pytest.mark.parametrize('where', ['same', 'inside', 'parent'])
def test_output_overlapping_the_input_is_refused_even_with_overwrite(kaggle_copy, tmp_path,
                                                                     where):
  before = _tree(kaggle_copy)
  out = {'same': kaggle_copy, 'inside': kaggle_copy / 'records',
         'parent': kaggle_copy.parent}[where]
  proc = run_tool('tools/make_records.py', f'--data_dir={kaggle_copy}', f'--out_dir={out}',
                  '--per_class=0', '--overwrite', '--workers=1')
  assert proc.returncode == 1
  verb = {'same': 'is', 'inside': 'is inside', 'parent': 'contains'}[where]
  assert error_lines(proc.stderr) == [
      f'make_records.py: error: --out_dir={out} {verb} --data_dir={kaggle_copy}; the records '
      'need a folder of their own, apart from the input'], proc.stderr
  assert _tree(kaggle_copy) == before  # Every input file, byte for byte.
  assert not (kaggle_copy / 'records').exists()


def test_overwrite_never_removes_a_folder_it_did_not_write(kaggle_dir, tmp_path):
  out = tmp_path / 'notes'
  out.mkdir()
  (out / 'thesis.tex').write_text('years of work')
  with pytest.raises(outdir.OutDirError, match='holds files this tool did not write'):
    run_convert(kaggle_dir, out, overwrite=True)
  (out / schema.MANIFEST_NAME).write_text('{"not": "ours"}')  # A manifest, but not ours.
  with pytest.raises(outdir.OutDirError, match='holds files this tool did not write'):
    run_convert(kaggle_dir, out, overwrite=True)
  assert (out / 'thesis.tex').read_text() == 'years of work'


def test_overwrite_never_removes_a_users_files_inside_a_conversion(kaggle_dir, tmp_path):
  out = tmp_path / 'rec'
  run_convert(kaggle_dir, out)
  (out / 'my_run').mkdir()
  (out / 'my_run' / 'notes.txt').write_text('precious')
  with pytest.raises(outdir.OutDirError, match='my_run, which this tool did not write'):
    run_convert(kaggle_dir, out, overwrite=True)
  with pytest.raises(outdir.OutDirError, match='my_run'):  # Stale, demo default: the same.
    run_convert(kaggle_dir, out, seed=9, replace_stale=True)
  assert (out / 'my_run' / 'notes.txt').read_text() == 'precious'


def test_a_conversion_missing_a_shard_is_rebuilt_with_overwrite(kaggle_dir, tmp_path):
  out = tmp_path / 'rec'
  manifest = run_convert(kaggle_dir, out)
  victim = out / manifest['splits']['train']['shards'][0]['file']
  victim.unlink()
  with pytest.raises(outdir.OutDirError, match='shards missing; pass --overwrite'):
    run_convert(kaggle_dir, out)
  run_convert(kaggle_dir, out, overwrite=True)
  assert schema.load_manifest(str(out))['fingerprint'] == manifest['fingerprint']
  assert victim.is_file()


def test_overwrite_through_a_symlink_replaces_the_folder_it_points_to(kaggle_dir, tmp_path):
  (tmp_path / 'big').mkdir()
  real = tmp_path / 'big' / 'rec'
  run_convert(kaggle_dir, real)
  link = tmp_path / 'rec'
  link.symlink_to(real)
  manifest = run_convert(kaggle_dir, link, overwrite=True, seed=4)
  assert link.is_symlink() and os.path.realpath(link) == str(real)
  assert schema.load_manifest(str(real))['fingerprint'] == manifest['fingerprint']
  assert sorted(p.name for p in tmp_path.iterdir()) == ['big', 'rec']
  assert sorted(p.name for p in (tmp_path / 'big').iterdir()) == ['rec']


def test_leftovers_of_a_killed_swap_go_even_when_nothing_is_to_do(kaggle_dir, tmp_path):
  out = tmp_path / 'rec'
  run_convert(kaggle_dir, out)
  leftover = tmp_path / '.rec.old-99999'
  leftover.mkdir()
  (leftover / 'train-00000-of-00001.tfrecord').write_bytes(b'old')
  run_convert(kaggle_dir, out)  # Already complete: nothing to convert,
  assert not leftover.exists()  # but the leftover goes.


def test_a_rewritten_tiff_makes_the_output_stale(kaggle_copy, tmp_path):
  out = tmp_path / 'rec'
  run_convert(kaggle_copy, out, per_class=0)
  victim = read_split(out, 'val')[0][0]
  path = kaggle_copy / 'train' / f'{victim}.tif'
  pixels = tiff.read_patch(str(path))
  with open(path, 'wb') as f:
    synthetic.write_tiff(f, 255 - pixels)  # Same size, new pixels.
  with pytest.raises(outdir.OutDirError, match='stale'):
    run_convert(kaggle_copy, out, per_class=0)
  run_convert(kaggle_copy, out, per_class=0, overwrite=True)
  got = {i: image for i, _, image in read_split(out, 'val')}
  assert got[victim] == (255 - pixels)[32:64, 32:64].tobytes()


def test_csv_row_order_changes_no_byte(kaggle_copy, tmp_path):
  frame = pd.read_csv(kaggle_copy / 'train_labels.csv', dtype=str)
  a = run_convert(kaggle_copy, tmp_path / 'a', per_class=20, val_fraction=0.25, seed=4)
  frame.iloc[::-1].to_csv(kaggle_copy / 'train_labels.csv', index=False)
  b = run_convert(kaggle_copy, tmp_path / 'b', per_class=20, val_fraction=0.25, seed=4)
  frame.sample(frac=1, random_state=1).to_csv(kaggle_copy / 'train_labels.csv', index=False)
  c = run_convert(kaggle_copy, tmp_path / 'c', per_class=20, val_fraction=0.25, seed=4)
  assert shard_bytes(tmp_path / 'a') == shard_bytes(tmp_path / 'b') == shard_bytes(tmp_path / 'c')
  assert a['fingerprint'] == b['fingerprint'] == c['fingerprint']


def test_leftovers_of_killed_runs_never_reach_an_output(kaggle_dir, tmp_path):
  out = tmp_path / 'rec'
  run_convert(kaggle_dir, out, seed=1)
  old = tmp_path / '.rec.old-4242'  # A kill between the two renames of a swap.
  old.mkdir()
  (old / 'manifest.json').write_text('{}')
  planned = plan.make_plan(kaggle.read_source(str(kaggle_dir)), crop_size=32, per_class=0,
                           val_fraction=0.2, seed=2)
  partial = tmp_path / f'.rec.partial-{planned["fingerprint"][:16]}'
  partial.mkdir()  # A kill mid-write: a sidecar's temporary and a half shard.
  (partial / 'train-00000-of-00032.tfrecord.done.json.tmp').write_text('{"sha256": "x"')
  (partial / 'train-00001-of-00032.tfrecord.partial').write_bytes(b'half')
  manifest = run_convert(kaggle_dir, out, seed=2, overwrite=True)
  listed = {s['file'] for info in manifest['splits'].values() for s in info['shards']}
  assert set(os.listdir(out)) == listed | {schema.MANIFEST_NAME, *tfds_metadata.NAMES}
  assert tfds_metadata.check(str(out), manifest)  # Of the new conversion, not the old.
  assert [p for p in os.listdir(tmp_path) if p.startswith('.')] == []
