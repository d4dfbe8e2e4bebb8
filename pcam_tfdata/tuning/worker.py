"""One worker of a search: takes trials from the study until it holds --trials finished ones.

Each trial is an ordinary run (`pcam_tfdata.train`) in
`<study_dir>/trials/<number>`, reporting its objective after every epoch;
the pruner may stop it there. A retry (its worker died) trains on in the
folder of the trial it retries, from that run's backup.
"""

import dataclasses
import os
import socket
import sys
import time

from pcam_tfdata import rundir
from pcam_tfdata.training import preemption
from pcam_tfdata.tuning import results
from pcam_tfdata.tuning import study as study_lib

TRIALS_DIR = 'trials'
_POLL_SECONDS = 3  # While other workers finish the last trials.
_MAX_FAILED_IN_A_ROW = 3


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything a worker needs (picklable: workers are spawned processes)."""
  records_dir: str
  study_dir: str
  storage: str
  study_name: str
  space: tuple  # space.Param
  fixed: dict  # pcam-train settings other than the searched ones.
  trials: int
  objective: str = 'val_auc'
  pruner: str = 'median'
  sampler: str = 'tpe'
  seed: int | None = 0
  prefix: str = ''  # 'worker k: ' before each line, with several workers.
  worker: str = ''  # Who draws (the sampler's seed): '' alone, else index (and host).

  def max_epochs(self):
    """The most epochs a trial may train (--epochs, or the largest a searched one draws)."""
    for p in self.space:
      if p.name == 'epochs':
        return max(p.args)
    return self.fixed.get('epochs', 10)


class TrialFailed(ValueError):
  """A trial's run failed (refused settings, out of memory, ...): said in one line; the search goes on."""


class Interrupted(Exception):
  """Ctrl-C or SIGTERM stopped the search (a running trial backed up and queued to resume)."""

  def __init__(self, signum=None):
    super().__init__()
    self.signum = signum  # SIGTERM, or None for Ctrl-C.


def trial_dir(plan, number):
  return os.path.join(plan.study_dir, TRIALS_DIR, str(number))


def _say(plan, line):
  print(f'{plan.prefix}{line}', flush=True)


def _suggest(trial, param):
  if param.kind == 'choice':
    return trial.suggest_categorical(param.name, list(param.args))
  if param.kind == 'int':
    return trial.suggest_int(param.name, *param.args)
  return trial.suggest_float(param.name, *param.args, log=param.kind == 'loguniform')


class Objective:
  """Trains one trial; its value is the run's metrics.json[objective] (the best epoch by val AUC)."""

  def __init__(self, plan, study):
    self.plan, self.study = plan, study
    self.last_trial_id = None

  def __call__(self, trial):
    import optuna  # pylint: disable=g-import-not-at-top
    from pcam_tfdata.training import api  # pylint: disable=g-import-not-at-top
    plan, storage = self.plan, self.study._storage  # pylint: disable=protected-access
    self.last_trial_id = trial._trial_id  # pylint: disable=protected-access
    study_lib.record_owner(self.study, trial._trial_id)  # pylint: disable=protected-access
    frozen = storage.get_trial(trial._trial_id)  # pylint: disable=protected-access
    root = study_lib.root_number(frozen)
    params = {p.name: _suggest(trial, p) for p in plan.space}
    folder = trial_dir(plan, root)
    trial.set_user_attr('folder', os.path.relpath(folder, plan.study_dir))
    # Where, for a study shared between hosts (each with its own --study_dir).
    trial.set_user_attr('model_dir', os.path.abspath(folder))
    trial.set_user_attr('host', socket.gethostname())
    shown = ' '.join(f'--{k}={v}' for k, v in params.items())
    if root != trial.number:
      backup = os.path.join(folder, rundir.BACKUP_DIR)
      how = (f'from its backup in {backup}' if os.path.isdir(backup) and os.listdir(backup)
             else f'from scratch (no backup in {folder})')
      _say(plan, f'resuming trial {root} (as trial {trial.number}) {how}: {shown}')
    else:
      _say(plan, f'trial {root}: {shown}')
    reported = set()

    def report_history(before):
      # A resumed run's earlier epochs, from its history: the pruner compares
      # trials epoch by epoch.
      for old in rundir.read_history(os.path.join(folder, rundir.HISTORY_CSV)):
        step = int(old['epoch'])
        if step < before and step not in reported:
          trial.report(float(old[plan.objective]), step)
          reported.add(step)

    def on_epoch_end(epoch, row):
      report_history(epoch)
      trial.report(float(row[plan.objective]), epoch)
      reported.add(epoch)
      return trial.should_prune()

    start = time.time()
    try:
      metrics = api.train(plan.records_dir, folder, on_epoch_end=on_epoch_end, progress=False,
                          seed=plan.seed, **{**plan.fixed, **params})
    except (preemption.Preempted, KeyboardInterrupt) as e:
      # Queued now, by the one process that knows: a rerun resumes it.
      if study_lib.queue_retry(self.study, storage.get_trial(trial._trial_id)):  # pylint: disable=protected-access
        _say(plan, f'trial {root} interrupted; a rerun resumes it from its backup in {folder}')
      else:
        _say(plan, f'trial {root} interrupted, not retried: it was cut short '
             f'{study_lib.MAX_RETRIES} times before')
      raise Interrupted() from e
    except Exception as e:  # pylint: disable=broad-except
      # Refused settings, out of memory, a bad shard: one line, the trial
      # fails and the search goes on (3 in a row stop the worker).
      detail = str(e).strip().splitlines()[0] if str(e).strip() else ''
      _say(plan, f'trial {root} failed: {type(e).__name__}: {detail}' if not isinstance(
          e, ValueError) else f'trial {root} failed: {detail}')
      raise TrialFailed(detail) from e
    # The run's own time, against Optuna's duration of the trial: the tuner's cost.
    trial.set_user_attr('run_seconds', round(time.time() - start, 1))
    report_history(float('inf'))  # (A retry of a run that had finished trains no epoch.)
    value = metrics[plan.objective]
    trial.set_user_attr('best_epoch', metrics.get('best_epoch'))
    if metrics.get('pruned'):
      _say(plan, f'trial {root} pruned after epoch {metrics["epochs_run"]} '
           f'({plan.objective} {value:.4f} at its best epoch)')
      raise optuna.TrialPruned(f'after epoch {metrics["epochs_run"]}')
    _say(plan, f'trial {root} finished: {plan.objective} {value:.4f} '
         f'(best epoch {metrics.get("best_epoch")})')
    return value


class _NoRetracingNotes:
  """Drops TensorFlow's 'tf.function retracing' warning: each trial builds its own functions."""

  def filter(self, record):
    return 'triggered tf.function retracing' not in record.getMessage()


def run(plan):
  """Runs trials until the study holds plan.trials finished (complete or pruned) ones.

  Raises:
    Interrupted: Ctrl-C or SIGTERM (the trial was queued to resume).
    ValueError: the study cannot be opened, or trials kept failing.
  """
  import logging  # pylint: disable=g-import-not-at-top
  import optuna  # pylint: disable=g-import-not-at-top
  logging.getLogger('tensorflow').addFilter(_NoRetracingNotes())
  storage = study_lib.open_storage(plan.storage)
  study = optuna.load_study(study_name=plan.study_name, storage=storage)
  study.pruner = study_lib.make_pruner(plan.pruner, plan.max_epochs())
  objective = Objective(plan, study)
  failed_in_a_row = 0
  waiting_said = False
  while True:
    for number, queued in study_lib.take_over_dead_trials(study):
      _say(plan, f'trial {number}: its worker on this host is gone; ' + (
          'queued to resume' if queued else
          f'not retried: its worker died {study_lib.MAX_RETRIES} times before'))
    optuna.storages.fail_stale_trials(study)  # Other hosts' lost workers (heartbeat).
    finished, running, _ = study_lib.counts(study)
    if finished >= plan.trials:
      return
    if finished + running >= plan.trials:
      if not waiting_said:
        _say(plan, f'{finished} of {plan.trials} trials finished; waiting for the '
             f'{running} running')
        waiting_said = True
      time.sleep(_POLL_SECONDS)
      continue
    waiting_said = False
    study.sampler = study_lib.make_sampler(plan.sampler, plan.seed, len(study.trials),
                                           plan.worker)
    objective.last_trial_id = None
    study.optimize(objective, n_trials=1, catch=(TrialFailed,))
    failed = objective.last_trial_id is not None and study._storage.get_trial(  # pylint: disable=protected-access
        objective.last_trial_id).state == optuna.trial.TrialState.FAIL
    failed_in_a_row = failed_in_a_row + 1 if failed else 0
    results.write_tables(study, plan)
    if failed_in_a_row >= _MAX_FAILED_IN_A_ROW:
      raise ValueError(f'{_MAX_FAILED_IN_A_ROW} trials in a row failed (their lines above); '
                       'stopping this worker')


def main(plan, index, gpu=None):
  """A spawned worker process: `run(plan)`, its exit status what the parent needs to know."""
  if gpu is not None:
    os.environ['CUDA_VISIBLE_DEVICES'] = gpu
  from absl import logging  # pylint: disable=g-import-not-at-top
  from pcam_tfdata import cli  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)  # As the parent (pcam-train's per-save INFO lines off).
  cli.import_tensorflow()
  worker = str(index) if plan.storage.startswith('sqlite') else f'{index}@{socket.gethostname()}'
  plan = dataclasses.replace(plan, prefix=f'worker {index}: ', worker=worker)
  try:
    run(plan)
  except Interrupted:
    sys.exit(preemption.EXIT_STATUS)
  except KeyboardInterrupt:
    sys.exit(130)
  except ValueError as e:
    print(f'{plan.prefix}error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)
