"""Converts a PCam HDF5 folder (`pcam_h5.read_source`) into the records of the Kaggle source.

PCam's own splits are kept (train, valid -> val, test with its labels)
unless a re-split is asked for; x is streamed in file order, a block at a
time, and dealt to the shards as it comes, so memory stays bounded. Records,
shard names, manifest and pictures are those of the Kaggle source.
"""

import collections
import hashlib
import json
import os
import time

import numpy as np

from pcam_tfdata import progress
from pcam_tfdata.convert import duplicates
from pcam_tfdata.convert import outdir
from pcam_tfdata.convert import pcam_h5
from pcam_tfdata.convert import plan as plan_lib
from pcam_tfdata.convert import shards
from pcam_tfdata.convert import splits
from pcam_tfdata import schema

def _plan(source, *, crop_size, per_class, val_fraction, seed, resplit, num_shards,
          dropped=None):
  """{our split: [(PCam split, sorted indices)]} and shard counts.

  `dropped` ({PCam split: indices}) are left out before anything else.
  """
  rng = np.random.default_rng(seed)
  dropped = dropped or {}
  def undropped(split):  # Indices of `split` not dropped.
    return np.setdiff1d(np.arange(source[split].count), dropped.get(split, []))
  targets = {}  # our split -> list of (pcam split, indices)
  if resplit:
    pool = [s for s in ('train', 'valid') if s in source]
    if not pool:
      raise plan_lib.ConvertError('a re-split needs the train or valid files')
    names = np.concatenate([[s] * len(undropped(s)) for s in pool])
    index = np.concatenate([undropped(s) for s in pool])
    labels = np.concatenate([source[s].labels[undropped(s)] for s in pool])
    ids = np.asarray([pcam_h5.example_id(s, i) for s, i in zip(names, index)])
    slides = None
    if all(source[s].slides is not None for s in pool):
      slides = np.concatenate([source[s].slides[undropped(s)] for s in pool])
    try:
      kept = splits.balance(ids, labels, per_class, rng)
      train, val = splits.split_train_val(
          labels[kept], val_fraction, rng, None if slides is None else slides[kept])
    except ValueError as e:
      raise plan_lib.ConvertError(str(e)) from None
    for ours, chosen in (('train', kept[train]), ('val', kept[val])):
      targets[ours] = [(s, np.sort(index[chosen][names[chosen] == s])) for s in pool]
    if 'test' in source:
      targets['test'] = [('test', undropped('test'))]
  else:
    for pcam, ours in pcam_h5.PCAM_SPLITS.items():
      if pcam in source:
        targets[ours] = [(pcam, undropped(pcam))]
  sizes = {ours: sum(len(i) for _, i in parts) for ours, parts in targets.items()}
  for ours, size in sizes.items():
    if not size:  # As TFDS's writer: a split with no example is an error.
      why = ' (--drop_duplicates left out every one)' if dropped else ''
      raise plan_lib.ConvertError(f'split {ours}: no example to write{why}')
  return targets, plan_lib.count_shards(sizes, crop_size, num_shards)


def _fingerprint(source, settings, shard_counts, dropped=None):
  digest = hashlib.sha256(json.dumps([settings, shard_counts], sort_keys=True).encode())
  if dropped is not None:
    # What --drop_duplicates left out, as the Kaggle plan's ids cover it: an
    # output of another rule (an earlier version's) is then stale.
    digest.update(json.dumps({s: sorted(map(int, i)) for s, i in dropped.items()},
                             sort_keys=True).encode())
  for split in sorted(source):
    # The meta CSVs decide the slides, and so a re-split.
    for path in filter(None, (source[split].x_path, source[split].y_path,
                              source[split].meta_path)):
      stat = os.stat(path)
      digest.update(f'{path},{stat.st_size},{stat.st_mtime_ns}\n'.encode())
  return digest.hexdigest()


class _ShardSet:
  """The open shards of one split; examples are dealt to them in turn."""

  def __init__(self, work_dir, split, total):
    self._writers = [shards.ShardWriter(os.path.join(work_dir, schema.shard_name(split, i, total)))
                     for i in range(total)]
    self._next = 0

  def write(self, crop, label, example_id):
    self._writers[self._next].write(crop, label, example_id)
    self._next = (self._next + 1) % len(self._writers)

  def close(self):
    return [w.close() for w in self._writers]


@outdir.one_writer(lambda source: [os.path.dirname(s.x_path) for s in source.values()])
def convert(source, out_dir, *, crop_size=32, per_class=0, val_fraction=0.2, seed=0,
            resplit=False, num_shards=0, overwrite=False, replace_stale=False, flags=None,
            eda=True, show_progress=True, log=print, drop_duplicates=False):
  """Converts a PCam HDF5 folder (see `pcam_h5.read_source`) into records.

  PCam's own splits are kept (train, valid -> val, test with its labels)
  unless `resplit`: then train and valid are pooled, balanced to `per_class`
  (0 keeps all) and split by `val_fraction`, whole slides to one side when
  the meta CSVs name them. x is streamed in file order; within each block of
  2,048 patches a seeded permutation deals them to the split's shards in
  turn, so every shard spans the whole file and mixes classes.

  `drop_duplicates` first streams every x once more to find the groups of
  identical stored crops (which hold every group of identical patches),
  and keeps one patch of each: in test if the group has one there, else in
  valid, else train (the evaluation splits lose the least), the lowest
  index within a split. Every split here is labelled, test too: a group
  whose labels disagree keeps none of its patches, in test as well (see
  `duplicates.drop_plan`).

  Returns:
    The manifest (dict).

  Raises:
    plan.ConvertError, pcam_h5.SourceError, outdir.OutDirError: bad settings,
    input or output folder, one line each; folderlock.FolderBusy: another
    conversion writes `out_dir`.
  """
  start = time.time()
  plan_lib.check_settings(crop_size, per_class, val_fraction, num_shards, 1)
  dropped = _find_duplicates(source, crop_size, show_progress) if drop_duplicates else None
  targets, shard_counts = _plan(source, crop_size=crop_size, per_class=per_class,
                                val_fraction=val_fraction, seed=seed, resplit=resplit,
                                num_shards=num_shards, dropped=dropped and dropped['indices'])
  settings = {'source': 'pcam_h5', 'crop_size': crop_size, 'resplit': resplit,
              'per_class': per_class if resplit else None,
              'val_fraction': val_fraction if resplit else None, 'seed': seed,
              'format_version': schema.FORMAT_VERSION}
  if drop_duplicates:  # (Absent otherwise: earlier conversions keep their fingerprint.)
    settings['drop_duplicates'] = True
  fingerprint = _fingerprint(source, settings, shard_counts,
                             dropped and dropped['indices'])
  # Shards are written side by side, all open at once: nothing to resume.
  out_dir, work_dir, existing = outdir.prepare(out_dir, fingerprint, overwrite=overwrite,
                                               replace_stale=replace_stale, resume=False,
                                               log=log)
  if existing is not None:
    return existing
  rng = np.random.default_rng([seed, 1])
  total = sum(len(i) for parts in targets.values() for _, i in parts)
  split_stats, samples, written = {}, {0: [], 1: []}, []
  with progress.Progress(total, 'converting', images_per_step=None, unit='img', leave=True,
                         enabled=show_progress) as bar:
    for ours, parts in targets.items():
      shard_set = _ShardSet(work_dir, ours, shard_counts[ours])
      for pcam, indices in parts:
        for index, keys in _stream_split(source[pcam], indices, crop_size, rng, shard_set,
                                         samples, bar):
          written.append((ours, pcam, index, *keys))
      split_stats[ours] = shard_set.close()

  manifest = _manifest(source, targets, split_stats, settings, fingerprint, crop_size, flags)
  manifest['duplicates'] = _written_duplicates(source, written, crop_size)
  if dropped is not None:
    manifest['duplicates']['dropped'] = dropped['info']
  if eda:
    from pcam_tfdata.convert import eda as eda_lib  # pylint: disable=g-import-not-at-top
    eda_lib.write_pictures(work_dir, manifest, samples)
  manifest['seconds'] = round(time.time() - start, 3)
  outdir.finish(work_dir, out_dir, manifest)
  return manifest


def _stream_split(split, indices, crop_size, rng, shard_set, samples, bar):
  """Deals the crops of x[`indices`] (sorted) to shards; yields (index, (patch key, crop key))."""
  c = (schema.PATCH_SIZE - crop_size) // 2
  for lo, block, wanted in pcam_h5.blocks(split, indices):
    crops = block[:, c:c + crop_size, c:c + crop_size]
    for i in rng.permutation(wanted):
      label = int(split.labels[i])
      ident = pcam_h5.example_id(split.name, int(i))
      crop = crops[i - lo].tobytes()
      shard_set.write(crop, label, ident)
      yield int(i), duplicates.patch_keys(block[i - lo], crop_size, crop)
      if len(samples[label]) < 8:
        samples[label].append((ident, block[i - lo].copy()))
    bar.advance(len(wanted))


def _find_duplicates(source, crop_size, show_progress):
  """What --drop_duplicates leaves out: {'indices': {PCam split: indices}, 'info'}."""
  refs, keys, crop_keys = [], [], []
  total = sum(s.count for s in source.values())
  with progress.Progress(total, 'duplicate scan', images_per_step=None, unit='img',
                         leave=True, enabled=show_progress) as bar:
    for name in ('test', 'valid', 'train'):  # Also the order of preference for the kept one.
      if name in source:
        for lo, block, wanted in pcam_h5.blocks(source[name], np.arange(source[name].count)):
          refs.extend((name, int(i)) for i in wanted)
          for patch in block:
            key, crop_key = duplicates.patch_keys(patch, crop_size)
            keys.append(key)
            crop_keys.append(crop_key)
          bar.advance(len(wanted))
  patch_groups, crop_groups = duplicates.find_groups(
      keys, lambda idx: pcam_h5.read_patches(source, refs, idx), crop_size, crop_keys)
  labels = np.asarray([source[s].labels[i] for s, i in refs])
  plan = duplicates.drop_plan(crop_groups, patch_groups, np.zeros(len(refs)), labels)
  indices = {}
  for d in plan.dropped:
    indices.setdefault(refs[d][0], []).append(refs[d][1])
  ids = np.asarray([pcam_h5.example_id(s, i) for s, i in refs])
  return {'indices': indices, 'info': duplicates.describe_dropped(ids, plan)}


def _written_duplicates(source, written, crop_size):
  """The manifest's `duplicates` for `written`: (our split, PCam split, index, key, crop key)."""
  written = sorted(written, key=lambda w: pcam_h5.example_id(w[1], w[2]))  # By id.
  refs = [w[1:3] for w in written]
  patch_groups, crop_groups = duplicates.find_groups(
      [w[3] for w in written], lambda idx: pcam_h5.read_patches(source, refs, idx), crop_size,
      [w[4] for w in written])
  return duplicates.summarize(
      patch_groups, crop_groups, crop_size,
      np.asarray([pcam_h5.example_id(w[1], w[2]) for w in written]),
      np.asarray([w[0] for w in written]),
      np.asarray([source[w[1]].labels[w[2]] for w in written]))


def _manifest(source, targets, split_stats, settings, fingerprint, crop_size, flags):
  split_info = {}
  for ours, stats in split_stats.items():
    label_counts = collections.Counter()
    for s in stats:
      label_counts.update(s['label_counts'])
    info = {'count': sum(s['count'] for s in stats), 'skipped': 0,
            'label_counts': dict(sorted(label_counts.items())),
            'shards': [{k: s[k] for k in ('file', 'count', 'sha256')} for s in stats],
            'from': {p: int(len(i)) for p, i in targets[ours]}}
    slides = [source[p].slides[i] for p, i in targets[ours] if source[p].slides is not None]
    if slides:
      info['slides'] = int(len(np.unique(np.concatenate(slides))))
    split_info[ours] = info
  all_labels = np.concatenate([s.labels for s in source.values()])
  values, counts = np.unique(all_labels, return_counts=True)
  return {
      **schema.manifest_header(crop_size),
      'splits': split_info,
      'source': {
          'kind': 'pcam_h5',
          'data_dir': os.path.dirname(next(iter(source.values())).x_path),
          'files': {s.name: {'x': os.path.basename(s.x_path), 'y': os.path.basename(s.y_path),
                             'meta': s.meta_path and os.path.basename(s.meta_path),
                             'count': s.count} for s in source.values()},
          'label_counts': {str(v): int(c) for v, c in zip(values, counts)},
      },
      'settings': settings,
      'flags': flags or {},
      'fingerprint': fingerprint,
      'skipped': [],
  }
