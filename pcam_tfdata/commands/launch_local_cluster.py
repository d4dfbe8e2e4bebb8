r"""Runs N training workers on this machine, as MultiWorkerMirroredStrategy needs them.

    python tools/launch_local_cluster.py --num_workers=2 -- \
        --flagfile=configs/demo.flags --model_dir=runs/demo_2workers

Each worker is `python -m pcam_tfdata.train <train flags> --strategy=multi_worker`
with a TF_CONFIG naming free loopback ports; worker 0 is the chief. Their logs
are streamed with a `[worker i]` prefix. If any worker fails, the others are
killed and this exits non-zero; rerunning the same command resumes from the
chief's last backup. On real clusters the same train command runs on each
host (see BUILD.md for Slurm and Kubernetes).

Ctrl-C, and SIGTERM to this launcher (what a cluster manager sends), reach
every worker as SIGINT. While training, a worker takes it (as SIGTERM) as a
preemption notice: all workers save a backup at the next step they all reach
and exit with status 42 (TensorFlow's PreemptionCheckpointHandler); before
training starts, a worker just stops. SIGINT rather than SIGTERM because
before a worker's training starts, MultiWorkerMirroredStrategy would
swallow SIGTERM. A worker preempted on its own (SIGTERM to it alone) takes
its peers with it through the same handler; this launcher then waits for
them and exits 42. A worker still running after the grace period is
killed, and a worker that dies (or the launcher, SIGKILLed) takes the
others with it at once: they cannot save without it. The workers'
TensorFlow servers listen on every interface, unauthenticated, for the
length of the run (TensorFlow offers no loopback-only transport for them):
on a laptop on a shared network, firewall the ports or do not use it there.
When this launcher ends, however it ends, no worker remains.
"""

import ctypes
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import flags

from pcam_tfdata import cli

_NUM_WORKERS = flags.DEFINE_integer('num_workers', 2, 'Local worker processes.')

# A signalled worker's time to save its backup and stop before it is killed,
# all workers at once (measured: 2-5 s under two CPU hogs; Kubernetes' own
# grace is 30 s, so the launcher's stop fits inside it).
GRACE_SECONDS = 15.0
PREEMPTED = 42  # A worker's status after a preemption backup (training/preemption.py).
_PR_SET_PDEATHSIG = 1
# Ports are drawn below Linux's default ephemeral range (32768-60999): the
# kernel hands ports from that range to every outgoing connection and every
# bind to port 0, and it could hand one out between our check and the
# worker's own bind, seconds later.
_PORT_RANGE = (20000, 32767)
PROGRAM = 'launch_local_cluster.py'  # How its errors name it.
# What each worker runs, before the train flags (tests put a stand-in here).
WORKER_COMMAND = (sys.executable, '-m', 'pcam_tfdata.train')


def _bindable(port):
  """Whether `port` is free on every interface, as the workers' servers bind it."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    try:
      s.bind(('', port))
    except OSError:
      return False
  return True


def free_ports(n, rng=random):
  """n distinct TCP ports free now on every interface, outside the ephemeral range."""
  ports = []
  for _ in range(1000):
    port = rng.randint(*_PORT_RANGE)
    if port not in ports and _bindable(port):
      ports.append(port)
      if len(ports) == n:
        return ports
  raise RuntimeError(f'no {n} free ports in {_PORT_RANGE[0]}..{_PORT_RANGE[1]}')


def tf_config(ports, index):
  return json.dumps({'cluster': {'worker': [f'127.0.0.1:{p}' for p in ports]},
                     'task': {'type': 'worker', 'index': index}})


def _die_with_parent(parent):
  """In the child, before exec: SIGKILL when the launcher dies, however it dies (Linux)."""
  try:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
  except (OSError, AttributeError):  # Not Linux: the launcher's own handlers must do.
    return
  if os.getppid() != parent:  # It died before the prctl.
    os.kill(os.getpid(), signal.SIGKILL)


def _stream(proc, index):
  for line in proc.stdout:
    sys.stdout.write(f'[worker {index}] {line}')
    sys.stdout.flush()


def stop(procs, sig=signal.SIGINT, grace=GRACE_SECONDS):
  """Sends `sig` (if any) to every running worker's group; kills what still runs after `grace`."""
  for p in procs:
    if sig is not None and p.poll() is None:
      try:
        os.killpg(p.pid, sig)
      except ProcessLookupError:  # Ended between the poll and the signal.
        pass
  deadline = time.monotonic() + grace  # One grace period for all, not one each.
  try:
    for p in procs:
      try:
        p.wait(timeout=max(0.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        _kill(p)
  except BaseException:  # A second Ctrl-C or SIGTERM while waiting: no more grace.
    for p in procs:
      _kill(p)
    raise


def _kill(proc):
  if proc.poll() is None:
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # Ended between the poll and the kill.
      pass
  proc.wait()


class _Terminated(Exception):
  """This launcher got SIGTERM."""


def _on_sigterm(*_):
  raise _Terminated()


def launch(num_workers, train_args):
  """Runs the workers; returns 0 when all succeed, else the first failure's code.

  However it ends (success, a failed worker, Ctrl-C or SIGTERM to this
  launcher), no worker outlives it, and so none of their ports stays open.
  Ctrl-C (KeyboardInterrupt) is raised again once the workers have stopped.
  """
  ports = free_ports(num_workers)
  procs, streams = [], []
  previous = signal.signal(signal.SIGTERM, _on_sigterm)
  try:
    for i in range(num_workers):
      env = dict(os.environ, TF_CONFIG=tf_config(ports, i))
      # A session of its own: a worker's own children go with it, and Ctrl-C
      # reaches the launcher, which passes it on and waits for them.
      parent = os.getpid()
      procs.append(subprocess.Popen(
          [*WORKER_COMMAND, *train_args, '--strategy=multi_worker'],
          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
          start_new_session=True, preexec_fn=lambda: _die_with_parent(parent)))
      streams.append(threading.Thread(target=_stream, args=(procs[-1], i), daemon=True))
      streams[-1].start()
    failed = _wait(procs)
  except _Terminated:
    failed = (None, 143)
  except BaseException:  # Ctrl-C (KeyboardInterrupt), raised again below.
    failed = None
    raise
  finally:
    stop(procs, *stop_policy(failed))
    signal.signal(signal.SIGTERM, previous)
    for t in streams:  # Every worker's last lines before ours (their pipes are closed).
      t.join(timeout=10)
  if failed is None:
    return 0
  index, code = failed
  if index is None:
    print(f'{PROGRAM}: error: terminated; stopped every worker (rerun the '
          'same command to resume)', file=sys.stderr)
  elif code == PREEMPTED:
    print(f'{PROGRAM}: worker {index} was preempted: every worker saved a backup '
          'and stopped (rerun the same command to resume)', file=sys.stderr)
  else:
    print(f'{PROGRAM}: error: worker {index} exited with status {code}; '
          'stopped the others (rerun the same command to resume)', file=sys.stderr)
  return code if code > 0 else 1


def stop_policy(failed):
  """How to stop the workers still running: (signal or None, grace seconds).

  Args:
    failed: None (Ctrl-C, or every worker done), (None, status) (SIGTERM to
      this launcher) or (index, status) of the first worker that failed.
  """
  if failed is None or failed[0] is None:
    return signal.SIGINT, GRACE_SECONDS  # Time to save (SIGINT: see the module docstring).
  if failed[1] == PREEMPTED:
    return None, GRACE_SECONDS  # The others save at the same step: wait for them.
  return signal.SIGKILL, 0  # A failed worker: the others cannot save without it.


def _wait(procs):
  """Waits until every worker has ended, or one failed: None, or (index, status)."""
  while True:
    for i, p in enumerate(procs):
      if p.poll() not in (None, 0):
        return i, p.returncode
    if all(p.poll() == 0 for p in procs):
      return None
    time.sleep(0.2)


def main(argv):
  # Ctrl-C (or kill -INT) must reach us even when we were started with SIGINT
  # ignored, as a shell starts a script's background jobs: we pass it on.
  signal.signal(signal.SIGINT, signal.default_int_handler)
  train_args = argv[1:]
  if _NUM_WORKERS.value < 1:
    print(f'{PROGRAM}: error: --num_workers={_NUM_WORKERS.value}: must be >= 1',
          file=sys.stderr)
    sys.exit(1)
  try:
    status = launch(_NUM_WORKERS.value, train_args)
  except KeyboardInterrupt:
    print(f'{PROGRAM}: error: interrupted; stopped every worker (rerun the '
          'same command to resume)', file=sys.stderr)
    sys.exit(130)
  except _Terminated:  # A second SIGTERM while the workers stopped: killed at once.
    print(f'{PROGRAM}: error: terminated; stopped every worker (rerun the '
          'same command to resume)', file=sys.stderr)
    sys.exit(143)
  sys.exit(status)


if __name__ == '__main__':
  cli.run_program(sys.modules[__name__])
