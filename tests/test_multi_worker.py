"""MultiWorkerMirroredStrategy across local processes, through tools/launch_local_cluster.py.

Every run here is one that cannot end by itself (a million epochs, no early
stop) unless the test says how long it lasts, so a test that waits for the
launcher to react can only pass if the launcher did react.
"""

import contextlib
import csv
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from pcam_tfdata.commands import launch_local_cluster
from conftest import ROOT, user_env


LAUNCHER = 'tools/launch_local_cluster.py'
_ENDLESS = 10**6  # Epochs no test run reaches.
_TIMEOUT = 600  # Seconds any one wait may take on a loaded machine before it is a failure.


def _train_flags(records, model_dir, epochs=_ENDLESS, model='batchnorm'):
  return [f'--records_dir={records}', f'--model_dir={model_dir}', f'--epochs={epochs}',
          f'--early_stopping_patience={_ENDLESS}', '--batch_size=8', '--mixed_precision=off',
          '--seed=3', f'--model={model}', '--noprogress']


def _workers_left(model_dir):
  return subprocess.run(['pgrep', '-f', f'pcam_tfdata.train.*{model_dir}'], capture_output=True,
                        text=True).stdout.split()


def _servers(stdout):
  """{worker: port} from each worker's start-up line about its unauthenticated server."""
  found = re.findall(r'\[worker (\d)\] TensorFlow gRPC server of this worker on '
                     r'127\.0\.0\.1:(\d+): it listens on every interface and is unauthenticated',
                     stdout)
  return {w: int(p) for w, p in found}


def _listening(port):
  with socket.socket() as s:
    return s.connect_ex(('127.0.0.1', port)) == 0


@pytest.fixture
def launch(tmp_path):
  """Starts the launcher in the background; whatever happens, nothing of it outlives the test.

  Returns fn(records, model_dir, **train flags) -> (launcher, stdout path,
  stderr path); the output goes to files (a pipe nobody reads would fill).
  """
  started = []

  def start(records, model_dir, **flags):
    out_path, err_path = tmp_path / 'launcher.out', tmp_path / 'launcher.err'
    with open(out_path, 'w') as out, open(err_path, 'w') as err:
      # Started with SIGINT ignored, as a shell starts a script's background
      # job (and as pytest itself may have been): the launcher must still
      # act on it. The same verdict however pytest was started.
      launcher = subprocess.Popen([sys.executable, LAUNCHER, '--num_workers=2', '--',
                                   *_train_flags(records, model_dir, **flags)],
                                  cwd=ROOT, stdout=out, stderr=err, text=True, env=user_env(),
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    started.append((launcher, model_dir))
    return launcher, out_path, err_path

  yield start
  for launcher, model_dir in started:  # A failed test must not leave an endless run behind.
    if launcher.poll() is None:
      launcher.kill()
      launcher.wait()
    for pid in _workers_left(model_dir):
      os.kill(int(pid), signal.SIGKILL)


def _wait_for(condition, launcher, what, err_path):
  deadline = time.monotonic() + _TIMEOUT
  while not condition():
    assert launcher.poll() is None, f'launcher ended before {what}: {err_path.read_text()[-3000:]}'
    assert time.monotonic() < deadline, f'no {what} after {_TIMEOUT} s'
    time.sleep(0.1)


def _gone(model_dir, stdout):
  """No worker process and no port of theirs remains."""
  ports = _servers(stdout)
  assert len(ports) == 2, stdout[-3000:]
  assert _workers_left(model_dir) == []
  assert not any(map(_listening, ports.values()))


def _victim(model_dir, index):
  """The pid of worker `index` (from its TF_CONFIG)."""
  workers = _workers_left(model_dir)
  assert len(workers) == 2
  return int(max(workers, key=lambda pid: open(f'/proc/{pid}/environ', 'rb').read()
                 .count(f'"index": {index}'.encode())))


def _digests(stdout):
  digests = dict(re.findall(r'\[worker (\d)\] final weights sha256 (\w+)', stdout))
  assert set(digests) == {'0', '1'} and digests['0'] == digests['1'], stdout[-3000:]
  return digests['0']


def _history(model_dir):
  with open(model_dir / 'history.csv') as f:
    return [(r['epoch'], r['train_loss'], r['val_auc']) for r in csv.DictReader(f)]


@pytest.mark.slow
def test_sigterm_to_one_worker_preempts_both_and_the_rerun_ends_as_an_uninterrupted_run(
    records, tmp_path, launch):
  """BatchNorm: --sync_batch_norm=auto reduces its statistics over both workers."""
  model_dir = tmp_path / 'run'
  launcher, out_path, err_path = launch(records, model_dir)
  _wait_for(lambda: re.search(r'\[worker 1\] epoch=1 ', out_path.read_text()), launcher,
            'a trained epoch', err_path)
  os.kill(_victim(model_dir, 1), signal.SIGTERM)  # As a cluster manager preempts one host.
  assert launcher.wait(timeout=_TIMEOUT) == 42, err_path.read_text()[-3000:]
  # (Both exit 42 at about the same time: the launcher names the first it sees.)
  assert re.search(r'worker \d was preempted: every worker saved a backup', err_path.read_text())
  stdout = out_path.read_text()
  stops = re.findall(r'\[worker (\d)\] train: preempted at epoch (\d+), step (\d+): backup '
                     r'saved; rerun the same command to resume', stdout)
  assert sorted(w for w, _, _ in stops) == ['0', '1'], stdout[-3000:]
  assert len({(e, s) for _, e, s in stops}) == 1  # The same step on both.
  _, epoch, step = stops[0]
  _gone(model_dir, stdout)
  assert not (model_dir / 'metrics.json').exists()

  # The same command (but for --epochs, which may change) resumes there.
  epochs = int(epoch) + 1
  launcher, out_path, err_path = launch(records, model_dir, epochs=epochs)
  assert launcher.wait(timeout=_TIMEOUT) == 0, err_path.read_text()[-3000:]
  stdout = out_path.read_text()
  said = (f'resuming epoch {epoch} at step {step}' if step != '0'
          else f'resuming after epoch {int(epoch) - 1}')
  assert sorted(re.findall(rf'\[worker (\d)\] {said} ', stdout)) == ['0', '1'], stdout[-3000:]
  # A run that succeeds: no TensorFlow C++ warning or error record (issue 30: the
  # coordination service's StartAbort note as the workers leave).
  assert not re.findall(r'\[worker \d\] [WE]\d{4} [\d:.]+\s+\d+ \S+\.(?:cc|h):\d+\] .*',
                        stdout + err_path.read_text()), stdout[-3000:]
  resumed = _digests(stdout)
  # Each worker serves its half of every global batch of 8 (the global input order).
  pipelines = dict(re.findall(r'\[worker (\d)\] input pipeline (\d) of 2: \d+ steps of 4 per '
                              r'epoch', stdout))
  assert pipelines == {'0': '0', '1': '1'}, stdout[-3000:]
  assert '"strategy": "multi_worker"' in stdout and '"num_replicas_in_sync": 2' in stdout
  assert '"sync_batch_norm": true' in stdout
  # The chief's outputs, nothing of the other worker's scratch.
  assert (model_dir / 'model.keras').is_file() and (model_dir / 'metrics.json').is_file()
  assert sorted(p.name for p in model_dir.iterdir() if p.name.startswith('.')) == []
  _gone(model_dir, stdout)

  whole_dir = tmp_path / 'whole'
  launcher, out_path, err_path = launch(records, whole_dir, epochs=epochs)
  assert launcher.wait(timeout=_TIMEOUT) == 0, err_path.read_text()[-3000:]
  assert _digests(out_path.read_text()) == resumed
  assert _history(model_dir) == _history(whole_dir)  # Each epoch once, in order, as whole.


# A stand-in worker (no TensorFlow): says it is ready, then acts as told by
# argv[1] for its index (TF_CONFIG): 'preempt' = exit 42 on SIGINT, as a
# real worker after its backup; 'die' = SIGKILL itself; 'exit42' = exit 42
# at once (preempted on its own); 'stay' = note SIGINT and go on, until
# killed or (given a number) that many seconds pass, then exit 42. A role
# ending in '+child' first starts a child process that sleeps an hour (as
# a real worker's tf.data or compiler helpers would live on without it).
_STAND_IN = r'''
import json, os, signal, subprocess, sys, time
index = json.loads(os.environ['TF_CONFIG'])['task']['index']
role, _, child = sys.argv[1 + index].partition('+')
if child:  # Up (past its start-up) before this one is ready; its stderr nowhere, so that
  # a signal during its start-up cannot write into this worker's lines.
  child = subprocess.Popen([sys.executable, '-c', 'import time; print(1, flush=True); '
                            'time.sleep(3600)'], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL)
  child.stdout.readline()
  child = child.pid
def on_sigint(*_):
  print(f'SIGINT {index}', flush=True)
  if role == 'preempt':
    sys.exit(42)
signal.signal(signal.SIGINT, on_sigint)
print(f'ready {index} pid {os.getpid()} child {child or 0}', flush=True)
if role == 'die':
  os.kill(os.getpid(), signal.SIGKILL)
if role == 'exit42':
  sys.exit(42)
time.sleep(float(role.split(':')[1]) if ':' in role else 3600)
sys.exit(42)
'''
_LAUNCH_STAND_INS = r'''
import sys
from pcam_tfdata import cli
from pcam_tfdata.commands import launch_local_cluster
launch_local_cluster.WORKER_COMMAND = (sys.executable, '-c', sys.argv[1])
sys.argv = ['launch_local_cluster.py', '--num_workers=2', '--', *sys.argv[2:]]
cli.run_program(launch_local_cluster)
'''


def _launch_stand_ins(*roles):
  return subprocess.Popen([sys.executable, '-c', _LAUNCH_STAND_INS, _STAND_IN, *roles],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=user_env())


def _wait_until_ready(launcher, children=None):
  """The stand-ins' pids, once both are ready (their children's pids, if any, into `children`)."""
  ready = {}
  while len(ready) < 2:
    line = launcher.stdout.readline()
    assert line, launcher.stderr.read()
    for index, pid, child in re.findall(r'ready (\d) pid (\d+) child (\d+)', line):
      ready[index] = int(pid)
      if int(child) and children is not None:
        children.append(int(child))
  return list(ready.values())


@contextlib.contextmanager
def _children_end_with_their_worker(children):
  """Fails unless every child in `children` has ended by the end of the block; kills leftovers."""
  try:
    yield
    deadline = time.monotonic() + 60  # (A deadline for a failure, far below their hour.)
    while any(map(_alive, children)):
      assert time.monotonic() < deadline, 'a worker\'s child outlived it (not its group)'
      time.sleep(0.05)
  finally:
    for pid in filter(_alive, children):
      os.kill(pid, signal.SIGKILL)


def _alive(pid):
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().split(') ')[1][0] != 'Z'  # (A zombie has ended.)
  except FileNotFoundError:
    return False


def test_a_sigkilled_launcher_takes_its_workers_with_it():
  """Nothing can catch SIGKILL: the workers (which would sleep an hour) die of PR_SET_PDEATHSIG."""
  launcher = _launch_stand_ins('stay', 'stay')
  pids = _wait_until_ready(launcher)
  try:
    assert all(map(_alive, pids))
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 120  # (A deadline for a failure, far below the hour.)
    while any(map(_alive, pids)):
      assert time.monotonic() < deadline, 'a worker outlived its SIGKILLed launcher'
      time.sleep(0.05)
  finally:  # Whatever happened, no stand-in sleeps on after the test.
    for pid in filter(_alive, pids):
      os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize('sig, status, said', [
    (signal.SIGINT, 130, 'interrupted'),  # Ctrl-C.
    (signal.SIGTERM, 143, 'terminated'),  # A cluster manager.
])
def test_ctrl_c_or_sigterm_on_the_launcher_reaches_every_worker_as_sigint(sig, status, said):
  """(Real workers preempted by it, beside two CPU hogs: BUILD.md, "Stopping a cluster".)"""
  launcher = _launch_stand_ins('preempt+child', 'preempt+child')
  children = []
  with _children_end_with_their_worker(children):
    _wait_until_ready(launcher, children)
    assert len(children) == 2
    launcher.send_signal(sig)  # Each worker's group is sent SIGINT: its child ends too.
    out, err = launcher.communicate(timeout=_TIMEOUT)
  assert launcher.returncode == status
  assert sorted(re.findall(r'\[worker (\d)\] SIGINT', out)) == ['0', '1'], out
  assert err.splitlines()[-1] == (f'launch_local_cluster.py: error: {said}; stopped every '
                                  'worker (rerun the same command to resume)')


def test_a_second_sigterm_kills_the_workers_at_once_in_one_line():
  """Workers that note SIGINT and go on: the second SIGTERM ends the grace period."""
  launcher = _launch_stand_ins('stay', 'stay')
  _wait_until_ready(launcher)
  launcher.send_signal(signal.SIGTERM)
  while 'SIGINT' not in launcher.stdout.readline():  # The first reached a worker.
    pass
  launcher.send_signal(signal.SIGTERM)
  out, err = launcher.communicate(timeout=_TIMEOUT)
  assert launcher.returncode == 143, err
  assert err.splitlines() == ['launch_local_cluster.py: error: terminated; stopped every worker '
                              '(rerun the same command to resume)'], err


def test_the_stop_policy_saves_when_it_can_and_kills_when_it_cannot():
  grace = launch_local_cluster.GRACE_SECONDS
  assert launch_local_cluster.stop_policy(None) == (signal.SIGINT, grace)  # Ctrl-C: save.
  assert launch_local_cluster.stop_policy((None, 143)) == (signal.SIGINT, grace)  # SIGTERM.
  assert launch_local_cluster.stop_policy((1, 42)) == (None, grace)  # Preempted: they save too.
  assert launch_local_cluster.stop_policy((1, -9)) == (signal.SIGKILL, 0)  # Dead: no agreement.
  assert launch_local_cluster.stop_policy((0, 1)) == (signal.SIGKILL, 0)


def test_a_dead_worker_takes_the_others_at_once_without_a_signal_to_save():
  """They cannot save without it: no SIGINT, no grace; SIGKILL."""
  launcher = _launch_stand_ins('stay+child', 'die')
  children = []
  with _children_end_with_their_worker(children):
    _wait_until_ready(launcher, children)
    assert len(children) == 1
    out, err = launcher.communicate(timeout=_TIMEOUT)
  assert launcher.returncode == 1  # (A signal's death is no status of its own.)
  assert 'worker 1 exited with status -9; stopped the others' in err
  assert 'SIGINT' not in out  # Worker 0 was killed, not asked to save.


def test_a_worker_preempted_on_its_own_lets_the_others_save_unsignalled():
  """TensorFlow's handler has them save at the same step: wait for them, exit 42."""
  launcher = _launch_stand_ins('stay:2', 'exit42')
  out, err = launcher.communicate(timeout=_TIMEOUT)
  assert launcher.returncode == 42
  assert 'SIGINT' not in out  # Left alone to finish its save.
  assert err.splitlines()[-1] == ('launch_local_cluster.py: worker 1 was preempted: every '
                                  'worker saved a backup and stopped (rerun the same command '
                                  'to resume)')


# Ignores SIGINT, as its child (started first, sleeping) does: SIG_IGN is inherited.
_DEAF = r'''
import signal, subprocess, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])
print(child.pid, flush=True)
time.sleep(600)
'''


def _deaf():
  proc = subprocess.Popen([sys.executable, '-c', _DEAF], stdout=subprocess.PIPE, text=True,
                          start_new_session=True)
  return proc, int(proc.stdout.readline())  # Deaf to SIGINT from here on, and its child.


def test_workers_that_do_not_stop_are_killed_with_their_children_after_one_grace_period(
    monkeypatch):
  """Both deaf: the grace period is one for all of them, not one each (the timeouts given to
  their waits add up to it), and the kill takes each worker's group."""
  deaf, children = zip(*(_deaf() for _ in range(2)))
  timeouts = []
  for proc in deaf:
    real_wait = proc.wait

    def wait(timeout=None, real_wait=real_wait):
      timeouts.append(timeout)
      return real_wait(timeout)
    monkeypatch.setattr(proc, 'wait', wait)
  try:
    with _children_end_with_their_worker(list(children)):
      launch_local_cluster.stop(list(deaf), signal.SIGINT, grace=0.5)
    assert [proc.returncode for proc in deaf] == [-signal.SIGKILL] * 2
    graced = [t for t in timeouts if t is not None]
    assert len(graced) == 2 and graced[0] <= 0.5 and graced[1] < 0.1, timeouts
  finally:
    for proc in deaf:
      if proc.poll() is None:
        proc.kill()
      proc.stdout.close()


def test_free_ports_are_outside_the_ephemeral_range_and_bindable():
  ports = launch_local_cluster.free_ports(4)
  assert len(set(ports)) == 4
  for port in ports:
    assert 20000 <= port < 32768  # Not a port the kernel hands to a connection meanwhile.
    with socket.socket() as s:
      s.bind(('', port))
  with socket.socket() as taken:  # A port in use is never offered.
    taken.bind(('', ports[0]))
    taken.listen()
    assert launch_local_cluster.free_ports(1, _Draws([ports[0], ports[1]])) == [ports[1]]


class _Draws:
  """An RNG whose randint returns the given values in turn."""

  def __init__(self, values):
    self._values = iter(values)

  def randint(self, low, high):
    del low, high
    return next(self._values)
