"""The converter as one call: what `tools/make_records.py` does, for Python code.

    import pcam_tfdata as pt
    manifest = pt.make_records('~/pcam', 'records/pcam', crop_size=48)

The options are the command's flags, with the same defaults and the same
checks; a bad input raises the error whose message the command prints.
"""

import os

from pcam_tfdata import fs
from pcam_tfdata.convert import kaggle
from pcam_tfdata.convert import outdir
from pcam_tfdata.convert import pcam_h5
from pcam_tfdata.convert import plan
from pcam_tfdata.convert import pool
from pcam_tfdata.convert import tiff
from pcam_tfdata import folderlock
from pcam_tfdata import schema

# The flags' defaults, for the command's help and for `make_records`'s.
DEFAULT_PER_CLASS = 50000
DEFAULT_VAL_FRACTION = 0.2
SOURCES = ('kaggle', 'pcam_h5')
# What `make_records` raises for bad settings or inputs (each a ValueError
# with a one-line message): the command prints these; anything else is a bug.
ERRORS = (kaggle.SourceError, pcam_h5.SourceError, plan.ConvertError, outdir.OutDirError,
          tiff.BadImageError, schema.ManifestError, folderlock.FolderBusy)


def make_records(data_dir, out_dir, *, source='kaggle', crop_size=32, per_class=None,
                 val_fraction=None, seed=0, groups_csv=None, num_folds=0, fold=None,
                 num_shards=0, workers=None, skip_bad=False, drop_duplicates=False,
                 overwrite=False, replace_stale=False, show_progress=True, log=print):
  """Converts a Kaggle PCam folder (or PCam's HDF5 files) into TFRecord shards.

  Center-crops every patch to `crop_size`, balances the classes to
  `per_class` each, splits train/val (and writes test), and writes
  `out_dir/manifest.json` last: a folder with a manifest is complete. A
  rerun of the same call returns the finished manifest at once; an
  interrupted one resumes from the shards it had written.

  Example:

    import pcam_tfdata as pt
    pt.make_synthetic('demo_kaggle', num_train=2000, num_test=200)
    manifest = pt.make_records('demo_kaggle', 'demo_records', per_class=800)
    manifest['splits']['train']['count']  # 1280

  Args:
    data_dir: the Kaggle folder (train/, train_labels.csv, optional test/)
      or, with source='pcam_h5', the folder of camelyonpatch_*.h5[.gz].
    out_dir: the records folder to create.
    source: 'kaggle' or 'pcam_h5'.
    crop_size: side of the center crop; even, up to 96.
    per_class: examples kept per class before splitting; 0 keeps every
      example. None: 50,000 (the seed's); with pcam_h5, PCam's own splits
      are kept unless `per_class` or `val_fraction` is given.
    val_fraction: share of the kept examples for val. None: 0.2.
    seed: seed of balancing, splitting and shuffling.
    groups_csv: optional id,group (or id,wsi, id,slide, id,centre) CSV: no group then
      appears in both train and val.
    num_folds: K >= 2 for K-fold cross-validation (val is fold `fold`); 0
      for one train/val split.
    fold: with num_folds, the fold (0..K-1) that is val. None: 0.
    num_shards: train shards; 0 picks a count.
    workers: processes writing shards. None: every core this process may use.
    skip_bad: skip (and list in the manifest) unreadable patches and ids
      without a file, instead of stopping at the first.
    drop_duplicates: keep one patch of each group of patches whose stored
      crops are identical (which holds every group of identical patches):
      a test patch if the group has one, else the smallest id; none of the
      labelled ones if their labels conflict (see `duplicates.drop_plan`).
    overwrite: replace a finished conversion of other inputs or settings
      (only a folder holding this tool's manifest.json is ever replaced).
    replace_stale: replace a finished conversion only if it is stale (of
      other inputs or settings), without `overwrite`: how the command
      keeps its demo output current.
    show_progress: a progress bar (a line every 30 s in a log file).
    log: where one-line messages go.

  Returns:
    The manifest (a dict, as written to manifest.json).

  Raises:
    ValueError: bad settings or inputs, naming the option (as its flag),
      file or row; its subclasses kaggle.SourceError, pcam_h5.SourceError,
      plan.ConvertError, outdir.OutDirError, tiff.BadImageError and
      schema.ManifestError say which part refused.
  """
  _check_choices(source, num_folds, fold, val_fraction, groups_csv)
  if workers is None:
    workers = pool.default_workers()
  # Paths as strings: the settings are recorded in manifest.json.
  data_dir, out_dir = os.fspath(data_dir), os.fspath(out_dir)
  groups_csv = groups_csv and os.fspath(groups_csv)
  check_local(data_dir, out_dir)
  settings = dict(source=source, data_dir=data_dir, out_dir=out_dir, crop_size=crop_size,
                  per_class=per_class, val_fraction=val_fraction, seed=seed,
                  groups_csv=groups_csv, num_folds=num_folds, fold=fold or 0,
                  num_shards=num_shards, workers=workers, skip_bad=skip_bad,
                  drop_duplicates=drop_duplicates, overwrite=overwrite)
  if source == 'pcam_h5':
    return _from_h5(settings, replace_stale, show_progress, log)
  return _from_kaggle(settings, replace_stale, show_progress, log)


def check_local(data_dir, out_dir):
  """Raises ConvertError for a URL: the converter's TF-free workers read and write plain files."""
  for flag, path in (('--out_dir', out_dir), ('--data_dir', data_dir)):
    if path and fs.is_url(path):
      raise plan.ConvertError(
          f'{flag}={path}: the converter reads and writes local folders; convert into a '
          'local one, then copy it (gsutil -m cp -r records/x gs://bucket/records/x, or '
          'aws s3 sync records/x s3://bucket/records/x)')


def _check_choices(source, num_folds, fold, val_fraction, groups_csv):
  """What the options cannot ask together; before any file is read."""
  if source not in SOURCES:
    raise plan.ConvertError(f'--source={source}: choose one of {", ".join(SOURCES)}')
  folds_asked = num_folds != 0 or fold is not None
  if folds_asked:
    if source == 'pcam_h5':
      raise plan.ConvertError('--num_folds: folds are made from the Kaggle layout '
                              "(--source=kaggle); PCam's HDF5 files come split already")
    if val_fraction is not None:
      raise plan.ConvertError(f'--val_fraction={val_fraction} with --num_folds={num_folds}: '
                              'val is one fold of K; drop one of the two')
    if num_folds < 2:
      raise plan.ConvertError(f'--num_folds={num_folds}: must be >= 2 (with --fold={fold or 0})')
  if source == 'pcam_h5' and groups_csv:
    raise plan.ConvertError(f'--groups_csv={groups_csv}: for the Kaggle layout; PCam\'s HDF5 '
                            'files name their slides in their own meta CSVs')


def _from_kaggle(settings, replace_stale, show_progress, log):
  from pcam_tfdata.convert import from_kaggle  # pylint: disable=g-import-not-at-top
  source = kaggle.read_source(os.path.expanduser(settings['data_dir']),
                              allow_missing=settings['skip_bad'])
  if settings['per_class'] is None:
    settings['per_class'] = DEFAULT_PER_CLASS
  if settings['val_fraction'] is None:
    settings['val_fraction'] = DEFAULT_VAL_FRACTION
  groups = None
  if settings['groups_csv']:
    groups = kaggle.read_groups(settings['groups_csv'], source.ids)
  if source.unlabelled:
    log(f'note: {len(source.unlabelled)} files in {kaggle.TRAIN_DIR}/ have no row in '
        f'{kaggle.LABELS_CSV} and are left out (e.g. {source.unlabelled[0]})')
  settings['data_dir'] = source.data_dir
  return from_kaggle.convert(
      source, settings['out_dir'], crop_size=settings['crop_size'],
      per_class=settings['per_class'], val_fraction=settings['val_fraction'],
      seed=settings['seed'], groups=groups, num_shards=settings['num_shards'],
      workers=settings['workers'], skip_bad=settings['skip_bad'],
      overwrite=settings['overwrite'], num_folds=settings['num_folds'], fold=settings['fold'],
      drop_duplicates=settings['drop_duplicates'], replace_stale=replace_stale,
      flags=settings, show_progress=show_progress, log=log)


def _from_h5(settings, replace_stale, show_progress, log):
  from pcam_tfdata.convert import from_h5  # pylint: disable=g-import-not-at-top
  # PCam's own splits stand unless the caller asks for a re-split.
  resplit = settings['per_class'] is not None or settings['val_fraction'] is not None
  source = pcam_h5.read_source(os.path.expanduser(settings['data_dir']))
  return from_h5.convert(
      source, settings['out_dir'], crop_size=settings['crop_size'],
      per_class=settings['per_class'] or 0,
      val_fraction=(DEFAULT_VAL_FRACTION if settings['val_fraction'] is None
                    else settings['val_fraction']),
      seed=settings['seed'], resplit=resplit, num_shards=settings['num_shards'],
      overwrite=settings['overwrite'], drop_duplicates=settings['drop_duplicates'],
      replace_stale=replace_stale, flags=settings, show_progress=show_progress, log=log)
