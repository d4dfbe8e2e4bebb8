r"""Calibrates the stand-in: what the seed's recipe learns on `--difficulty=pcam`.

    python tools/bench_standin.py --work_dir=/tmp/standin24k --num_train=24000 \
        --experiments=models
    python tools/bench_standin.py --work_dir=/tmp/standin12k --num_train=12000 \
        --experiments=crop,stain,tta,folds --epochs=5 --seeds=0,1,2

Makes the stand-in (once per --work_dir), converts it and trains ordinary
runs through `pt.train` (the seed's recipe: batch 64, Adam, its callbacks),
then prints one table row per experiment and seed:

  models  Baseline and BatchNorm, center 32x32, val split by slide.
  crop    one network (--crop_model) on the 32 px crop and the full 96 px.
  stain   one centre held out as val (--groups_csv=centres.csv
          --num_folds=<centres> --fold=0): --stain_jitter 0 against each of
          --jitters.
  tta     the `models` Baseline run's val AUC, plain and with dihedral TTA.
  folds   5 slide folds: each fold's model and their mean on test/, scored
          with the stand-in's test_labels.csv.

Val AUCs are exact (scikit-learn on every val example). Learning figures,
not throughput: they vary with the seed by a few hundredths, so read the
spread over --seeds before a difference.
"""

import os
import sys

from absl import flags
from absl import logging
import pandas as pd

import pcam_tfdata as pt
from pcam_tfdata import cli
from pcam_tfdata import hostinfo
from pcam_tfdata.convert import kaggle
from pcam_tfdata.convert import synthetic

_WORK_DIR = flags.DEFINE_string('work_dir', '/tmp/bench_standin', 'Stand-in, records and runs.')
_NUM_TRAIN = flags.DEFINE_integer('num_train', 12000, 'Stand-in train patches.')
_NUM_TEST = flags.DEFINE_integer('num_test', 2000, 'Stand-in test patches (for folds).')
EXPERIMENTS = ('models', 'crop', 'stain', 'tta', 'folds')
_EXPERIMENTS = flags.DEFINE_list('experiments', list(EXPERIMENTS), 'Which comparisons to run.')
_PER_CLASS = flags.DEFINE_integer('per_class', 0, 'Patches kept per class (the seed: 50,000); '
                                  '0: as many as the smaller class has.')
_EPOCHS = flags.DEFINE_integer('epochs', 10, 'Epochs per run (the seed: 10).')
_LEARNING_RATE = flags.DEFINE_float('learning_rate', 1e-3, 'Adam learning rate (the seed: 1e-3).')
_CROP_LEARNING_RATE = flags.DEFINE_float(
    'crop_learning_rate', 3e-4, 'The crop experiment\'s rate, for both crops: at 1e-3 the '
    'Baseline on 96 px stalls at chance (BUILD.md).')
_CROP_MODEL = flags.DEFINE_string('crop_model', 'baseline', 'Network of the crop experiment.')
_JITTERS = flags.DEFINE_list('jitters', ['0.01', '0.05'], 'Stain jitters against none.')
_SEEDS = flags.DEFINE_list('seeds', ['0'], 'Training seeds (the stand-in stays seed 0).')
PROGRAM = 'bench_standin.py'


def _quiet(*_):
  pass


def _records(name, crop=32, groups='slides', folds=0, fold=None):
  """Converts the stand-in once per setting, balanced (--per_class)."""
  data = os.path.join(_WORK_DIR.value, 'kaggle')
  out = os.path.join(_WORK_DIR.value, 'records', name)
  labels = pd.read_csv(os.path.join(data, kaggle.LABELS_CSV))['label']
  groups_csv = os.path.join(data, synthetic.SLIDES_CSV if groups == 'slides'
                            else synthetic.CENTRES_CSV)
  per_class = _PER_CLASS.value or int(labels.value_counts().min())
  pt.make_records(data, out, crop_size=crop, per_class=per_class,
                  groups_csv=groups_csv, num_folds=folds, fold=fold, show_progress=False,
                  log=_quiet)
  return out


def _train(records, name, seed, **options):
  options = {'epochs': _EPOCHS.value, 'batch_size': 64, 'learning_rate': _LEARNING_RATE.value,
             'early_stopping_patience': 3, 'reduce_lr_patience': 2, 'seed': seed,
             'steps_per_execution': 8, **options}
  run = os.path.join(_WORK_DIR.value, 'runs', f'{name}-seed{seed}')
  metrics = pt.train(records, run, progress=False, **options)
  return run, metrics['val_auc']


def _auc(labels, probs):
  from sklearn.metrics import roc_auc_score  # pylint: disable=g-import-not-at-top
  return roc_auc_score(labels, probs)


def _val_auc(run, records, tta):
  _, probs, labels = pt.predict(run, records, 'val', tta=tta, with_labels=True, progress=False)
  return _auc(labels, probs)


def _test_auc(runs, records):
  ids, probs = pt.predict(runs, records, 'test', progress=False)
  answers = pd.read_csv(os.path.join(_WORK_DIR.value, 'kaggle', synthetic.TEST_LABELS_CSV))
  return _auc(answers.set_index('id').loc[ids, 'label'].to_numpy(), probs)


def _row(experiment, seed, setting, auc, note=''):
  print(f'| {experiment} | {seed} | {setting} | {auc:.4f} | {note} |', flush=True)


def _run(experiment, seed):
  if experiment in ('models', 'tta'):
    records = _records('slides32')
    run, auc = _train(records, 'baseline', seed, model='baseline')
    if experiment == 'models':
      _row('models', seed, 'baseline', auc)
      _row('models', seed, 'batchnorm', _train(records, 'batchnorm', seed, model='batchnorm')[1])
    else:
      _row('tta', seed, 'baseline, plain', _val_auc(run, records, False))
      _row('tta', seed, 'baseline, 8 views', _val_auc(run, records, True))
  elif experiment == 'crop':
    for crop in (32, 96):
      records = _records(f'slides{crop}', crop=crop)
      _, auc = _train(records, f'{_CROP_MODEL.value}-{crop}px', seed, model=_CROP_MODEL.value,
                      learning_rate=_CROP_LEARNING_RATE.value)
      _row('crop', seed, f'{_CROP_MODEL.value}, {crop} px, lr {_CROP_LEARNING_RATE.value:g}', auc)
  elif experiment == 'stain':
    centres = pd.read_csv(os.path.join(_WORK_DIR.value, 'kaggle', synthetic.CENTRES_CSV))
    records = _records('centre0', groups='centres', folds=centres['centre'].nunique(), fold=0)
    for jitter in [0.0] + [float(j) for j in _JITTERS.value]:
      _, auc = _train(records, f'centre0-jitter{jitter:g}', seed, stain_jitter=jitter)
      _row('stain', seed, f'centre held out, stain_jitter {jitter:g}', auc)
  else:  # 'folds' (main checked the names).
    runs, aucs = [], []
    for fold in range(5):
      records = _records(f'fold{fold}', folds=5, fold=fold)
      run, _ = _train(records, f'fold{fold}', seed)
      runs.append(run)
      aucs.append(_test_auc(run, records))
      _row('folds', seed, f'fold {fold} on test/', aucs[-1])
    _row('folds', seed, '5-fold mean on test/', _test_auc(runs, records),
         f'best fold {max(aucs):.4f}')


def main(argv):
  if len(argv) > 1:
    cli.fail(PROGRAM, f'unexpected arguments {" ".join(argv[1:])}')
  unknown = [e for e in _EXPERIMENTS.value if e not in EXPERIMENTS]
  if unknown:  # Before the stand-in is drawn and hours of runs, not after.
    cli.fail(PROGRAM, f'--experiments: unknown {unknown[0]!r}; choose from {", ".join(EXPERIMENTS)}')
  cli.import_tensorflow()  # Its C++ info and warning records off the table.
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # As train.py: no per-save INFO lines.
  data = os.path.join(_WORK_DIR.value, 'kaggle')
  pt.make_synthetic(data, _NUM_TRAIN.value, _NUM_TEST.value, seed=0, difficulty='pcam',
                    exist_ok=True, show_progress=False)
  # exist_ok keeps any folder there: refuse one made with other sizes.
  made = len(pd.read_csv(os.path.join(data, kaggle.LABELS_CSV)))
  if made != _NUM_TRAIN.value or not os.path.exists(os.path.join(data, synthetic.SLIDES_CSV)):
    cli.fail(PROGRAM, f'--work_dir={_WORK_DIR.value}: holds another set ({made} train patches); '
             'use a new --work_dir')
  print(f'# {hostinfo.describe()}; stand-in {_NUM_TRAIN.value} patches, seed 0; '
        f'{_EPOCHS.value} epochs, lr {_LEARNING_RATE.value:g}')
  print('| experiment | training seed | setting | AUC | |')
  print('|---|---|---|---|---|')
  for experiment in _EXPERIMENTS.value:
    for seed in _SEEDS.value:
      _run(experiment, int(seed))


if __name__ == '__main__':
  cli.run_program(sys.modules[__name__])
