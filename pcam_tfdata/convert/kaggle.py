"""Reads and checks the Kaggle "Histopathologic Cancer Detection" folder layout.

    DATA_DIR/train/<id>.tif      labelled 96x96 RGB patches
    DATA_DIR/train_labels.csv    id,label (label 1: tumour in the center 32x32)
    DATA_DIR/test/<id>.tif       unlabelled patches (optional)

Only names and labels are checked here; pixels are checked as shards are
written (pcam_tfdata/records.py).
"""

import dataclasses
import io
import os

import numpy as np
import pandas as pd

from pcam_tfdata import fs

LABELS_CSV = 'train_labels.csv'
TRAIN_DIR = 'train'
TEST_DIR = 'test'
SUFFIX = '.tif'


class SourceError(ValueError):
  """The input folder or one of its files is malformed."""


@dataclasses.dataclass
class KaggleSource:
  """What the folder holds, checked.

  Attributes:
    data_dir: the folder, absolute.
    ids: np.ndarray of str, labelled ids that have a file, in CSV order.
    labels: np.ndarray of int64, their labels.
    test_ids: np.ndarray of str, sorted ids in test/ (empty without test/).
    missing: list of (id, reason) for labelled ids without a file.
    unlabelled: sorted names of train/ files with no CSV row.
  """
  data_dir: str
  ids: np.ndarray
  labels: np.ndarray
  test_ids: np.ndarray
  missing: list
  unlabelled: list

  def train_path(self, example_id):
    return f'{self.data_dir}/{TRAIN_DIR}/{example_id}{SUFFIX}'

  def test_path(self, example_id):
    return f'{self.data_dir}/{TEST_DIR}/{example_id}{SUFFIX}'


def _list_ids(folder):
  """{id: file name} for `<id>.tif` files, and other file names."""
  ids, others = {}, []
  with os.scandir(folder) as entries:
    for entry in entries:
      if entry.name.endswith(SUFFIX) and entry.is_file():
        ids[entry.name[:-len(SUFFIX)]] = entry.name
      elif not entry.name.startswith('.'):
        others.append(entry.name)
  return ids, sorted(others)


def read_id_csv(path, value_column):
  """Reads an `id,<value_column>` CSV as strings, checking columns and ids.

  Args:
    path: the CSV.
    value_column: its name, or a tuple of accepted names (the first one
      present is read).

  Returns:
    A DataFrame with columns id and the value column (under the name the file
    gives it), index = CSV line number.

  Raises:
    SourceError: missing or unreadable file, missing column, empty or
      duplicate id. The message names the file and line.
  """
  if not fs.isfile(path):
    raise SourceError(f'{path}: no such file')
  try:
    # (A URL, e.g. predict's --sample_submission in a bucket: read through TensorFlow.)
    source = io.StringIO(fs.read_text(path)) if fs.is_url(path) else path
    frame = pd.read_csv(source, dtype=str, keep_default_na=False)
  except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
    raise SourceError(f'{path}: not a readable CSV ({str(e).strip()})') from None
  frame.columns = [str(c).strip() for c in frame.columns]
  if isinstance(value_column, tuple):
    present = [c for c in value_column if c in frame.columns]
    if not present:
      raise SourceError(f'{path}: no {value_column[0]} column (expected id and one of '
                        f'{", ".join(value_column)}; columns: {", ".join(frame.columns)})')
    value_column = present[0]
  missing = [c for c in ('id', value_column) if c not in frame.columns]
  if missing:
    raise SourceError(f'{path}: no column {", ".join(map(repr, missing))} '
                      f'(columns: {", ".join(frame.columns) or "none"})')
  frame = frame[['id', value_column]].copy()
  frame['id'] = frame['id'].str.strip()
  frame.index = np.arange(2, len(frame) + 2)  # Line numbers: line 1 is the header.
  empty = frame.index[frame['id'] == '']
  if len(empty):
    raise SourceError(f'{path} line {empty[0]}: empty id')
  dup = frame['id'].duplicated()
  if dup.any():
    line = frame.index[dup.to_numpy()][0]
    example_id = frame.at[line, 'id']
    first = frame.index[(frame['id'] == example_id).to_numpy()][0]
    raise SourceError(f'{path} line {line}: duplicate id {example_id} (first at line {first})')
  return frame


def read_source(data_dir, allow_missing=False):
  """Lists and checks a Kaggle-layout folder.

  Args:
    data_dir: the folder.
    allow_missing: keep going when a labelled id has no file (the id is
      reported in `missing`); otherwise that is an error.

  Returns:
    A KaggleSource.

  Raises:
    SourceError: with a one-line message naming the folder, file or line.
  """
  data_dir = os.path.abspath(data_dir)
  if not os.path.isdir(data_dir):
    raise SourceError(f'{data_dir}: no such data folder')
  train_dir = os.path.join(data_dir, TRAIN_DIR)
  if not os.path.isdir(train_dir):
    raise SourceError(f'{train_dir}: no such folder (expected the Kaggle layout)')
  csv_path = os.path.join(data_dir, LABELS_CSV)
  frame = read_id_csv(csv_path, 'label')
  bad = frame.index[~frame['label'].str.strip().isin(['0', '1'])]
  if len(bad):
    raise SourceError(f'{csv_path} line {bad[0]}: label {frame.at[bad[0], "label"]!r} '
                      f'for id {frame.at[bad[0], "id"]} is not 0 or 1')

  files, _ = _list_ids(train_dir)
  has_file = frame['id'].isin(files).to_numpy()
  missing = [(i, f'no file {TRAIN_DIR}/{i}{SUFFIX}') for i in frame['id'][~has_file]]
  if missing and not allow_missing:
    line = frame.index[~has_file][0]
    raise SourceError(f'{csv_path} line {line}: id {missing[0][0]} has no file '
                      f'{os.path.join(train_dir, missing[0][0] + SUFFIX)}'
                      + (f' ({len(missing)} ids in all)' if len(missing) > 1 else ''))
  labelled = set(frame['id'])
  unlabelled = sorted(name for i, name in files.items() if i not in labelled)

  test_dir = os.path.join(data_dir, TEST_DIR)
  test_ids = []
  if os.path.isdir(test_dir):
    test_ids = sorted(_list_ids(test_dir)[0])
  frame = frame[has_file]
  return KaggleSource(
      data_dir=data_dir,
      ids=frame['id'].to_numpy(dtype=object).astype(str),
      labels=frame['label'].str.strip().astype(np.int64).to_numpy(),
      test_ids=np.asarray(test_ids, dtype=str),
      missing=missing,
      unlabelled=unlabelled)


# The community slide file says `id,wsi`; the stand-in's centres file `id,centre`.
GROUP_COLUMNS = ('group', 'wsi', 'slide', 'centre', 'center')


def read_groups(path, ids):
  """Reads an `id,group` CSV and returns the group of each id.

  The group column may also be called `wsi` (the community mapping of PCam
  patches to slides, patch_id_wsi_full.csv, as it is) or `slide`.

  Raises:
    SourceError: malformed CSV, no group column, or an id with no group row.
  """
  frame = read_id_csv(path, GROUP_COLUMNS)
  column = frame.columns[1]
  values = frame[column].str.strip()  # 'slideA ' is slide A: one slide, one fold.
  empty = frame.index[(values == '').to_numpy()]
  if len(empty):
    raise SourceError(f'{path} line {empty[0]}: empty {column} for id {frame.at[empty[0], "id"]}')
  lookup = pd.Series(values.to_numpy(), index=frame['id'].to_numpy())
  groups = lookup.reindex(ids)
  absent = groups.isna().to_numpy()
  if absent.any():
    raise SourceError(f'{path}: no group for id {ids[absent.argmax()]} '
                      f'({int(absent.sum())} ids without a group)')
  return groups.to_numpy(dtype=str)
