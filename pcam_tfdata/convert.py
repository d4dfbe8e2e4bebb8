"""Turns a Kaggle-layout folder into balanced, split, center-cropped TFRecord shards.

The run is atomic and resumable: shards go into a hidden sibling folder named
after a fingerprint of the plan (settings, every id and label, and the size
and modification time of every patch file); each shard
is committed on its own, a rerun after a kill redoes only unfinished shards,
and the folder is renamed into place after `manifest.json` is written. Same
inputs and seed give byte-identical shards, whatever the number of workers.
"""

import functools
import glob
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import threading
import time

import numpy as np
import tqdm

from pcam_tfdata import duplicates
from pcam_tfdata import outdir
from pcam_tfdata import records
from pcam_tfdata import schema
from pcam_tfdata import splits
from pcam_tfdata import tiff

# 16 input pipelines with two files each to interleave.
TRAIN_MIN_SHARDS = 32
EVAL_MIN_SHARDS = 4
_RECORD_OVERHEAD = 100  # Bytes of Example and framing around each image.


class ConvertError(ValueError):
  """The conversion cannot go ahead as asked."""


def check_settings(crop_size, per_class, val_fraction, num_shards, workers):
  """Raises ConvertError naming the flag for a bad setting."""
  if not (2 <= crop_size <= schema.PATCH_SIZE and crop_size % 2 == 0):
    raise ConvertError(f'--crop_size={crop_size}: must be even, 2..{schema.PATCH_SIZE}')
  if per_class < 0:
    raise ConvertError(f'--per_class={per_class}: must be >= 0 (0 keeps every example)')
  if not 0 < val_fraction < 1:
    raise ConvertError(f'--val_fraction={val_fraction}: must be strictly between 0 and 1')
  if num_shards < 0:
    raise ConvertError(f'--num_shards={num_shards}: must be >= 0 (0 picks a count)')
  if workers < 1:
    raise ConvertError(f'--workers={workers}: must be >= 1')


def make_plan(source, *, crop_size, per_class, val_fraction, seed, groups=None,
              num_shards=0, skip_bad=False, num_folds=0, fold=0, dropped_ids=None):
  """Decides which example goes to which shard, in which order.

  Args:
    source: a kaggle.KaggleSource.
    crop_size, per_class, val_fraction, seed, num_shards, skip_bad: as the
      flags of tools/make_records.py.
    groups: optional array of group names aligned with `source.ids`; no group
      then appears in both train and val.
    num_folds, fold: K-fold cross-validation (num_folds >= 2): val is fold
      `fold` of `splits.assign_folds`, train the other folds; `val_fraction`
      is then unused. The folds depend only on the ids, labels, groups and
      seed, so the K conversions partition the kept examples.
    dropped_ids: labelled ids left out before anything else (duplicates,
      from `find_source_duplicates`); None when not asked, which keeps the
      fingerprint of conversions made before the option.

  Returns:
    A dict: `settings`, `splits` ({split: list of (id, label, path)}),
    `num_shards` ({split: int}) and `fingerprint` (hex digest of them all).

  Raises:
    ConvertError: the data cannot satisfy the settings.
  """
  rng = np.random.default_rng(seed)
  # Everything below sees the examples sorted by id: the CSV's row order then
  # changes nothing, neither which examples are kept nor where they go.
  order = np.argsort(source.ids, kind='stable')
  if dropped_ids is not None:
    order = order[~np.isin(source.ids[order], dropped_ids)]
  ids, labels = source.ids[order], source.labels[order]
  groups = None if groups is None else np.asarray(groups)[order]
  kept_groups = lambda kept: None if groups is None else groups[kept]
  try:
    kept = splits.balance(ids, labels, per_class, rng)
    if num_folds:
      splits.check_fold(num_folds, fold)
      folds = splits.assign_folds(labels[kept], num_folds, rng, kept_groups(kept))
      train = rng.permutation(np.flatnonzero(folds != fold))
      val = rng.permutation(np.flatnonzero(folds == fold))
    else:
      train, val = splits.split_train_val(labels[kept], val_fraction, rng, kept_groups(kept))
  except ValueError as e:
    raise ConvertError(str(e)) from None
  plan_splits = {}
  for name, index in (('train', kept[train]), ('val', kept[val])):
    plan_splits[name] = [(i, int(l), source.train_path(i))
                         for i, l in zip(ids[index].tolist(), labels[index].tolist())]
  if len(source.test_ids):
    plan_splits['test'] = [(i, schema.TEST_LABEL, source.test_path(i))
                           for i in sorted(source.test_ids.tolist())]

  shard_counts = count_shards({n: len(e) for n, e in plan_splits.items()}, crop_size, num_shards)

  settings = {'source': 'kaggle', 'crop_size': crop_size, 'per_class': per_class,
              'val_fraction': None if num_folds else val_fraction, 'seed': seed,
              'grouped': groups is not None, 'skip_bad': skip_bad,
              'format_version': schema.FORMAT_VERSION}
  if num_folds:  # (Absent otherwise: earlier conversions keep their fingerprint.)
    settings.update(num_folds=num_folds, fold=fold)
  if dropped_ids is not None:
    settings['drop_duplicates'] = True
  digest = hashlib.sha256(json.dumps([settings, shard_counts]).encode())
  for name in sorted(plan_splits):
    digest.update(json.dumps([name, plan_splits[name]]).encode())
  # The pixels, cheaply: the size and modification time of every patch file
  # read, so a rewritten TIFF makes a finished output stale and a resume of
  # old shards impossible (as `make`, rsync and the HDF5 source do).
  # (The path is already in the digest above; one update per split, not per file.)
  for name in sorted(plan_splits):
    digest.update(''.join(_file_stamp(path) for _, _, path in plan_splits[name]).encode())
  return {'settings': settings, 'splits': plan_splits, 'num_shards': shard_counts,
          'fingerprint': digest.hexdigest()}


def _file_stamp(path):
  try:
    stat = os.stat(path)
  except OSError:  # Gone since the folder was listed; the shard writer reports it.
    return 'missing\n'
  return f'{stat.st_size},{stat.st_mtime_ns}\n'


def count_shards(split_sizes, crop_size, num_shards):
  """Shards per split: `num_shards` (0: auto) for train, auto for the others.

  Raises:
    ConvertError: more train shards asked for than train examples.
  """
  record_bytes = crop_size * crop_size * 3 + _RECORD_OVERHEAD
  counts = {}
  for name, size in split_sizes.items():
    is_train = name == 'train'
    if is_train and num_shards > size:
      raise ConvertError(f'--num_shards={num_shards} but the train split holds only '
                         f'{size} examples')
    counts[name] = splits.num_shards_for(
        size, record_bytes, TRAIN_MIN_SHARDS if is_train else EVAL_MIN_SHARDS,
        num_shards if is_train else 0)
  return counts


def _make_tasks(plan, work_dir):
  tasks = []
  for name, examples in plan['splits'].items():
    total = plan['num_shards'][name]
    for index, (start, stop) in enumerate(splits.shard_ranges(len(examples), total)):
      tasks.append({'split': name,
                    'path': os.path.join(work_dir, schema.shard_name(name, index, total)),
                    'examples': examples[start:stop],
                    'crop_size': plan['settings']['crop_size'],
                    'patch_size': schema.PATCH_SIZE,
                    'skip_bad': plan['settings']['skip_bad']})
  return tasks


_progress = None  # Per worker process: the shared count of records done.


def _init_worker(counter):
  global _progress
  _progress = counter


def _call(fn, task):
  return fn(task, _progress)


def _start_method():
  """`fork` where it is safe, else `spawn`.

  Forking is instant, where `spawn` re-imports the caller's modules in every
  worker (about 0.4 s each here, a tenth of converting the full set). It is
  safe only while this process runs a single thread: a forked copy of another
  thread's held lock (TensorFlow's pools in tests and notebooks, a progress
  bar's monitor) can deadlock the worker. So the pool starts before the bar.
  """
  if ('fork' in multiprocessing.get_all_start_methods() and threading.active_count() == 1
      and 'tensorflow' not in sys.modules):
    return 'fork'
  return 'spawn'


def _run_tasks(fn, tasks, workers, total, initial, show_progress, desc='converting'):
  """Runs `fn(task, counter)` on each task, in worker processes when workers > 1.

  Yields the results in completion order; the first task that fails raises at
  once. `fn` adds what it has done to the shared counter, which a progress
  bar of `total` follows.
  """
  ctx = multiprocessing.get_context(_start_method())
  counter = ctx.Value('q', 0)
  pool = None
  if workers > 1 and len(tasks) > 1:
    pool = ctx.Pool(min(workers, len(tasks)), initializer=_init_worker, initargs=(counter,))
  bar = tqdm.tqdm(total=total, initial=initial, unit='img', desc=desc,
                  disable=not show_progress, smoothing=0.1)
  stop = threading.Event()
  def poll():  # Workers add to `counter`; the bar follows it.
    while not stop.wait(0.2):
      bar.update(initial + counter.value - bar.n)
  poller = threading.Thread(target=poll, daemon=True)
  poller.start()
  try:
    if pool is None:
      for task in tasks:
        yield fn(task, counter)
    else:
      yield from pool.imap_unordered(functools.partial(_call, fn), tasks)
      pool.close()
  finally:
    if pool is not None:
      pool.terminate()
      pool.join()
    stop.set()
    poller.join()
    bar.update(initial + counter.value - bar.n)
    bar.close()


_KEY_CHUNK = 1024  # Files per task of the duplicate scan.


def find_source_duplicates(source, *, workers=1, skip_bad=False, show_progress=True):
  """Every labelled and test patch file keyed, and what --drop_duplicates leaves out.

  One patch of each pixel-identical group is kept: a test patch when the
  group holds any (the submission needs every test id; then all labelled
  copies go), else the labelled one of smallest id. Labels play no part, so
  every fold's conversion drops the same ids.

  Returns:
    (dropped_ids, info): array of labelled ids to leave out, and the
    manifest's record of them (`count`, `groups`, `label_conflicts`, and
    every dropped id with the id it duplicates).

  Raises:
    tiff.BadImageError: an unreadable patch, unless `skip_bad`.
  """
  ids = np.concatenate([np.sort(source.ids), source.test_ids]).astype(str)
  paths = ([source.train_path(i) for i in ids[:len(source.ids)]] +
           [source.test_path(i) for i in source.test_ids])
  # Chunks of up to 1,024 files, at least 4 per worker (load balance).
  chunk = max(1, min(_KEY_CHUNK, -(-len(paths) // (4 * workers))))
  tasks = [{'start': s, 'paths': paths[s:s + chunk], 'patch_size': schema.PATCH_SIZE,
            'skip_bad': skip_bad} for s in range(0, len(paths), chunk)]
  keys = np.zeros(len(paths), np.int64)
  for result in _run_tasks(records.key_patches, tasks, workers, len(paths), 0, show_progress,
                           desc='duplicate scan'):
    keys[result['start']:result['start'] + len(result['keys'])] = result['keys']
  groups = duplicates.find_groups(keys, lambda idx: _read_files(paths, idx))
  is_test = np.arange(len(ids)) >= len(source.ids)
  dropped, same_as = duplicates.drop_plan(groups, np.zeros(len(ids)), fixed=is_test)
  by_id = dict(zip(source.ids.tolist(), source.labels.tolist()))
  labels = np.asarray([by_id.get(i, schema.TEST_LABEL) for i in ids.tolist()])
  summary = duplicates.summarize(groups, ids, np.where(is_test, 'test', 'labelled'), labels,
                                 schema.TEST_LABEL)
  info = duplicates.describe_dropped(ids, dropped, same_as, summary)
  return ids[dropped], info


def check_before_scan(source, per_class, num_folds, fold):
  """Raises ConvertError for --per_class or --fold errors that dropping could only worsen."""
  try:
    splits.check_per_class(source.labels, per_class)
    splits.check_fold(num_folds, fold)
  except ValueError as e:
    raise ConvertError(str(e)) from None


def _read_files(paths, indices):
  return ((i, tiff.read_patch(paths[i])) for i in indices)


def convert(source, out_dir, *, crop_size=32, per_class=50000, val_fraction=0.2, seed=0,
            groups=None, num_shards=0, workers=1, skip_bad=False, overwrite=False,
            replace_stale=False, flags=None, eda=True, show_progress=True, log=print,
            num_folds=0, fold=0, drop_duplicates=False):
  """Converts a checked source folder into records; see the module docstring.

  Args:
    source: a kaggle.KaggleSource (its `missing` ids are skipped and listed).
    out_dir: the records folder to create.
    crop_size, per_class, val_fraction, seed, groups, num_shards, skip_bad,
      num_folds, fold: see `make_plan`.
    drop_duplicates: leave out all but one patch of each pixel-identical
      group before balancing (see `find_source_duplicates`).
    workers: processes that write shards.
    overwrite: rebuild a finished output (only one with this tool's manifest).
    replace_stale: rebuild a finished output only if it is of other inputs or
      settings (the demo's default).
    flags: dict recorded in the manifest as given.
    eda: also write the EDA pictures.
    show_progress: show a tqdm bar.
    log: where one-line progress messages go.

  Returns:
    The manifest (dict).

  Raises:
    ConvertError: bad settings or output folder; tiff.BadImageError: a bad
      patch without `skip_bad`.
  """
  start = time.time()
  check_settings(crop_size, per_class, val_fraction, num_shards, workers)
  outdir.check_paths(source.data_dir, out_dir)
  dropped_ids, dropped = None, None
  if drop_duplicates:
    # What can fail without the scan fails before it (a full read of the data).
    check_before_scan(source, per_class, num_folds, fold)
    dropped_ids, dropped = find_source_duplicates(source, workers=workers, skip_bad=skip_bad,
                                                  show_progress=show_progress)
  plan = make_plan(source, crop_size=crop_size, per_class=per_class,
                   val_fraction=val_fraction, seed=seed, groups=groups,
                   num_shards=num_shards, skip_bad=skip_bad, num_folds=num_folds, fold=fold,
                   dropped_ids=dropped_ids)
  # The folder itself, not a link to it: the swap renames folders, and
  # renaming a link would leave the old records where it pointed.
  out_dir = os.path.realpath(out_dir)
  if os.path.isdir(os.path.dirname(out_dir)):
    outdir.clean_leftovers(out_dir, log)  # Also when there is nothing else to do.
  existing = outdir.check_out_dir(out_dir, plan['fingerprint'], overwrite, replace_stale)
  if existing is not None:
    log(f'{out_dir}: already complete for these inputs and settings; nothing to do '
        '(--overwrite rebuilds it)')
    return existing

  parent, name = os.path.split(out_dir)
  os.makedirs(parent, exist_ok=True)
  work_dir = os.path.join(parent, f'.{name}.partial-{plan["fingerprint"][:16]}')
  for stale in glob.glob(os.path.join(glob.escape(parent), f'.{glob.escape(name)}.partial-*')):
    if stale != work_dir:
      log(f'removing the unfinished run of other settings {stale}')
      shutil.rmtree(stale)
  os.makedirs(work_dir, exist_ok=True)

  tasks = _make_tasks(plan, work_dir)
  done = {t['path']: records.load_done(t['path']) for t in tasks}
  todo = [t for t in tasks if done[t['path']] is None]
  resumed = sum(len(t['examples']) for t in tasks if done[t['path']] is not None)
  if resumed:
    log(f'resuming {work_dir}: {len(tasks) - len(todo)} of {len(tasks)} shards already written')
  total = sum(len(t['examples']) for t in tasks)
  # Largest shards first keeps the workers busy until the end.
  largest_first = sorted(todo, key=lambda t: -len(t['examples']))
  for stats in _run_tasks(records.write_shard, largest_first, workers, total, resumed,
                          show_progress):
    done[os.path.join(work_dir, stats['file'])] = stats

  manifest = _make_manifest(plan, tasks, done, source, flags)
  manifest['duplicates'] = _output_duplicates(tasks, done)
  if dropped is not None:
    manifest['duplicates']['dropped'] = dropped
  if eda:
    from pcam_tfdata import eda as eda_lib  # pylint: disable=g-import-not-at-top
    eda_lib.write_pictures(work_dir, manifest, eda_lib.samples_from_files(plan['splits']['train']))
  manifest['seconds'] = round(time.time() - start, 3)
  outdir.finish(work_dir, out_dir, manifest)
  return manifest


def _output_duplicates(tasks, done):
  """The manifest's `duplicates`: pixel-identical groups among the examples written."""
  ids, names, labels, paths, keys = [], [], [], [], []
  for t in tasks:
    for (i, label, path), key in zip(t['examples'], done[t['path']]['keys']):
      if key != duplicates.NO_KEY:  # Skipped: not written.
        ids.append(i)
        names.append(t['split'])
        labels.append(label)
        paths.append(path)
        keys.append(key)
  groups = duplicates.find_groups(keys, lambda idx: _read_files(paths, idx))
  # Ordered by id within each group, so the examples shown do not depend on shards.
  order = np.argsort(ids, kind='stable')
  rank = np.empty(len(ids), np.int64)
  rank[order] = np.arange(len(ids))
  groups = sorted((g[np.argsort(rank[g])] for g in groups), key=lambda g: rank[g[0]])
  return duplicates.summarize(groups, np.asarray(ids), np.asarray(names), np.asarray(labels),
                              schema.TEST_LABEL)


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
      raise ConvertError(f'split {name}: no example could be written '
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
