r"""Converts the Kaggle PCam folder into center-cropped, balanced TFRecord shards.

    python tools/make_records.py --data_dir=~/pcam --out_dir=records/pcam

With no --data_dir it generates the synthetic demo set once (records/demo_kaggle,
same layout and file format as Kaggle's) and converts it into records/demo,
balancing to the smaller class unless --per_class is given.
"""

import os

from absl import app
from absl import flags

from pcam_tfdata import cli
from pcam_tfdata.convert import duplicates
from pcam_tfdata.convert import from_kaggle
from pcam_tfdata.convert import kaggle
from pcam_tfdata.convert import outdir
from pcam_tfdata.convert import plan
from pcam_tfdata.convert import synthetic
from pcam_tfdata.convert import tiff
from pcam_tfdata import schema

DEMO_SOURCE_DIR = os.path.join('records', 'demo_kaggle')
DEMO_OUT_DIR = os.path.join('records', 'demo')

_SOURCE = flags.DEFINE_enum(
    'source', 'kaggle', ['kaggle', 'pcam_h5'],
    'kaggle: the Kaggle folder of TIFFs. pcam_h5: the original PCam HDF5 files '
    '(gzipped or not); its own splits are kept unless --per_class or --val_fraction is given.')
_DATA_DIR = flags.DEFINE_string(
    'data_dir', None, 'Kaggle-layout folder (train/, train_labels.csv, optional test/). '
    'Unset: generate and convert the synthetic demo set.')
_OUT_DIR = flags.DEFINE_string(
    'out_dir', None, f'Records folder to create. Default: {DEMO_OUT_DIR} for the demo, '
    'records/pcam otherwise.')
_CROP_SIZE = flags.DEFINE_integer('crop_size', 32, 'Side of the center crop; even, up to 96.')
_PER_CLASS = flags.DEFINE_integer(
    'per_class', 50000, 'Examples kept per class before splitting, as the seed; '
    '0 keeps every example (unbalanced).')
_VAL_FRACTION = flags.DEFINE_float('val_fraction', 0.2, 'Share of the kept examples for val.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of balancing, splitting and shuffling.')
_GROUPS_CSV = flags.DEFINE_string(
    'groups_csv', None, 'Optional id,group CSV (also id,wsi as the community '
    'patch_id_wsi_full.csv, or id,slide); no group then appears in both train and val.')
_NUM_FOLDS = flags.DEFINE_integer(
    'num_folds', 0, 'K-fold cross-validation: split the kept examples into K folds '
    '(slide-disjoint with --groups_csv, else stratified by label); 0 for one train/val split.')
_FOLD = flags.DEFINE_integer('fold', 0, 'With --num_folds: which fold (0..K-1) is val; the '
                             'others are train. The K conversions partition the examples.')
_NUM_SHARDS = flags.DEFINE_integer(
    'num_shards', 0, f'Train shards; 0 picks at least {plan.TRAIN_MIN_SHARDS} '
    '(and about 128 MiB each at most). Val and test shards are picked by size.')
_WORKERS = flags.DEFINE_integer('workers', len(os.sched_getaffinity(0)),
                                'Processes writing shards.')
_SKIP_BAD = flags.DEFINE_bool(
    'skip_bad', False, 'Skip unreadable or malformed patches (and ids with no file), '
    'listing each in the manifest, instead of stopping at the first.')
_DROP_DUPLICATES = flags.DEFINE_bool(
    'drop_duplicates', False, 'Keep one patch of each group of pixel-identical patches '
    '(found by hashing every full patch), chosen before the split, so no pixels sit on both '
    'sides; the rest are listed in the manifest. Without it duplicates are only counted.')
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'Replace a finished conversion of other inputs or settings (stale). '
    'Only a folder holding this tool\'s manifest.json is ever replaced.')
_CONVERSION_FLAGS = (_SOURCE, _DATA_DIR, _OUT_DIR, _CROP_SIZE, _PER_CLASS, _VAL_FRACTION, _SEED,
                     _GROUPS_CSV, _NUM_FOLDS, _FOLD, _NUM_SHARDS, _WORKERS, _SKIP_BAD,
                     _DROP_DUPLICATES, _OVERWRITE)


def _fail(message):
  cli.fail('make_records.py', message)


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments {" ".join(argv[1:])}; flags take the form --name=value')
  data_dir, per_class = _DATA_DIR.value, _PER_CLASS.value
  folds_asked = _NUM_FOLDS.value != 0 or flags.FLAGS['fold'].present  # 0: no folds.
  if folds_asked:
    if _SOURCE.value == 'pcam_h5':
      _fail('--num_folds: folds are made from the Kaggle layout (--source=kaggle); PCam\'s '
            'HDF5 files come split already')
    if flags.FLAGS['val_fraction'].present:
      _fail(f'--val_fraction={_VAL_FRACTION.value} with --num_folds={_NUM_FOLDS.value}: val is '
            'one fold of K; drop one of the two')
    if _NUM_FOLDS.value < 2:
      _fail(f'--num_folds={_NUM_FOLDS.value}: must be >= 2 (with --fold={_FOLD.value})')
  if _SOURCE.value == 'pcam_h5':
    _convert_h5()
    return
  try:
    if data_dir is None:
      data_dir = DEMO_SOURCE_DIR
      if not os.path.isdir(data_dir):
        print(f'generating the synthetic demo set in {data_dir}')
        synthetic.make_dataset(data_dir)
    source = kaggle.read_source(os.path.expanduser(data_dir), allow_missing=_SKIP_BAD.value)
    if _DATA_DIR.value is None and not flags.FLAGS['per_class'].present:
      per_class = int(min((source.labels == 0).sum(), (source.labels == 1).sum()))
    groups = None
    if _GROUPS_CSV.value:
      groups = kaggle.read_groups(_GROUPS_CSV.value, source.ids)
    if source.unlabelled:
      print(f'note: {len(source.unlabelled)} files in {kaggle.TRAIN_DIR}/ have no row in '
            f'{kaggle.LABELS_CSV} and are left out (e.g. {source.unlabelled[0]})')
    out_dir = _OUT_DIR.value or (DEMO_OUT_DIR if _DATA_DIR.value is None
                                 else os.path.join('records', 'pcam'))
    manifest = from_kaggle.convert(
        source, out_dir, crop_size=_CROP_SIZE.value, per_class=per_class,
        val_fraction=_VAL_FRACTION.value, seed=_SEED.value, groups=groups,
        num_shards=_NUM_SHARDS.value, workers=_WORKERS.value, skip_bad=_SKIP_BAD.value,
        overwrite=_OVERWRITE.value, num_folds=_NUM_FOLDS.value, fold=_FOLD.value,
        drop_duplicates=_DROP_DUPLICATES.value,
        # The demo's own output is rebuilt when stale (only a folder with this
        # tool's manifest is ever replaced); anything else needs --overwrite.
        replace_stale=_DATA_DIR.value is None and _OUT_DIR.value is None,
        flags={f.name: f.value for f in _CONVERSION_FLAGS} | {
            'data_dir': source.data_dir, 'per_class': per_class, 'out_dir': out_dir})
  except (kaggle.SourceError, plan.ConvertError, outdir.OutDirError, tiff.BadImageError,
          schema.ManifestError) as e:
    _fail(str(e))
  except KeyboardInterrupt:
    _fail('interrupted; rerun the same command to resume')

  _summarize(manifest, out_dir)


def _convert_h5():
  from pcam_tfdata.convert import from_h5  # pylint: disable=g-import-not-at-top
  from pcam_tfdata.convert import pcam_h5  # pylint: disable=g-import-not-at-top
  if not _DATA_DIR.value:
    _fail('--source=pcam_h5 needs --data_dir (the folder of camelyonpatch_*.h5[.gz] files)')
  # PCam's own splits stand unless the user asks for a re-split.
  resplit = flags.FLAGS['per_class'].present or flags.FLAGS['val_fraction'].present
  per_class = _PER_CLASS.value if flags.FLAGS['per_class'].present else 0
  out_dir = _OUT_DIR.value or os.path.join('records', 'pcam_h5')
  try:
    source = pcam_h5.read_source(os.path.expanduser(_DATA_DIR.value))
    manifest = from_h5.convert(
        source, out_dir, crop_size=_CROP_SIZE.value, per_class=per_class,
        val_fraction=_VAL_FRACTION.value, seed=_SEED.value, resplit=resplit,
        num_shards=_NUM_SHARDS.value, overwrite=_OVERWRITE.value,
        drop_duplicates=_DROP_DUPLICATES.value, flags={f.name: f.value for f in _CONVERSION_FLAGS})
  except (pcam_h5.SourceError, plan.ConvertError, outdir.OutDirError,
          schema.ManifestError) as e:
    _fail(str(e))
  except KeyboardInterrupt:
    _fail('interrupted; rerun the same command to start again')
  _summarize(manifest, out_dir)


def _summarize(manifest, out_dir):
  written = sum(s['count'] for s in manifest['splits'].values())
  for name, info in manifest['splits'].items():
    print(f'{name:>5}: {info["count"]:>7,} examples {info["label_counts"]} in '
          f'{len(info["shards"])} shards' + (f', {info["skipped"]} skipped' if info['skipped'] else '')
          + (f', {info["slides"]} slides' if 'slides' in info else ''))
  if 'duplicates' in manifest:
    print(duplicates.summary_line(manifest['duplicates'], written))
  else:  # A conversion made before duplicates were counted.
    print('duplicates: not counted in this output (made by an earlier version); '
          '--overwrite rebuilds it and counts them')
  print(f'{written:,} examples of {manifest["image_shape"]} in {manifest["seconds"]:.1f} s '
        f'-> {os.path.abspath(out_dir)}')


if __name__ == '__main__':
  app.run(main)
