"""Turns a Kaggle-layout folder into balanced, split, center-cropped TFRecord shards.

The run is atomic and resumable: shards go into a hidden sibling folder named
after a fingerprint of the plan (settings, every id and label, and the size
and modification time of every patch file); each shard
is committed on its own, a rerun after a kill redoes only unfinished shards,
and the folder is renamed into place after `manifest.json` is written. Same
inputs and seed give byte-identical shards, whatever the number of workers.
"""

import os
import time

import numpy as np

from pcam_tfdata.convert import duplicates
from pcam_tfdata.convert import outdir
from pcam_tfdata.convert import plan as plan_lib
from pcam_tfdata.convert import pool
from pcam_tfdata.convert import shards
from pcam_tfdata.convert import tiff
from pcam_tfdata import schema

_KEY_CHUNK = 1024  # Files per task of the duplicate scan.


def find_source_duplicates(source, *, crop_size, workers=1, skip_bad=False,
                           show_progress=True):
  """Every labelled and test patch file keyed, and what --drop_duplicates leaves out.

  Patches are grouped by their stored crop (the model sees nothing else),
  which also groups every set of identical full patches. Each group keeps
  its test patches when it holds any (the submission needs every test id;
  then all labelled members go), else its labelled member of smallest id;
  a group whose labelled members' labels disagree keeps none of them (see
  `duplicates.drop_plan`). Neither the seed nor the fold plays a part, so
  every fold's conversion drops the same ids.

  Returns:
    (dropped_ids, info): array of labelled ids to leave out, and the
    manifest's record of them (`duplicates.describe_dropped`).

  Raises:
    tiff.BadImageError: an unreadable patch, unless `skip_bad`.
  """
  ids = np.concatenate([np.sort(source.ids), source.test_ids]).astype(str)
  paths = ([source.train_path(i) for i in ids[:len(source.ids)]] +
           [source.test_path(i) for i in source.test_ids])
  # Chunks of up to 1,024 files, at least 4 per worker (load balance).
  chunk = max(1, min(_KEY_CHUNK, -(-len(paths) // (4 * workers))))
  tasks = [{'start': s, 'paths': paths[s:s + chunk], 'patch_size': schema.PATCH_SIZE,
            'crop_size': crop_size, 'skip_bad': skip_bad} for s in range(0, len(paths), chunk)]
  keys, crop_keys = np.zeros(len(paths), np.int64), np.zeros(len(paths), np.int64)
  for result in pool.run_tasks(shards.key_patches, tasks, workers, len(paths), 0, show_progress,
                           desc='duplicate scan'):
    at = slice(result['start'], result['start'] + len(result['keys']))
    keys[at], crop_keys[at] = result['keys'], result['crop_keys']
  patch_groups, crop_groups = duplicates.find_groups(
      keys, lambda idx: _read_files(paths, idx), crop_size, crop_keys)
  is_test = np.arange(len(ids)) >= len(source.ids)
  by_id = dict(zip(source.ids.tolist(), source.labels.tolist()))
  labels = np.asarray([by_id.get(i, schema.TEST_LABEL) for i in ids.tolist()])
  plan = duplicates.drop_plan(crop_groups, patch_groups, np.zeros(len(ids)), labels,
                              fixed=is_test, unlabelled=schema.TEST_LABEL)
  return ids[plan.dropped], duplicates.describe_dropped(ids, plan)


def _read_files(paths, indices):
  return ((i, tiff.read_patch(paths[i])) for i in indices)


@outdir.one_writer(lambda source: [source.data_dir])
def convert(source, out_dir, *, crop_size=32, per_class=50000, val_fraction=0.2, seed=0,
            groups=None, num_shards=0, workers=1, skip_bad=False, overwrite=False,
            replace_stale=False, flags=None, eda=True, show_progress=True, log=print,
            num_folds=0, fold=0, drop_duplicates=False):
  """Converts a checked source folder into records; see the module docstring.

  Args:
    source: a kaggle.KaggleSource (its `missing` ids are skipped and listed).
    out_dir: the records folder to create.
    crop_size, per_class, val_fraction, seed, groups, num_shards, skip_bad,
      num_folds, fold: see `plan.make_plan`.
    drop_duplicates: leave out all but one patch of each group of
      identical stored crops (none of a group with conflicting labels)
      before balancing (see `find_source_duplicates`).
    workers: processes that write shards.
    overwrite: rebuild a finished output (only one with this tool's manifest).
    replace_stale: rebuild a finished output only if it is of other inputs or
      settings (the demo's default).
    flags: dict recorded in the manifest as given.
    eda: also write the EDA pictures.
    show_progress: show a progress bar (a line every 30 s in a log file).
    log: where one-line progress messages go.

  Returns:
    The manifest (dict).

  Raises:
    plan.ConvertError: bad settings; outdir.OutDirError: an output folder
      it may not use; tiff.BadImageError: a bad patch without `skip_bad`;
    folderlock.FolderBusy: another conversion writes `out_dir`.
  """
  start = time.time()
  plan_lib.check_settings(crop_size, per_class, val_fraction, num_shards, workers)
  dropped_ids, dropped = None, None
  if drop_duplicates:
    # What can fail without the scan fails before it (a full read of the data).
    plan_lib.check_before_scan(source, per_class, num_folds, fold)
    dropped_ids, dropped = find_source_duplicates(source, crop_size=crop_size, workers=workers,
                                                  skip_bad=skip_bad, show_progress=show_progress)
  plan = plan_lib.make_plan(source, crop_size=crop_size, per_class=per_class,
                            val_fraction=val_fraction, seed=seed, groups=groups,
                            num_shards=num_shards, skip_bad=skip_bad, num_folds=num_folds,
                            fold=fold, dropped_ids=dropped_ids)
  out_dir, work_dir, existing = outdir.prepare(out_dir, plan['fingerprint'], overwrite=overwrite,
                                               replace_stale=replace_stale, log=log)
  if existing is not None:
    return existing
  tasks = plan_lib.make_tasks(plan, work_dir)
  done = {t['path']: shards.load_done(t['path']) for t in tasks}
  todo = [t for t in tasks if done[t['path']] is None]
  resumed = sum(len(t['examples']) for t in tasks if done[t['path']] is not None)
  if resumed:
    log(f'resuming {work_dir}: {len(tasks) - len(todo)} of {len(tasks)} shards already written')
  total = sum(len(t['examples']) for t in tasks)
  # Largest shards first keeps the workers busy until the end.
  largest_first = sorted(todo, key=lambda t: -len(t['examples']))
  for stats in pool.run_tasks(shards.write_shard, largest_first, workers, total, resumed,
                          show_progress):
    done[os.path.join(work_dir, stats['file'])] = stats

  manifest = _make_manifest(plan, tasks, done, source, flags)
  manifest['duplicates'] = _output_duplicates(tasks, done, crop_size)
  if dropped is not None:
    manifest['duplicates']['dropped'] = dropped
  if eda:
    from pcam_tfdata.convert import eda as eda_lib  # pylint: disable=g-import-not-at-top
    eda_lib.write_pictures(work_dir, manifest, eda_lib.samples_from_files(plan['splits']['train']))
  manifest['seconds'] = round(time.time() - start, 3)
  outdir.finish(work_dir, out_dir, manifest)
  return manifest


def _output_duplicates(tasks, done, crop_size):
  """The manifest's `duplicates`: identical patches and stored crops among the examples written."""
  ids, names, labels, paths, keys, crop_keys = [], [], [], [], [], []
  for t in tasks:
    stats = done[t['path']]
    for (i, label, path), key, crop_key in zip(t['examples'], stats['keys'], stats['crop_keys']):
      if key != duplicates.NO_KEY:  # Skipped: not written.
        ids.append(i)
        names.append(t['split'])
        labels.append(label)
        paths.append(path)
        keys.append(key)
        crop_keys.append(crop_key)
  found = duplicates.find_groups(keys, lambda idx: _read_files(paths, idx), crop_size, crop_keys)
  # Ordered by id within each group, so the examples shown do not depend on shards.
  order = np.argsort(ids, kind='stable')
  rank = np.empty(len(ids), np.int64)
  rank[order] = np.arange(len(ids))
  patch_groups, crop_groups = (
      sorted((g[np.argsort(rank[g])] for g in groups), key=lambda g: rank[g[0]])
      for groups in found)
  return duplicates.summarize(patch_groups, crop_groups, crop_size, np.asarray(ids),
                              np.asarray(names), np.asarray(labels), schema.TEST_LABEL)


def _make_manifest(plan, tasks, done, source, flags):
  split_info, skipped = {}, []
  skipped.extend({'id': i, 'split': None, 'reason': r} for i, r in source.missing)
  for name in plan['splits']:
    shards = [done[t['path']] for t in tasks if t['split'] == name]
    label_counts = {}
    for s in shards:
      for label, n in s['label_counts'].items():
        label_counts[label] = label_counts.get(label, 0) + n
      skipped.extend({'id': x['id'], 'split': name, 'reason': x['reason']} for x in s['skipped'])
    count = sum(s['count'] for s in shards)
    if not count:  # As TFDS's writer: a split with no example is an error.
      raise plan_lib.ConvertError(f'split {name}: no example could be written '
                         f'({sum(len(s["skipped"]) for s in shards)} skipped)')
    split_info[name] = {
        'count': count,
        'skipped': sum(len(s['skipped']) for s in shards),
        'label_counts': dict(sorted(label_counts.items())),
        'shards': [{k: s[k] for k in ('file', 'count', 'sha256')} for s in shards],
    }
  crop = plan['settings']['crop_size']
  labels, counts = np.unique(source.labels, return_counts=True)
  return {
      **schema.manifest_header(crop),
      'splits': split_info,
      'source': {
          'kind': 'kaggle',
          'data_dir': source.data_dir,
          'labelled_with_file': len(source.ids),
          'label_counts': {str(l): int(c) for l, c in zip(labels, counts)},
          'missing_files': len(source.missing),
          'test_files': len(source.test_ids),
          'unlabelled_files': {'count': len(source.unlabelled),
                               'first': source.unlabelled[:20]},
      },
      'settings': plan['settings'],
      'flags': flags or {},
      'fingerprint': plan['fingerprint'],
      'skipped': skipped,
  }
