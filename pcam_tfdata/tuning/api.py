"""A hyperparameter search as a call: what `pcam-tune` (`python -m pcam_tfdata.tune`) does.

    import pcam_tfdata as pt
    best = pt.tune('records/standin', 'studies/seed', space='configs/space_seed.space',
                   trials=24, epochs=10, model='batchnorm')
    best['params'], best['value'], best['flags']
"""

import dataclasses
import multiprocessing
import os
import shutil
import signal
import subprocess
import time

from pcam_tfdata import records as records_lib
from pcam_tfdata import rundir
from pcam_tfdata.training import config as config_lib
from pcam_tfdata.tuning import results
from pcam_tfdata.tuning import space as space_lib
from pcam_tfdata.tuning import study as study_lib
from pcam_tfdata.tuning import worker as worker_lib

# The pcam-train options a trial takes from the search, not from the caller.
SET_BY_SEARCH = ('records_dir', 'model_dir', 'seed', 'restart', 'progress')
_STOP_SECONDS = 60  # Ctrl-C: how long workers get to back up before they are killed.


def make_plan(records_dir, study_dir, *, space, trials, storage=None,
              study_name=study_lib.DEFAULT_STUDY_NAME, objective='val_auc', pruner='median',
              sampler='tpe', seed=0, log=print, **fixed):
  """Checks every setting and the space (before any study exists): a `worker.Plan`.

  Raises:
    TypeError: an unknown option. ValueError (space.SpaceError among them):
      one line naming the flag, or the space file and line.
  """
  options = {f.name for f in dataclasses.fields(config_lib.Config)} - set(SET_BY_SEARCH)
  unknown = sorted(set(fixed) - options)
  if unknown:
    raise TypeError(f'pcam_tfdata.tune: unknown option {unknown[0]!r}; the pcam-train options '
                    f'are {", ".join(sorted(options))}')
  checks = [
      (isinstance(trials, int) and trials >= 1, f'--trials={trials}: must be >= 1'),
      (objective in study_lib.OBJECTIVES,
       f'--objective={objective}: choose one of {", ".join(study_lib.OBJECTIVES)}'),
      (pruner in study_lib.PRUNERS, f'--pruner={pruner}: choose one of {", ".join(study_lib.PRUNERS)}'),
      (sampler in study_lib.SAMPLERS,
       f'--sampler={sampler}: choose one of {", ".join(study_lib.SAMPLERS)}'),
      (seed is None or 0 <= seed < 2**32, f'--seed={seed}: must be in 0..{2**32 - 1}'),
      (bool(study_dir), '--study_dir is required'),
  ]
  for ok, message in checks:
    if not ok:
      raise ValueError(message)
  params = _read_space(space)
  searched = {p.name for p in params}
  defaults = config_lib.Config(records_dir='', model_dir='')
  for name in sorted(searched & set(fixed)):
    if fixed[name] != getattr(defaults, name):
      log(f'--{name} is searched (the space), so its value {fixed[name]!r} is not used')
  config = config_lib.Config(records_dir='', model_dir='', **{
      k: v for k, v in fixed.items() if k not in searched})
  config_lib.check_config(config)
  # Every option, defaults spelled out: the command and the call that ask
  # for the same search record the same study.
  fixed = {k: getattr(config, k) for k in sorted(options) if k not in searched}
  space_lib.check(params, fixed)
  records = records_lib.Records.open(records_dir)  # A wrong folder fails here, in one line.
  study_dir = os.path.abspath(study_dir)
  rundir.check_writable(study_dir)
  return worker_lib.Plan(
      records_dir=os.path.abspath(records.path), study_dir=study_dir,
      storage=storage or study_lib.default_storage(study_dir), study_name=study_name,
      space=tuple(params), fixed=dict(fixed), trials=trials, objective=objective,
      pruner=pruner, sampler=sampler, seed=seed), records


def _read_space(space):
  """A path to a space file, or {flag: 'KIND ARGS'} (a notebook's space)."""
  if isinstance(space, dict):
    text = '\n'.join(f'{name}: {spec}' for name, spec in space.items())
    return space_lib.parse(text, '<space>')
  if not isinstance(space, str) or not space:
    raise ValueError('--space is required: a space file (configs/space_seed.space)')
  from pcam_tfdata import cli  # pylint: disable=g-import-not-at-top
  if not os.path.exists(space):
    space = cli.packaged_config(space) or space  # configs/NAME from the installed package.
  return space_lib.read(space)


def identity(plan, records):
  """What the study records of this search (records by their fingerprint, not their path)."""
  fixed = dict(plan.fixed)
  fixed['records'] = records.manifest.get('fingerprint')
  fixed['seed'] = plan.seed
  return study_lib.Identity(space=tuple(p.text() for p in plan.space),
                            fixed=study_lib.encode_fixed(fixed), objective=plan.objective)


def run(plan, records, workers=1, log=print):
  """Runs the search to plan.trials finished trials; returns the best (see `tune`).

  Raises:
    ValueError: the study cannot be opened or is another search's; fewer
      --trials than it holds finished; a worker failed.
    worker.Interrupted: Ctrl-C or SIGTERM (rerun to continue).
  """
  import optuna  # pylint: disable=g-import-not-at-top
  if not isinstance(workers, int) or workers < 1:
    raise ValueError(f'--workers={workers}: must be >= 1')
  study_lib.bind_study_dir(plan.study_dir, plan.storage, plan.study_name, record=False)
  storage = study_lib.open_storage(plan.storage)
  study = study_lib.open_study(storage, plan.study_name, identity(plan, records), plan.storage)
  study_lib.bind_study_dir(plan.study_dir, plan.storage, plan.study_name)
  finished, _, _ = study_lib.counts(study)
  if plan.trials < finished:
    raise ValueError(f'--trials={plan.trials}: study {plan.study_name!r} already holds '
                     f'{finished} finished trials; ask for at least that many')
  log(f'study {plan.study_name!r} in {study_lib.shown(plan.storage)}: {finished} of '
      f'{plan.trials} trials finished; trial folders in '
      f'{os.path.join(plan.study_dir, worker_lib.TRIALS_DIR)}')
  try:
    if workers == 1:
      worker_lib.run(plan)
    else:
      _run_workers(plan, workers, log)
  finally:  # Interrupted too: the tables as the study now stands.
    study = optuna.load_study(study_name=plan.study_name, storage=storage)
    results.write_tables(study, plan)
  results.write_plots(study, plan, log)
  return best(study, plan, log)


def best(study, plan, log=print):
  """{'number', 'value', 'params', 'model_dir', 'flags', 'metrics'} of the best complete trial."""
  import json  # pylint: disable=g-import-not-at-top
  top = study_lib.best_trial(study, plan.objective)
  if top is None:
    log('no trial has completed (all pruned or failed): no best.flags')
    return None
  folder = top.user_attrs.get('model_dir') or os.path.join(plan.study_dir,
                                                           top.user_attrs.get('folder', ''))
  try:
    with open(os.path.join(folder, rundir.METRICS_JSON)) as f:
      metrics = json.load(f)
  except OSError:  # Run on another host of a shared study.
    metrics = None
  flags_path = os.path.join(plan.study_dir, results.BEST_FLAGS)
  where = '' if metrics is not None else f' (run on {top.user_attrs.get("host", "another host")})'
  log(f'best: trial {study_lib.root_number(top)}{where} ({plan.objective} {top.value:.4f}): '
      f'{" ".join(f"--{k}={v}" for k, v in top.params.items())}; {flags_path}')
  return {'number': study_lib.root_number(top), 'value': top.value, 'params': top.params,
          'model_dir': folder, 'flags': flags_path, 'metrics': metrics}


def _gpus():
  """The GPUs a worker may be given (CUDA_VISIBLE_DEVICES, else nvidia-smi), without TensorFlow."""
  visible = os.environ.get('CUDA_VISIBLE_DEVICES')
  if visible is not None:
    return [g for g in visible.split(',') if g.strip() and g.strip() != '-1']
  if not shutil.which('nvidia-smi'):
    return []
  try:
    out = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, timeout=20,
                         check=False).stdout
  except (OSError, subprocess.SubprocessError):
    return []
  return [str(k) for k, line in enumerate(out.splitlines()) if line.startswith('GPU ')]


def _run_workers(plan, workers, log):
  """`workers` spawned processes on this host: each a GPU of its own, round robin, if any."""
  gpus = _gpus()
  context = multiprocessing.get_context('spawn')  # (No copy of this process' threads.)
  procs = []
  for k in range(workers):
    gpu = gpus[k % len(gpus)] if gpus else None
    proc = context.Process(target=worker_lib.main, args=(plan, k, gpu), name=f'pcam-tune-{k}')
    proc.start()
    procs.append(proc)
  if gpus:
    log(f'{workers} workers on GPUs {", ".join(gpus[k % len(gpus)] for k in range(workers))}')

  def on_sigterm(signum, frame):  # A cluster manager's stop: passed on, as Ctrl-C is.
    raise _Terminated()

  previous = signal.signal(signal.SIGTERM, on_sigterm)
  try:
    for proc in procs:
      proc.join()
  except KeyboardInterrupt:
    _stop(procs, signal.SIGINT)
    raise worker_lib.Interrupted() from None
  except _Terminated:
    _stop(procs, signal.SIGTERM)
    raise worker_lib.Interrupted(signal.SIGTERM) from None
  finally:
    signal.signal(signal.SIGTERM, previous)
  codes = [p.exitcode for p in procs]
  if any(c in (130, -signal.SIGINT, -signal.SIGTERM) or c == _interrupted_status()
         for c in codes):
    raise worker_lib.Interrupted()
  bad = [(k, c) for k, c in enumerate(codes) if c]
  if bad:
    raise ValueError(f'worker {bad[0][0]} ended with status {bad[0][1]} (its lines above); '
                     'rerun to continue the search')


def _interrupted_status():
  from pcam_tfdata.training import preemption  # pylint: disable=g-import-not-at-top
  return preemption.EXIT_STATUS


class _Terminated(Exception):
  pass


def _stop(procs, signum):
  """Every worker gets the signal (backs up its trial), then SIGKILL after _STOP_SECONDS."""
  for proc in procs:
    if proc.is_alive():
      os.kill(proc.pid, signum)  # (A terminal's Ctrl-C may have reached them already.)
  deadline = time.time() + _STOP_SECONDS
  for proc in procs:
    proc.join(max(0.0, deadline - time.time()))
  for proc in procs:
    if proc.is_alive():
      proc.kill()
      proc.join()


def tune(records_dir, study_dir, *, space, trials, storage=None,
         study_name=study_lib.DEFAULT_STUDY_NAME, workers=1, objective='val_auc',
         pruner='median', sampler='tpe', seed=0, **fixed):
  """Searches pcam-train's flags, as `pcam-tune`; returns the best trial's settings and metrics.

  Each trial is an ordinary run in `<study_dir>/trials/<number>`; the study
  lives in `storage` (default `sqlite:///<study_dir>/study.db`), so a
  search killed at any point continues where it stood when called again.

  Example:

    import pcam_tfdata as pt
    best = pt.tune('records/standin', 'studies/nb',
                   space={'learning_rate': 'loguniform 1e-4 1e-2',
                          'batch_size': 'choice 32 64 128'},
                   trials=12, epochs=5, model='batchnorm')
    best['params'], best['value']  # e.g. {'learning_rate': 0.0021, 'batch_size': 64}, 0.951

  Args:
    records_dir: a records folder.
    study_dir: trial folders, trials.csv, best.flags, plots.
    space: a space file (`configs/space_seed.space`; `space.py` says the
      format) or {flag: 'KIND ARGS'}.
    trials: finished (complete or pruned) trials wanted, over every worker
      and every call on this study.
    storage: an Optuna storage URL (a PostgreSQL URL to share the study
      between hosts).
    study_name: the study's name in the storage.
    workers: processes on this host (spawned; each a GPU of its own if there
      are GPUs). With 1, trials run in this process.
    objective: 'val_auc' (maximized) or 'val_loss' (minimized), of each
      run's best epoch by val AUC (the seed's checkpoint).
    pruner: 'median', 'hyperband' or 'none'.
    sampler: 'tpe', 'random' or 'cmaes'.
    seed: seeds the sampler and every trial's training (best.flags then
      reproduces the best trial bit for bit); None for neither.
    **fixed: pcam-train's options (as `pt.train`'s), the same in every trial.

  Returns:
    {'number': the best trial's folder number, 'value', 'params', 'model_dir',
    'flags': best.flags' path, 'metrics': its metrics.json}, or None when no
    trial completed.

  Raises:
    TypeError: an unknown option. ValueError: a bad setting or space line
    (naming it), a storage that cannot be reached, a study of another
    search under this name. worker.Interrupted: Ctrl-C (call again to
    continue; the interrupted trial resumes from its backup).
  """
  plan, records = make_plan(records_dir, study_dir, space=space, trials=trials,
                            storage=storage, study_name=study_name, objective=objective,
                            pruner=pruner, sampler=sampler, seed=seed, **fixed)
  return run(plan, records, workers)
