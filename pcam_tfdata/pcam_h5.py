"""The original PatchCamelyon HDF5 release as a second source, streamed in blocks.

    DATA_DIR/camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5[.gz]
    DATA_DIR/camelyonpatch_level_2_split_{train,valid,test}_meta.csv  (optional)

x is uint8 [N, 96, 96, 3], y is [N, 1, 1, 1] (0/1). Gzipped files are read
through a seekable decompressing reader, never unpacked to disk, and x is
read a block at a time in file order, so memory stays bounded whatever N is.
Records, shard names, manifest and pictures are those of the Kaggle source.
"""

import collections
import dataclasses
import hashlib
import importlib.util
import json
import os
import time

import numpy as np
import pandas as pd
import tqdm

from pcam_tfdata import convert
from pcam_tfdata import duplicates
from pcam_tfdata import gzip_reader
from pcam_tfdata import outdir
from pcam_tfdata import records
from pcam_tfdata import schema
from pcam_tfdata import splits

PCAM_SPLITS = {'train': 'train', 'valid': 'val', 'test': 'test'}  # PCam's name -> ours.
_PATTERN = 'camelyonpatch_level_2_split_{split}_{part}.h5'
_BLOCK = 2048  # Patches read per h5py call: 56 MiB of x at 96x96x3.


class SourceError(ValueError):
  """The folder or one of its HDF5 files is missing or malformed."""


@dataclasses.dataclass
class H5Split:
  name: str  # PCam's split name: train, valid or test.
  x_path: str
  y_path: str
  meta_path: str | None
  count: int
  labels: np.ndarray  # int64 [count], read whole: one byte per patch.
  slides: np.ndarray | None  # The whole-slide image of each patch, from the meta CSV.


def _find(data_dir, split, part):
  base = os.path.join(data_dir, _PATTERN.format(split=split, part=part))
  for path in (base, base + '.gz'):
    if os.path.isfile(path):
      return path
  return None


def _unreadable(path, what, error):
  hint = 'truncated or corrupt gzip, or ' if path.endswith('.gz') else ''
  return SourceError(f'{path}: {what} ({hint}not HDF5: {str(error).splitlines()[0]})')


def _open(path):
  import h5py  # pylint: disable=g-import-not-at-top
  try:
    raw = gzip_reader.SeekableGzip(path, SourceError) if path.endswith('.gz') else path
    return h5py.File(raw, 'r')
  except SourceError:
    raise
  except (OSError, ValueError, EOFError) as e:
    raise _unreadable(path, 'not a readable HDF5 file', e) from None


def _dataset(handle, path, key):
  if key not in handle:
    raise SourceError(f'{path}: no dataset {key!r} (has {", ".join(handle.keys()) or "none"})')
  return handle[key]


def read_source(data_dir):
  """Finds and checks every split of a PCam HDF5 folder.

  Returns:
    {PCam split name: H5Split}, for the splits present.

  Raises:
    SourceError: one line naming the folder or file: no folder, no files,
      an x without its y (or the reverse), wrong shapes or dtypes, x and y of
      different lengths, labels other than 0/1, a truncated gzip.
  """
  if importlib.util.find_spec('h5py') is None:
    raise SourceError("--source=pcam_h5 needs h5py: pip install -e '.[h5]'")
  data_dir = os.path.abspath(data_dir)
  if not os.path.isdir(data_dir):
    raise SourceError(f'{data_dir}: no such data folder')
  found = {}
  for split in PCAM_SPLITS:
    x_path, y_path = _find(data_dir, split, 'x'), _find(data_dir, split, 'y')
    if x_path is None and y_path is None:
      continue
    if x_path is None or y_path is None:
      have, lacking = (x_path, 'y') if x_path else (y_path, 'x')
      raise SourceError(f'{have}: no matching {_PATTERN.format(split=split, part=lacking)}'
                        '[.gz] beside it')
    found[split] = _check_split(data_dir, split, x_path, y_path)
  if not found:
    raise SourceError(f'{data_dir}: no {_PATTERN.format(split="{train,valid,test}", part="x")}'
                      '[.gz] files')
  return found


def _check_split(data_dir, split, x_path, y_path):
  with _open(x_path) as fx:
    x = _dataset(fx, x_path, 'x')
    if x.ndim != 4 or x.shape[1:] != (96, 96, 3) or x.dtype != np.uint8:
      raise SourceError(f'{x_path}: x is {x.dtype} {list(x.shape)}, expected uint8 '
                        '[N, 96, 96, 3]')
    count = x.shape[0]
  with _open(y_path) as fy:
    y = _dataset(fy, y_path, 'y')
    if y.shape[0] != count:
      raise SourceError(f'{y_path}: {y.shape[0]} labels but {x_path} holds {count} patches')
    if int(np.prod(y.shape[1:])) != 1 or not (np.issubdtype(y.dtype, np.integer)
                                             or y.dtype == bool):
      raise SourceError(f'{y_path}: y is {y.dtype} {list(y.shape)}, expected integer [N, 1, 1, 1]')
    try:
      labels = np.asarray(y[...]).reshape(-1).astype(np.int64)
    except (OSError, ValueError, EOFError) as e:
      raise _unreadable(y_path, 'labels unreadable', e) from None
  bad = np.flatnonzero((labels != 0) & (labels != 1))
  if len(bad):
    raise SourceError(f'{y_path}: label {labels[bad[0]]} at index {bad[0]} is not 0 or 1')
  meta_path = os.path.join(data_dir, f'camelyonpatch_level_2_split_{split}_meta.csv')
  slides = None
  if os.path.isfile(meta_path):
    meta = pd.read_csv(meta_path)
    if len(meta) != count:
      raise SourceError(f'{meta_path}: {len(meta)} rows but {x_path} holds {count} patches')
    if 'wsi' in meta.columns:
      slides = meta['wsi'].astype(str).to_numpy()
  else:
    meta_path = None
  return H5Split(split, x_path, y_path, meta_path, count, labels, slides)


def example_id(split, index):
  """A stable id that says where the patch came from, e.g. pcam-train-000123."""
  return f'pcam-{split}-{index:06d}'


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
      raise convert.ConvertError('a re-split needs the train or valid files')
    names = np.concatenate([[s] * len(undropped(s)) for s in pool])
    index = np.concatenate([undropped(s) for s in pool])
    labels = np.concatenate([source[s].labels[undropped(s)] for s in pool])
    ids = np.asarray([example_id(s, i) for s, i in zip(names, index)])
    slides = None
    if all(source[s].slides is not None for s in pool):
      slides = np.concatenate([source[s].slides[undropped(s)] for s in pool])
    try:
      kept = splits.balance(ids, labels, per_class, rng)
      train, val = splits.split_train_val(
          labels[kept], val_fraction, rng, None if slides is None else slides[kept])
    except ValueError as e:
      raise convert.ConvertError(str(e)) from None
    for ours, chosen in (('train', kept[train]), ('val', kept[val])):
      targets[ours] = [(s, np.sort(index[chosen][names[chosen] == s])) for s in pool]
    if 'test' in source:
      targets['test'] = [('test', undropped('test'))]
  else:
    for pcam, ours in PCAM_SPLITS.items():
      if pcam in source:
        targets[ours] = [(pcam, undropped(pcam))]
  sizes = {ours: sum(len(i) for _, i in parts) for ours, parts in targets.items()}
  for ours, size in sizes.items():
    if not size:  # As TFDS's writer: a split with no example is an error.
      why = ' (--drop_duplicates left out every one as a copy)' if dropped else ''
      raise convert.ConvertError(f'split {ours}: no example to write{why}')
  return targets, convert.count_shards(sizes, crop_size, num_shards)


def _fingerprint(source, settings, shard_counts):
  digest = hashlib.sha256(json.dumps([settings, shard_counts], sort_keys=True).encode())
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
    self._writers = [records.ShardWriter(os.path.join(work_dir, schema.shard_name(split, i, total)))
                     for i in range(total)]
    self._next = 0

  def write(self, crop, label, example_id):
    self._writers[self._next].write(crop, label, example_id)
    self._next = (self._next + 1) % len(self._writers)

  def close(self):
    return [w.close() for w in self._writers]


def convert_h5(source, out_dir, *, crop_size=32, per_class=0, val_fraction=0.2, seed=0,
               resplit=False, num_shards=0, overwrite=False, flags=None, eda=True,
               show_progress=True, log=print, drop_duplicates=False):
  """Converts a PCam HDF5 folder (see `read_source`) into records.

  PCam's own splits are kept (train, valid -> val, test with its labels)
  unless `resplit`: then train and valid are pooled, balanced to `per_class`
  (0 keeps all) and split by `val_fraction`, whole slides to one side when
  the meta CSVs name them. x is streamed in file order; within each block of
  2,048 patches a seeded permutation deals them to the split's shards in
  turn, so every shard spans the whole file and mixes classes.

  `drop_duplicates` first streams every x once more to find pixel-identical
  groups, and keeps one patch of each: in test if the group has one there,
  else in valid, else train (the evaluation splits lose the least), the
  lowest index within a split.

  Returns:
    The manifest (dict).

  Raises:
    convert.ConvertError, SourceError: bad settings or input, one line each.
  """
  start = time.time()
  convert.check_settings(crop_size, per_class, val_fraction, num_shards, 1)
  for split in source.values():  # The folder of the files: no output inside it.
    outdir.check_paths(os.path.dirname(split.x_path), out_dir)
  dropped = _find_duplicates(source, show_progress) if drop_duplicates else None
  targets, shard_counts = _plan(source, crop_size=crop_size, per_class=per_class,
                                val_fraction=val_fraction, seed=seed, resplit=resplit,
                                num_shards=num_shards, dropped=dropped and dropped['indices'])
  settings = {'source': 'pcam_h5', 'crop_size': crop_size, 'resplit': resplit,
              'per_class': per_class if resplit else None,
              'val_fraction': val_fraction if resplit else None, 'seed': seed,
              'format_version': schema.FORMAT_VERSION}
  if drop_duplicates:  # (Absent otherwise: earlier conversions keep their fingerprint.)
    settings['drop_duplicates'] = True
  fingerprint = _fingerprint(source, settings, shard_counts)
  out_dir = os.path.realpath(out_dir)  # The folder, not a link to it (see convert.convert).
  if os.path.isdir(os.path.dirname(out_dir)):
    outdir.clean_leftovers(out_dir, log)
  existing = outdir.check_out_dir(out_dir, fingerprint, overwrite)
  if existing is not None:
    log(f'{out_dir}: already complete for these inputs and settings; nothing to do')
    return existing
  parent, name = os.path.split(out_dir)
  os.makedirs(parent, exist_ok=True)
  work_dir = os.path.join(parent, f'.{name}.partial-{fingerprint[:16]}')
  if os.path.exists(work_dir):  # Shards are written side by side: nothing to resume.
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(work_dir)
  os.makedirs(work_dir)

  rng = np.random.default_rng([seed, 1])
  total = sum(len(i) for parts in targets.values() for _, i in parts)
  split_stats, samples, written = {}, {0: [], 1: []}, []
  with tqdm.tqdm(total=total, unit='img', desc='converting', disable=not show_progress) as bar:
    for ours, parts in targets.items():
      shards = _ShardSet(work_dir, ours, shard_counts[ours])
      for pcam, indices in parts:
        for index, key in _stream_split(source[pcam], indices, crop_size, rng, shards, samples,
                                        bar):
          written.append((ours, pcam, index, key))
      split_stats[ours] = shards.close()

  manifest = _manifest(source, targets, split_stats, settings, fingerprint, crop_size, flags)
  manifest['duplicates'] = _written_duplicates(source, written)
  if dropped is not None:
    manifest['duplicates']['dropped'] = dropped['info']
  if eda:
    from pcam_tfdata import eda as eda_lib  # pylint: disable=g-import-not-at-top
    eda_lib.write_pictures(work_dir, manifest, samples)
  manifest['seconds'] = round(time.time() - start, 3)
  outdir.finish(work_dir, out_dir, manifest)
  return manifest


def _blocks(split, indices):
  """(lo, block of x[lo:lo + 2048], the sorted `indices` inside it), in file order."""
  with _open(split.x_path) as handle:
    x = handle['x']
    for lo in range(0, split.count, _BLOCK):
      hi = min(lo + _BLOCK, split.count)
      wanted = indices[(indices >= lo) & (indices < hi)]
      if not len(wanted):
        continue
      try:
        block = x[lo:hi]
      except (OSError, ValueError, EOFError) as e:
        raise _unreadable(split.x_path, f'patches {lo}..{hi} unreadable', e) from None
      yield lo, block, wanted


def _stream_split(split, indices, crop_size, rng, shards, samples, bar):
  """Deals the crops of x[`indices`] (sorted) to shards; yields (index, patch key)."""
  c = (schema.PATCH_SIZE - crop_size) // 2
  for lo, block, wanted in _blocks(split, indices):
    crops = block[:, c:c + crop_size, c:c + crop_size]
    for i in rng.permutation(wanted):
      label = int(split.labels[i])
      ident = example_id(split.name, int(i))
      shards.write(crops[i - lo].tobytes(), label, ident)
      yield int(i), duplicates.patch_key(block[i - lo])
      if len(samples[label]) < 8:
        samples[label].append((ident, block[i - lo].copy()))
    bar.update(len(wanted))


def _read_patches(source, refs, positions):
  """(position, full patch of refs[position]) for each of `positions`, a block at a time.

  `refs` is a list of (PCam split, index); the patches come in file order.
  """
  wanted = collections.defaultdict(dict)  # PCam split -> {index: position}
  for p in positions:
    split, index = refs[p]
    wanted[split][index] = p
  for split, positions_of in wanted.items():
    indices = np.fromiter(sorted(positions_of), np.int64)
    for lo, block, inside in _blocks(source[split], indices):
      for i in inside:
        yield positions_of[int(i)], block[i - lo]


def _find_duplicates(source, show_progress):
  """What --drop_duplicates leaves out: {'indices': {PCam split: indices}, 'info'}."""
  refs, keys = [], []
  total = sum(s.count for s in source.values())
  with tqdm.tqdm(total=total, unit='img', desc='duplicate scan',
                 disable=not show_progress) as bar:
    for name in ('test', 'valid', 'train'):  # Also the order of preference for the kept one.
      if name in source:
        for lo, block, wanted in _blocks(source[name], np.arange(source[name].count)):
          refs.extend((name, int(i)) for i in wanted)
          keys.extend(duplicates.patch_key(p) for p in block)
          bar.update(len(wanted))
  groups = duplicates.find_groups(keys, lambda idx: _read_patches(source, refs, idx))
  dropped, same_as = duplicates.drop_plan(groups, np.zeros(len(refs)))
  ids = np.asarray([example_id(s, i) for s, i in refs])
  labels = np.asarray([source[s].labels[i] for s, i in refs])
  summary = duplicates.summarize(groups, ids, np.asarray([PCAM_SPLITS[s] for s, _ in refs]),
                                 labels)
  indices = {}
  for d in dropped:
    indices.setdefault(refs[d][0], []).append(refs[d][1])
  info = duplicates.describe_dropped(ids, dropped, same_as, summary)
  return {'indices': indices, 'info': info}


def _written_duplicates(source, written):
  """The manifest's `duplicates` for `written`: (our split, PCam split, index, key)."""
  written = sorted(written, key=lambda w: example_id(w[1], w[2]))  # By id.
  refs = [w[1:3] for w in written]
  groups = duplicates.find_groups([w[3] for w in written],
                                  lambda idx: _read_patches(source, refs, idx))
  return duplicates.summarize(
      groups, np.asarray([example_id(w[1], w[2]) for w in written]),
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

