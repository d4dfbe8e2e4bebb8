r"""Converts the Kaggle PCam folder into center-cropped, balanced TFRecord shards.

    python tools/make_records.py --data_dir=~/pcam --out_dir=records/pcam
    pcam-make-records --data_dir=~/pcam --out_dir=records/pcam     # the same

From Python: `pcam_tfdata.make_records(data_dir, out_dir, **options)`, whose
options are these flags.

With no --data_dir it generates the synthetic demo set once (records/demo_kaggle,
same layout and file format as Kaggle's) and converts it into records/demo,
balancing to the smaller class unless --per_class is given.
"""

import os
import sys

from absl import flags

from pcam_tfdata import cli
from pcam_tfdata.convert import api
from pcam_tfdata.convert import duplicates
from pcam_tfdata.convert import kaggle
from pcam_tfdata.convert import plan
from pcam_tfdata.convert import pool
from pcam_tfdata.convert import synthetic

DEMO_SOURCE_DIR = os.path.join('records', 'demo_kaggle')
DEMO_OUT_DIR = os.path.join('records', 'demo')

_SOURCE = flags.DEFINE_enum(
    'source', 'kaggle', api.SOURCES,
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
    'per_class', api.DEFAULT_PER_CLASS, 'Examples kept per class before splitting, as the seed; '
    '0 keeps every example (unbalanced).')
_VAL_FRACTION = flags.DEFINE_float('val_fraction', api.DEFAULT_VAL_FRACTION,
                                   'Share of the kept examples for val.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of balancing, splitting and shuffling.')
_GROUPS_CSV = flags.DEFINE_string(
    'groups_csv', None, 'Optional id,group CSV (also id,wsi as the community '
    'patch_id_wsi_full.csv, id,slide, or the stand-in\'s id,centre); no group then appears in '
    'both train and val.')
_NUM_FOLDS = flags.DEFINE_integer(
    'num_folds', 0, 'K-fold cross-validation: split the kept examples into K folds '
    '(slide-disjoint with --groups_csv, else stratified by label); 0 for one train/val split.')
_FOLD = flags.DEFINE_integer('fold', 0, 'With --num_folds: which fold (0..K-1) is val; the '
                             'others are train. The K conversions partition the examples.')
_NUM_SHARDS = flags.DEFINE_integer(
    'num_shards', 0, f'Train shards; 0 picks at least {plan.TRAIN_MIN_SHARDS} '
    '(and about 128 MiB each at most). Val and test shards are picked by size.')
_WORKERS = flags.DEFINE_integer('workers', pool.default_workers(), 'Processes writing shards.')
_SKIP_BAD = flags.DEFINE_bool(
    'skip_bad', False, 'Skip unreadable or malformed patches (and ids with no file), '
    'listing each in the manifest, instead of stopping at the first.')
_DROP_DUPLICATES = flags.DEFINE_bool(
    'drop_duplicates', False, 'Before the split, keep one patch of each group whose stored '
    'crops are identical (the model sees only the crop; this covers identical full patches '
    'too), so no stored image sits in two splits or folds: a test patch if the group has one, '
    'else the smallest id (HDF5: test, then valid, then train); a group whose labels conflict '
    'keeps none of its labelled patches. '
    'Every left-out id is listed in the manifest with the id it copies and why. Without it '
    'identical patches and crops are only counted.')
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'Replace a finished conversion of other inputs or settings (stale). '
    'Only a folder holding this tool\'s manifest.json is ever replaced.')


PROGRAM = 'make_records.py'


def _fail(message):
  cli.fail(PROGRAM, message)


def _given(flag):
  """The flag's value if the command line sets it, else None (the function's default)."""
  return flag.value if flags.FLAGS[flag.name].present else None


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments {" ".join(argv[1:])}; flags take the form --name=value')
  data_dir, out_dir, per_class = _DATA_DIR.value, _OUT_DIR.value, _given(_PER_CLASS)
  demo = data_dir is None and _SOURCE.value == 'kaggle'
  if _SOURCE.value == 'pcam_h5' and not data_dir:
    _fail('--source=pcam_h5 needs --data_dir (the folder of camelyonpatch_*.h5[.gz] files)')
  try:
    api.check_local(data_dir, out_dir)  # (Before the demo set is generated.)
    if demo:
      data_dir, out_dir = DEMO_SOURCE_DIR, out_dir or DEMO_OUT_DIR
      if not os.path.isdir(data_dir):
        print(f'generating the synthetic demo set in {data_dir}')
        with cli.writes_to(PROGRAM, data_dir):
          synthetic.make_dataset(data_dir, exist_ok=True)  # (A second first run may race.)
      if per_class is None:  # The demo balances to its smaller class.
        labels = kaggle.read_source(data_dir).labels
        per_class = int(min((labels == 0).sum(), (labels == 1).sum()))
    out_dir = out_dir or os.path.join('records', 'pcam' if _SOURCE.value == 'kaggle' else
                                      'pcam_h5')
    with cli.writes_to(PROGRAM, f'--out_dir={out_dir}'):
      manifest = _convert(data_dir, out_dir, per_class, demo)
  except api.ERRORS as e:
    _fail(str(e))
  except KeyboardInterrupt:  # (HDF5 shards are written side by side: no partial resume.)
    _fail('interrupted; rerun the same command to ' +
          ('resume' if _SOURCE.value == 'kaggle' else 'start again'))
  _summarize(manifest, out_dir)


def _convert(data_dir, out_dir, per_class, demo):
  """pt.make_records with the flags' values."""
  return api.make_records(
      data_dir, out_dir, source=_SOURCE.value, crop_size=_CROP_SIZE.value,
      per_class=per_class, val_fraction=_given(_VAL_FRACTION), seed=_SEED.value,
      groups_csv=_GROUPS_CSV.value, num_folds=_NUM_FOLDS.value, fold=_given(_FOLD),
      num_shards=_NUM_SHARDS.value, workers=_WORKERS.value, skip_bad=_SKIP_BAD.value,
      drop_duplicates=_DROP_DUPLICATES.value, overwrite=_OVERWRITE.value,
      # The demo's own output is rebuilt when stale (only a folder with this
      # tool's manifest is ever replaced); anything else needs --overwrite.
      replace_stale=demo and _OUT_DIR.value is None)


def _summarize(manifest, out_dir):
  written = sum(s['count'] for s in manifest['splits'].values())
  for name, info in manifest['splits'].items():
    print(f'{name:>5}: {info["count"]:>7,} examples {info["label_counts"]} in '
          f'{len(info["shards"])} shards' + (f', {info["skipped"]} skipped' if info['skipped'] else '')
          + (f', {info["slides"]} slides' if 'slides' in info else ''))
  if 'duplicates' in manifest:
    print(duplicates.summary_line(manifest['duplicates'], written, manifest['image_shape'][0]))
  else:  # A conversion made before duplicates were counted.
    print('duplicates: not counted in this output (made by an earlier version); '
          '--overwrite rebuilds it and counts them')
  print(f'{written:,} examples of {manifest["image_shape"]} in {manifest["seconds"]:.1f} s '
        f'-> {os.path.abspath(out_dir)}')


if __name__ == '__main__':
  cli.run_program(sys.modules[__name__])
