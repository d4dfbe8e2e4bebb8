r"""Runs N training workers on this machine, as MultiWorkerMirroredStrategy needs them.

    python tools/launch_local_cluster.py --num_workers=2 -- \
        --flagfile=configs/demo.flags --model_dir=runs/demo_2workers

Each worker is `python -m pcam_tfdata.train <train flags> --strategy=multi_worker`
with a TF_CONFIG naming free loopback ports; worker 0 is the chief. Their logs
are streamed with a `[worker i]` prefix. If any worker fails, the others are
stopped and this exits non-zero; rerunning the same command resumes from the
chief's backup. On real clusters the same train command runs on each host
(see BUILD.md for Slurm and Kubernetes).

The workers' TensorFlow servers listen on every interface, unauthenticated,
for the length of the run (TensorFlow offers no loopback-only transport for
them): on a laptop on a shared network, firewall the ports or do not use it
there. When this launcher ends, however it ends, no worker remains.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app
from absl import flags

_NUM_WORKERS = flags.DEFINE_integer('num_workers', 2, 'Local worker processes.')


def free_ports(n):
  """n distinct free TCP ports on the loopback interface."""
  sockets = [socket.socket() for _ in range(n)]
  for s in sockets:
    s.bind(('127.0.0.1', 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def tf_config(ports, index):
  return json.dumps({'cluster': {'worker': [f'127.0.0.1:{p}' for p in ports]},
                     'task': {'type': 'worker', 'index': index}})


def _stream(proc, index):
  for line in proc.stdout:
    sys.stdout.write(f'[worker {index}] {line}')
    sys.stdout.flush()


def _stop(procs):
  """Stops every worker's process group: SIGTERM, then SIGKILL after 30 s."""
  for p in procs:
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGTERM)
  for p in procs:
    try:
      p.wait(timeout=30)
    except subprocess.TimeoutExpired:
      os.killpg(p.pid, signal.SIGKILL)
      p.wait()


def launch(num_workers, train_args):
  """Runs the workers; returns 0 when all succeed, else the first failure's code.

  However it ends (success, a failed worker, Ctrl-C or SIGTERM to this
  launcher), no worker outlives it, and so none of their ports stays open.
  """
  ports = free_ports(num_workers)
  procs = []
  previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # Runs `finally`.
  try:
    for i in range(num_workers):
      env = dict(os.environ, TF_CONFIG=tf_config(ports, i))
      # A session of its own: a worker's own children go with it, and Ctrl-C
      # reaches the launcher, which stops them in order.
      procs.append(subprocess.Popen(
          [sys.executable, '-m', 'pcam_tfdata.train', *train_args, '--strategy=multi_worker'],
          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
          start_new_session=True))
    streams = [threading.Thread(target=_stream, args=(p, i), daemon=True)
               for i, p in enumerate(procs)]
    for t in streams:
      t.start()
    failed = None
    while failed is None and any(p.poll() is None for p in procs):
      for i, p in enumerate(procs):
        if p.poll() not in (None, 0):
          failed = (i, p.returncode)
          break
      time.sleep(0.2)
    if failed is None:
      failed = next(((i, p.returncode) for i, p in enumerate(procs) if p.returncode), None)
    if failed is not None:
      _stop(procs)  # A collective would wait forever for the lost worker.
    for t in streams:
      t.join(timeout=5)
  finally:
    _stop(procs)
    signal.signal(signal.SIGTERM, previous)
  if failed is not None:
    index, code = failed
    print(f'launch_local_cluster.py: error: worker {index} exited with status {code}; '
          'stopped the others (rerun the same command to resume)', file=sys.stderr)
    return code if code > 0 else 1
  return 0


def main(argv):
  train_args = argv[1:]
  if _NUM_WORKERS.value < 1:
    print(f'launch_local_cluster.py: error: --num_workers={_NUM_WORKERS.value}: must be >= 1',
          file=sys.stderr)
    sys.exit(1)
  try:
    status = launch(_NUM_WORKERS.value, train_args)
  except KeyboardInterrupt:
    print('launch_local_cluster.py: error: interrupted; stopped every worker (rerun the '
          'same command to resume)', file=sys.stderr)
    sys.exit(130)
  sys.exit(status)


if __name__ == '__main__':
  app.run(main)
