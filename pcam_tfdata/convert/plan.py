"""The plan of a conversion: which example goes to which shard, decided before any pixel is read.

The plan depends on the settings, the ids, labels and groups, and the seed,
never on the CSV's row order or the number of workers; its fingerprint (which
also covers the size and modification time of every patch file) names the
conversion, so a rerun knows whether an output or a half-written run is of
the same inputs.
"""

import hashlib
import json
import os

import numpy as np

from pcam_tfdata.convert import splits
from pcam_tfdata import schema

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


def make_tasks(plan, work_dir):
  """One task per shard: its path in `work_dir` and its examples, as shards.write_shard takes it."""
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


def check_before_scan(source, per_class, num_folds, fold):
  """Raises ConvertError for --per_class or --fold errors that dropping could only worsen."""
  try:
    splits.check_per_class(source.labels, per_class)
    splits.check_fold(num_folds, fold)
  except ValueError as e:
    raise ConvertError(str(e)) from None


