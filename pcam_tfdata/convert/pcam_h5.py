"""The original PatchCamelyon HDF5 release as a second source, streamed in blocks.

    DATA_DIR/camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5[.gz]
    DATA_DIR/camelyonpatch_level_2_split_{train,valid,test}_meta.csv  (optional)

x is uint8 [N, 96, 96, 3], y is [N, 1, 1, 1] (0/1). Gzipped files are read
through a seekable decompressing reader, never unpacked to disk, and x is
read a block at a time in file order, so memory stays bounded whatever N is.
This module reads and checks the files; `from_h5` converts them.
"""

import collections
import dataclasses
import importlib.util
import os

import numpy as np
import pandas as pd

from pcam_tfdata.convert import gzip_reader

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


def blocks(split, indices):
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


def read_patches(source, refs, positions):
  """(position, full patch of refs[position]) for each of `positions`, a block at a time.

  `refs` is a list of (PCam split, index); the patches come in file order.
  """
  wanted = collections.defaultdict(dict)  # PCam split -> {index: position}
  for p in positions:
    split, index = refs[p]
    wanted[split][index] = p
  for split, positions_of in wanted.items():
    indices = np.fromiter(sorted(positions_of), np.int64)
    for lo, block, inside in blocks(source[split], indices):
      for i in inside:
        yield positions_of[int(i)], block[i - lo]
