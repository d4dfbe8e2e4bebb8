"""What a search leaves in --study_dir beside its trial folders: trials.csv, best.flags, plots.

trials.csv and best.flags are rewritten (whole, atomically) after every
trial by the worker that ran it, so a search killed at any point still has
them; the plots are drawn when the search ends.
"""

import csv
import io
import os

from pcam_tfdata import fs
from pcam_tfdata import rundir
from pcam_tfdata.training import config as config_lib
from pcam_tfdata.tuning import study as study_lib

TRIALS_CSV = 'trials.csv'
BEST_FLAGS = 'best.flags'
PLOTS = ('optimization_history', 'parallel_coordinate', 'param_importances')
# How much of a run's settings a flagfile leaves out: not flags, or not the trial's.
_NOT_FLAGS = ('records_dir', 'model_dir', 'progress', 'restart', 'eval_batch_size',
              'profile_steps')


def rows(study, plan):
  """One dict per trial, in number order: the columns of trials.csv."""
  out = []
  for trial in study.get_trials(deepcopy=False):
    history = trial.system_attrs.get('retry_history') or []
    row = {'number': trial.number, 'state': trial.state.name.lower(),
           'folder': folder_of(trial, plan.study_dir),
           'retry_of': history[-1] if history else ''}
    row.update({f'param_{p.name}': trial.params.get(p.name, '') for p in plan.space})
    row[plan.objective] = '' if trial.value is None else trial.value
    row['best_epoch'] = trial.user_attrs.get('best_epoch', '')
    values = trial.intermediate_values
    row['epochs'] = len(values)
    for step in range(1, plan.max_epochs() + 1):
      row[f'{plan.objective}_epoch_{step}'] = values.get(step, '')
    row['seconds'] = (round(trial.duration.total_seconds(), 1)
                      if trial.duration is not None else '')
    row['run_seconds'] = trial.user_attrs.get('run_seconds', '')  # Within pcam-train.
    out.append(row)
  return out


def folder_of(trial, study_dir):
  """A trial's run folder: relative to this --study_dir, or host:path where another host ran it."""
  model_dir = trial.user_attrs.get('model_dir')
  if not model_dir:
    return trial.user_attrs.get('folder', '')
  if os.path.dirname(os.path.dirname(model_dir)) == os.path.abspath(study_dir):
    return os.path.relpath(model_dir, study_dir)
  return f'{trial.user_attrs.get("host", "?")}:{model_dir}'


def flag_lines(settings):
  """`--name=value` lines for pcam-train, exact for floats (repr round-trips)."""
  lines = []
  for name, value in settings.items():
    if value is None:
      continue
    if isinstance(value, bool):
      lines.append(f'--{name}' if value else f'--no{name}')
    elif isinstance(value, float):
      lines.append(f'--{name}={value!r}')
    else:
      lines.append(f'--{name}={value}')
  return lines


def best_flags(study, plan):
  """best.flags' text for the best complete trial, or None if none has finished."""
  best = study_lib.best_trial(study, plan.objective)
  if best is None:
    return None
  defaults = config_lib.Config(records_dir='', model_dir='')
  fixed = {k: v for k, v in plan.fixed.items()
           if k not in _NOT_FLAGS and k not in best.params and getattr(defaults, k, None) != v}
  folder = folder_of(best, plan.study_dir)
  if ':' not in folder:  # (Else host:path, run elsewhere.)
    folder = os.path.join(plan.study_dir, folder)
  lines = [
      f'# The best trial of study {plan.study_name!r} ({plan.objective} {best.value!r}, '
      f'trial folder {folder}).',
      '# Trains it again, bit for bit on the same records and kind of machine:',
      f'#   pcam-train --flagfile={os.path.join(plan.study_dir, BEST_FLAGS)}',
      '# (a later --model_dir=... replaces the one below).',
      f'--records_dir={plan.records_dir}',
      f'--model_dir={os.path.join(plan.study_dir, "best")}',
      *flag_lines({'seed': plan.seed}),
      *flag_lines(fixed),
      *flag_lines(dict(sorted(best.params.items()))),
  ]
  return '\n'.join(lines) + '\n'


def write_tables(study, plan):
  """trials.csv and (once a trial has completed) best.flags, each written whole."""
  table = rows(study, plan)
  if table:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
    rundir.write_atomic(os.path.join(plan.study_dir, TRIALS_CSV), out.getvalue())
  text = best_flags(study, plan)
  if text:
    rundir.write_atomic(os.path.join(plan.study_dir, BEST_FLAGS), text)


def write_plots(study, plan, log=print):
  """Optuna's optimisation history, parallel coordinates and parameter importances, as PNG."""
  import warnings  # pylint: disable=g-import-not-at-top
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from optuna.visualization import matplotlib as views  # pylint: disable=g-import-not-at-top
  written = []
  for name in PLOTS:
    path = os.path.join(plan.study_dir, f'{name}.png')
    try:
      with warnings.catch_warnings():  # (Matplotlib's notes on one-valued axes.)
        warnings.simplefilter('ignore')
        axes = getattr(views, f'plot_{name}')(study)
      figure = getattr(axes, 'figure', None) or axes.flat[0].figure
      figure.savefig(path, dpi=100, bbox_inches='tight')
      plt.close(figure)
      written.append(path)
    except Exception as e:  # pylint: disable=broad-except
      # (Importances need 2 complete trials; parallel coordinates 1.)
      log(f'no {name}.png: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}')
      plt.close('all')
  return written


def read_trials(study_dir):
  """trials.csv as dicts, or ValueError naming the file."""
  path = fs.join(study_dir, TRIALS_CSV)
  try:
    return list(csv.DictReader(io.StringIO(fs.read_text(path))))
  except OSError as e:
    raise ValueError(f'{path}: no search here ({e.strerror})') from None
  except fs.errors() as e:  # (On a URL, TensorFlow's: NotFoundError, no credentials.)
    raise ValueError(f'{path}: no search here ({type(e).__name__})') from None


def table(study_dir):
  """The trials of a search as Markdown, best first (complete, then pruned, then the rest)."""
  trials = read_trials(study_dir)
  if not trials:
    raise ValueError(f'{fs.join(study_dir, TRIALS_CSV)}: no trials yet')
  objective = next(k for k in trials[0] if k in study_lib.OBJECTIVES)
  sign = -1 if study_lib.OBJECTIVES[objective] == 'maximize' else 1
  params = [k for k in trials[0] if k.startswith('param_')]
  order = {'complete': 0, 'pruned': 1, 'running': 2, 'waiting': 3, 'fail': 4}

  def last_value(row):
    values = [row[k] for k in row if k.startswith(f'{objective}_epoch_') and row[k] != '']
    return float(values[-1]) if values else float('nan')

  def key(row):
    value = float(row[objective]) if row[objective] else last_value(row)
    return (order.get(row['state'], 5), sign * value if value == value else float('inf'),
            int(row['number']))

  head = ['trial', 'state', objective, 'best epoch', 'epochs', *[p[6:] for p in params],
          'seconds', 'folder']
  lines = ['| ' + ' | '.join(head) + ' |', '|---' * len(head) + '|']
  for row in sorted(trials, key=key):
    value = f'{float(row[objective]):.4f}' if row[objective] else '-'
    cells = [row['number'], row['state'], value, row['best_epoch'] or '-', row['epochs'],
             *[row[p] for p in params], row['seconds'] or '-', row['folder'] or '-']
    lines.append('| ' + ' | '.join(str(c) for c in cells) + ' |')
  return '\n'.join(lines)
