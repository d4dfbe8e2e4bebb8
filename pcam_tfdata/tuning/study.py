"""The study a search lives in: its database, what it searches, and which trials are whose.

An Optuna study in a real database (a SQLite file by default; a PostgreSQL
or MySQL URL for several hosts, Optuna's documented distributed mode), so
that any worker may die without losing it:

- Each running trial beats a heartbeat into the database. A trial whose
  worker died (SIGKILL, a lost host) goes stale, and the next worker to look
  fails it and queues a retry with the same parameters (Optuna's
  `RetryHeartbeatStaleTrialCallback`). On the worker's own host this does
  not wait for the grace period: a trial whose process is gone (`Owner`) is
  taken over at once. A worker interrupted cleanly (Ctrl-C, SIGTERM) queues
  its own retry. A retry trains on in the folder of the trial it retries.
- A study records its space, fixed settings and objective; another search
  under the same name is refused, naming the difference.
"""

import contextlib
import dataclasses
import json
import os
import socket
import time
import warnings

HEARTBEAT_SECONDS = 10
GRACE_SECONDS = 60  # A trial silent this long is stale (its worker lost).
DEFAULT_STUDY_NAME = 'pcam'
STUDY_JSON = 'study.json'  # Which study a --study_dir's trial folders belong to.
SAMPLERS = ('tpe', 'random', 'cmaes')
PRUNERS = ('median', 'hyperband', 'none')
OBJECTIVES = {'val_auc': 'maximize', 'val_loss': 'minimize'}
MAX_RETRIES = 5  # Retries of one trial whose worker keeps dying.
_CREATE_ATTEMPTS = 5
_RACED = ('duplicate key', 'already exists', 'uniqueviolation', 'unique constraint')


def quiet_optuna():
  """Optuna's per-trial INFO lines and experimental-feature warnings off: the tuner says what matters."""
  import optuna  # pylint: disable=g-import-not-at-top
  optuna.logging.set_verbosity(optuna.logging.ERROR)
  warnings.filterwarnings('ignore', category=optuna.exceptions.ExperimentalWarning)
  warnings.filterwarnings('ignore', category=FutureWarning, module='optuna')


def default_storage(study_dir):
  return f'sqlite:///{os.path.abspath(os.path.join(study_dir, "study.db"))}'


def shown(url):
  """The URL with any password masked, for messages."""
  try:
    from sqlalchemy.engine import make_url  # pylint: disable=g-import-not-at-top
    return make_url(url).render_as_string(hide_password=True)
  except Exception:  # pylint: disable=broad-except
    return url


def open_storage(url):
  """Optuna's RDB storage at `url`, with heartbeats and retries of stale trials.

  Raises:
    ValueError: one line naming the URL: unreachable, refused, unknown
      dialect or driver.
  """
  import optuna  # pylint: disable=g-import-not-at-top
  quiet_optuna()
  engine = {}
  if url.startswith('sqlite'):
    # Several worker processes write one file: wait for the lock, not fail.
    engine = {'connect_args': {'timeout': 120}}
  else:
    # A database that is down answers no connection: fail in seconds.
    engine = {'connect_args': {'connect_timeout': 10}, 'pool_pre_ping': True}
  for attempt in range(1, _CREATE_ATTEMPTS + 1):
    try:
      return optuna.storages.RDBStorage(
          url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_SECONDS,
          grace_period=GRACE_SECONDS,
          heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
              max_retry=MAX_RETRIES))
    except Exception as e:  # pylint: disable=broad-except
      detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      # Hosts started together on a new database race to create its tables:
      # the loser finds them made, and tries again.
      if attempt < _CREATE_ATTEMPTS and any(w in detail.lower() for w in _RACED):
        time.sleep(0.5 * attempt)
        continue
      raise ValueError(f'--storage={shown(url)}: cannot open the study database ({detail})'
                       ) from None


@dataclasses.dataclass(frozen=True)
class Identity:
  """What a study searches: a second search under its name must match it."""
  space: tuple  # Param.text() of each searched flag.
  fixed: dict  # The other pcam-train settings ({flag: value}), records by fingerprint.
  objective: str

  def attrs(self):
    return {'space': list(self.space), 'fixed': self.fixed, 'objective': self.objective}


def differences(then, now):
  """Lines naming how a study's recorded identity differs from this search's."""
  out = []
  if then.get('objective') != now.objective:
    out.append(f'--objective: {then.get("objective")} then, {now.objective} now')
  old = {line.split(':', 1)[0]: line for line in then.get('space', [])}
  new = {line.split(':', 1)[0]: line for line in now.space}
  for name in sorted(set(old) | set(new)):
    if old.get(name) != new.get(name):
      was = old.get(name, f'{name}: fixed at {then.get("fixed", {}).get(name)!r}')
      is_ = new.get(name, f'{name}: fixed at {now.fixed.get(name)!r}')
      out.append(f'--{name}: "{was.split(": ", 1)[1]}" then, "{is_.split(": ", 1)[1]}" now')
  fixed_then = then.get('fixed', {})
  for name in sorted(set(fixed_then) | set(now.fixed)):
    if name in old or name in new:
      continue
    if fixed_then.get(name) != now.fixed.get(name) or (name in fixed_then) != (name in now.fixed):
      was = repr(fixed_then[name]) if name in fixed_then else 'not recorded'
      is_ = repr(now.fixed[name]) if name in now.fixed else 'not given'
      out.append(f'--{name}: {was} then, {is_} now')
  return out


def open_study(storage, name, identity, url):
  """Creates the study, or loads it and checks it searches what this search does.

  Raises:
    ValueError: a study of that name with another space, fixed flags or
      objective (naming each difference).
  """
  import optuna  # pylint: disable=g-import-not-at-top
  study = optuna.create_study(storage=storage, study_name=name, load_if_exists=True,
                              direction=OBJECTIVES[identity.objective])
  attrs = study.user_attrs
  if 'space' not in attrs:
    # New (or made by hand): record this search. Two workers racing here
    # write the same values.
    for key, value in identity.attrs().items():
      study.set_user_attr(key, value)
    return study
  differ = differences(attrs, identity)
  if differ:
    raise ValueError(f'study {name!r} in {shown(url)} searches something else '
                     f'({"; ".join(differ)}); use another --study_name (or --storage)')
  return study


def make_sampler(kind, seed, trials_so_far, worker=''):
  """A fresh sampler seeded by (seed, trials so far, worker): a rerun after a kill draws new points.

  One worker's search is so the same every time from the same history; two
  workers that count the same trials at once (`worker`: their index, and
  host on a shared database) still draw apart.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optuna  # pylint: disable=g-import-not-at-top
  rng_seed = None
  if seed is not None:
    words = [seed, trials_so_far, *worker.encode()]
    rng_seed = int(np.random.SeedSequence(words).generate_state(1)[0])
  if kind == 'random':
    return optuna.samplers.RandomSampler(seed=rng_seed)
  if kind == 'cmaes':
    return optuna.samplers.CmaEsSampler(seed=rng_seed, warn_independent_sampling=False)
  return optuna.samplers.TPESampler(seed=rng_seed)


def bind_study_dir(study_dir, storage_url, name, record=True):
  """Refuses a --study_dir that serves another study (their trial folders would mix); records ours.

  Args:
    record: write study.json if there is none (else only check).

  Raises:
    ValueError: the folder serves another study or storage.
  """
  path = os.path.join(study_dir, STUDY_JSON)
  mine = {'storage': shown(storage_url), 'study_name': name}
  try:
    with open(path) as f:
      theirs = json.load(f)
  except FileNotFoundError:
    if record:
      from pcam_tfdata import rundir  # pylint: disable=g-import-not-at-top
      rundir.write_atomic(path, json.dumps(mine, indent=1) + '\n')
    return
  except (OSError, ValueError) as e:
    raise ValueError(f'{path}: unreadable ({e}); is --study_dir another program\'s folder?'
                     ) from None
  if theirs != mine:
    raise ValueError(f'--study_dir={study_dir} holds the trials of study '
                     f'{theirs.get("study_name")!r} in {theirs.get("storage")}, not '
                     f'{name!r} in {mine["storage"]}: trial folders are numbered per study; '
                     'use another --study_dir')


def make_pruner(kind, epochs):
  """Median: from epoch 2, once 3 trials have finished; Hyperband over 1..--epochs epochs."""
  import optuna  # pylint: disable=g-import-not-at-top
  if kind == 'median':
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
  if kind == 'hyperband':
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1))
  return optuna.pruners.NopPruner()


# --- Who runs a trial, and whether they are still alive. ---

def _boot_id():
  try:
    with open('/proc/sys/kernel/random/boot_id') as f:
      return f.read().strip()
  except OSError:
    return ''


def _start_time(pid):
  """The process' start time in clock ticks since boot (Linux), or None."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return int(f.read().rsplit(')', 1)[1].split()[19])
  except (OSError, IndexError, ValueError):
    return None


def _pid_namespace():
  # Containers sharing a host name (host networking) have their own process
  # numbers: a pid means something only within its namespace.
  try:
    return os.readlink('/proc/self/ns/pid')
  except OSError:
    return ''


def owner():
  """This process, as a trial records who runs it."""
  return {'host': socket.gethostname(), 'boot': _boot_id(), 'pidns': _pid_namespace(),
          'pid': os.getpid(), 'start': _start_time(os.getpid())}


def owner_is_gone(record):
  """Whether a trial's recorded owner ran here (host, boot, process namespace) and is gone."""
  if not record or any(record.get(k) != v for k, v in (
      ('host', socket.gethostname()), ('boot', _boot_id()), ('pidns', _pid_namespace()))):
    return False  # Another host's (or container's): its heartbeat says.
  pid = record.get('pid')
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except (PermissionError, TypeError):
    return False
  # The number may have been reused by a later process.
  return record.get('start') is not None and _start_time(pid) != record.get('start')


def owner_key(trial_id):
  # Keyed by the trial's id: a retry copies its failed trial's attributes,
  # and must not look owned by the dead process.
  return f'pcam_owner_{trial_id}'


def record_owner(study, trial_id):
  study._storage.set_trial_system_attr(trial_id, owner_key(trial_id), owner())  # pylint: disable=protected-access


def take_over_dead_trials(study):
  """Fails and queues a retry of each running trial whose process on this host is gone.

  Atomic across workers: the database lets one of them fail a trial; only
  that one queues its retry. Returns [(number, queued)] of the trials taken
  over (queued False: retried MAX_RETRIES times already).
  """
  import optuna  # pylint: disable=g-import-not-at-top
  taken = []
  storage = study._storage  # pylint: disable=protected-access
  for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
    if not owner_is_gone(trial.system_attrs.get(owner_key(trial._trial_id))):  # pylint: disable=protected-access
      continue
    with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
      if storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL):  # pylint: disable=protected-access
        taken.append((trial.number,
                      queue_retry(study, storage.get_trial(trial._trial_id))))  # pylint: disable=protected-access
  return taken


def queue_retry(study, trial):
  """A waiting trial with `trial`'s parameters, marked a retry of it (as Optuna's own retries).

  Returns False (and queues nothing) for a trial retried MAX_RETRIES times already.
  """
  import optuna  # pylint: disable=g-import-not-at-top
  if len(trial.system_attrs.get('retry_history') or []) >= MAX_RETRIES:
    return False
  optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)(study, trial)
  return True


def root_number(trial):
  """The number of the first trial of a retry chain: its folder's name."""
  history = trial.system_attrs.get('retry_history') or []
  return history[0] if history else trial.number


def counts(study):
  """(finished: complete or pruned, running, waiting) trials of the study."""
  import optuna  # pylint: disable=g-import-not-at-top
  state = optuna.trial.TrialState
  trials = study.get_trials(deepcopy=False)
  finished = sum(t.state in (state.COMPLETE, state.PRUNED) for t in trials)
  running = sum(t.state == state.RUNNING for t in trials)
  waiting = sum(t.state == state.WAITING for t in trials)
  return finished, running, waiting


def best_trial(study, objective):
  """The best complete trial (ties: as max/min over (value, -number) pick), or None."""
  import optuna  # pylint: disable=g-import-not-at-top
  complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
  if not complete:
    return None
  pick = max if OBJECTIVES[objective] == 'maximize' else min
  return pick(complete, key=lambda t: (t.value, -t.number))


def encode_fixed(fixed):
  """The fixed settings as JSON-safe values (records by fingerprint, not path)."""
  return json.loads(json.dumps(fixed, default=str))
