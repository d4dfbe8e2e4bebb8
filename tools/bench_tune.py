r"""Measures pcam-tune on the stand-in: the best trial against the seed's recipe, pruning's saving, the tuner's own cost.

    python tools/bench_tune.py --work_dir=/tmp/bench_tune --num_train=12000 --trials=24 \
        --epochs=5 --model=baseline

Makes the stand-in (`--difficulty=pcam`) once in --work_dir, converts it with a
slide split, trains the seed's recipe (configs/<model>.flags' settings) for
--epochs, then runs the same search from configs/space_seed.space twice, with
the median pruner and without, each in its own study. Prints one Markdown
table: val AUC of the seed's recipe and of each search's best trial, the
searches' wall times, the trial-epochs each trained (and the share pruning
saved), and the tuner's time per trial outside training: inside a trial
(asking, reporting, the database) and between trials.

Learning figures depend on the stand-in (what it can and cannot tell: README,
"A stand-in as hard as PCam"), not on the machine's load; the times do.
"""

import os
import sys
import time

from absl import flags
from absl import logging
import pandas as pd

import pcam_tfdata as pt
from pcam_tfdata import cli
from pcam_tfdata import hostinfo
from pcam_tfdata.convert import kaggle
from pcam_tfdata.convert import synthetic

_WORK_DIR = flags.DEFINE_string('work_dir', '/tmp/bench_tune', 'Stand-in, records, runs, studies.')
_NUM_TRAIN = flags.DEFINE_integer('num_train', 12000, 'Stand-in train patches.')
_TRIALS = flags.DEFINE_integer('trials', 24, 'Finished trials per search.')
_EPOCHS = flags.DEFINE_integer('epochs', 5, 'Epochs of every run (the seed: 10).')
_MODEL = flags.DEFINE_enum('model', 'baseline', ['baseline', 'batchnorm'], "The seed's network.")
_SPACE = flags.DEFINE_string('space', 'configs/space_seed.space', 'The search space.')
_PRUNERS = flags.DEFINE_list('pruners', ['median', 'none'], 'One search per pruner.')
PROGRAM = 'bench_tune.py'

# The seed's recipe (configs/baseline.flags, batchnorm.flags) but --epochs.
_SEED_RECIPE = dict(batch_size=64, learning_rate=1e-3, early_stopping_patience=3,
                    reduce_lr_patience=2, steps_per_execution=8)


def _quiet(*_):
  pass


def _records():
  data = os.path.join(_WORK_DIR.value, 'kaggle')
  out = os.path.join(_WORK_DIR.value, 'records')
  if not os.path.exists(data):
    pt.make_synthetic(data, _NUM_TRAIN.value, 0, seed=0, difficulty='pcam', show_progress=False)
  made = len(pd.read_csv(os.path.join(data, kaggle.LABELS_CSV)))
  if made != _NUM_TRAIN.value:
    cli.fail(PROGRAM, f'--work_dir={_WORK_DIR.value}: holds another set ({made} train '
             'patches); use a new --work_dir')
  labels = pd.read_csv(os.path.join(data, kaggle.LABELS_CSV))['label']
  pt.make_records(data, out, per_class=int(labels.value_counts().min()),
                  groups_csv=os.path.join(data, synthetic.SLIDES_CSV), show_progress=False,
                  log=_quiet)
  return out


def _search(records, pruner):
  study_dir = os.path.join(_WORK_DIR.value, f'study-{pruner}')
  start = time.time()
  best = pt.tune(records, study_dir, space=_SPACE.value, trials=_TRIALS.value, pruner=pruner,
                 seed=0, model=_MODEL.value, epochs=_EPOCHS.value,
                 **{k: v for k, v in _SEED_RECIPE.items()
                    if k not in ('batch_size', 'learning_rate')})
  wall = time.time() - start
  trials = pd.read_csv(os.path.join(study_dir, 'trials.csv'))
  # Optuna's duration of each trial against the time inside its pcam-train run.
  done = trials[trials['state'].isin(['complete', 'pruned'])]
  inside = list(done['seconds'] - done['run_seconds'])
  return {'best': best, 'wall': wall, 'trials': trials, 'inside': inside}


def main(argv):
  if len(argv) > 1:
    cli.fail(PROGRAM, f'unexpected arguments {" ".join(argv[1:])}')
  cli.import_tensorflow()
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  records = _records()
  seed_run = pt.train(records, os.path.join(_WORK_DIR.value, 'seed-recipe'), model=_MODEL.value,
                      epochs=_EPOCHS.value, seed=0, progress=False, **_SEED_RECIPE)
  searches = {pruner: _search(records, pruner) for pruner in _PRUNERS.value}
  print(f'# {hostinfo.describe()}; stand-in {_NUM_TRAIN.value} patches (slide split); '
        f'{_MODEL.value}, {_EPOCHS.value} epochs; {_TRIALS.value} trials from {_SPACE.value}')
  print('| run | val AUC | wall (s) | trial-epochs trained | pruned trials | tuner s/trial '
        'inside / between | mean trial (s) |')
  print('|---|---|---|---|---|---|---|')
  print(f"| the seed's recipe | {seed_run['val_auc']:.4f} | - | {seed_run['epochs_run']} | - | "
        '- | - |')
  for pruner, s in searches.items():
    trials = s['trials']
    epochs = int(trials['epochs'].sum())
    done = trials[trials['state'].isin(['complete', 'pruned'])]
    between = (s['wall'] - trials['seconds'].sum()) / max(len(done), 1)
    inside = sum(s['inside']) / max(len(s['inside']), 1)
    best = s['best']['value'] if s['best'] else float('nan')
    print(f'| search, pruner {pruner} | {best:.4f} | {s["wall"]:.0f} | {epochs} | '
          f'{int((trials["state"] == "pruned").sum())} | {inside:.1f} / {between:.1f} | '
          f'{done["seconds"].mean():.0f} |')
  if 'none' in searches and 'median' in searches:
    pruned = int(searches['median']['trials']['epochs'].sum())
    unpruned = int(searches['none']['trials']['epochs'].sum())
    print(f'\nPruning trained {pruned} trial-epochs against {unpruned} without it: '
          f'{1 - pruned / unpruned:.0%} saved.')


if __name__ == '__main__':
  cli.run_program(sys.modules[__name__])
