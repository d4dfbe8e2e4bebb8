r"""Searches pcam-train's flags with Optuna: many processes and hosts, pruning, resumable.

    python -m pcam_tfdata.tune --records_dir=records/standin --study_dir=studies/seed \
        --space=configs/space_seed.space --trials=24 --workers=2 --epochs=10

Each trial is an ordinary run in <study_dir>/trials/<number> (pcam-report and
pcam-predict work on it); every pcam-train flag given here is the fixed part
of each trial. The study lives in --storage (default a SQLite file in
--study_dir; a PostgreSQL URL lets several hosts share it): kill any worker,
or the whole search, and rerun the same command to continue it; the trial
that was cut short resumes from its backup. The best trial ends up in
<study_dir>/best.flags:

    python -m pcam_tfdata.train --flagfile=<study_dir>/best.flags

trains it again, bit for bit (same seed, records and kind of machine).
Also <study_dir>/trials.csv, plots as PNG, and `pcam-report <study_dir>`.
"""

import importlib
import signal
import sys

from absl import flags
from absl import logging

from pcam_tfdata import cli
from pcam_tfdata.training import config as config_lib
from pcam_tfdata.tuning import study as study_lib

# pcam-train's flags: every one not searched is the fixed part of each trial.
_TRAIN = importlib.import_module('pcam_tfdata.train')
flags.adopt_module_key_flags(_TRAIN)
# Seeded unless told otherwise, so that best.flags reproduces its trial.
flags.FLAGS.set_default('seed', 0)

_STUDY_DIR = flags.DEFINE_string('study_dir', None, 'Trial run folders, trials.csv, best.flags '
                                 'and plots.')
_STORAGE = flags.DEFINE_string('storage', None, 'Optuna storage URL (default '
                               'sqlite:///<study_dir>/study.db); e.g. postgresql+psycopg://'
                               'user:pass@host/db to share the study between hosts.')
_STUDY_NAME = flags.DEFINE_string('study_name', study_lib.DEFAULT_STUDY_NAME,
                                  'The study in the storage.')
_SPACE = flags.DEFINE_string('space', None, 'The search space file: NAME: KIND ARGS per line '
                             '(configs/space_seed.space).')
_TRIALS = flags.DEFINE_integer('trials', 20, 'Finished (complete or pruned) trials wanted in '
                               'all, over every worker and rerun.')
_WORKERS = flags.DEFINE_integer('workers', 1, 'Processes on this host, each running trials '
                                '(each a GPU of its own when there are GPUs).')
_OBJECTIVE = flags.DEFINE_enum('objective', 'val_auc', list(study_lib.OBJECTIVES),
                               "val_auc (maximized) or val_loss (minimized), of each trial's "
                               'best epoch by val AUC.')
_PRUNER = flags.DEFINE_enum('pruner', 'median', list(study_lib.PRUNERS),
                            'Stops bad trials early: median (from epoch 2, once 3 trials have '
                            'finished), hyperband, or none.')
_SAMPLER = flags.DEFINE_enum('sampler', 'tpe', list(study_lib.SAMPLERS), 'How trials are drawn.')
PROGRAM = 'tune'  # How its errors name it (also as __main__).

def fixed_from_flags():
  """{option: value} of every pcam-train flag (at its value here) not set by the search.

  (Not --profile_steps: its flag is 'START,STOP', the option a pair; a
  search's trials are not profiled.)
  """
  from pcam_tfdata.tuning import api  # pylint: disable=g-import-not-at-top
  skip = (*api.SET_BY_SEARCH, 'profile_steps')
  return {name: flags.FLAGS[name].value for name in config_lib.Config.__dataclass_fields__
          if name in flags.FLAGS and name not in skip}


def main(argv):
  if len(argv) > 1:
    cli.fail(PROGRAM, f'unexpected arguments {" ".join(argv[1:])}')
  # As pcam-train: per-save INFO lines would drown the per-epoch lines.
  if flags.FLAGS['verbose'].value:
    logging.set_verbosity(logging.INFO)
  elif not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  from pcam_tfdata.tuning import api  # pylint: disable=g-import-not-at-top
  from pcam_tfdata.tuning import worker  # pylint: disable=g-import-not-at-top
  if not _STUDY_DIR.value:
    cli.fail(PROGRAM, '--study_dir is required')
  if flags.FLAGS['model_dir'].present:
    print(f'{PROGRAM}: --model_dir={flags.FLAGS["model_dir"].value} is not used: each trial '
          f'runs in {_STUDY_DIR.value}/trials/<number>', flush=True)
  try:
    with cli.writes_to(PROGRAM, f'--study_dir={_STUDY_DIR.value}'):
      plan, records = api.make_plan(
          flags.FLAGS['records_dir'].value, _STUDY_DIR.value, space=_SPACE.value,
          trials=_TRIALS.value, storage=_STORAGE.value, study_name=_STUDY_NAME.value,
          objective=_OBJECTIVE.value, pruner=_PRUNER.value, sampler=_SAMPLER.value,
          seed=flags.FLAGS['seed'].value, log=lambda line: print(f'{PROGRAM}: {line}'),
          **fixed_from_flags())
      if _WORKERS.value == 1:
        cli.import_tensorflow(flags.FLAGS['verbose'].value)
      api.run(plan, records, _WORKERS.value)
  except (worker.Interrupted, KeyboardInterrupt) as e:
    terminated = getattr(e, 'signum', None) == signal.SIGTERM
    cli.fail(PROGRAM, f'{"stopped by SIGTERM" if terminated else "interrupted"}; rerun the same '
             'command to continue the search (a trial cut short resumes from its backup)',
             status=143 if terminated else 130)
  except ValueError as e:
    cli.fail(PROGRAM, e)


if __name__ == '__main__':
  cli.run_program(sys.modules[__name__])
