r"""Scale-out overhead on one machine: local workers and the tf.data service, in one run.

    python tools/bench_scale.py --records_dir=records/demo --epochs=2

Two parts, each against its local anchor measured in the same run:
  * input: images/s of training batches (batch 64, no model) from the local
    cached pipeline and through an in-process tf.data service with 1 and 2
    workers (median of --repeats passes of --steps batches after a warm-up);
  * training: images/s of the baseline model (epochs after the first, from
    history.csv) with the default strategy in one process, and with
    MultiWorkerMirroredStrategy over 1 and 2 local worker processes started by
    tools/launch_local_cluster.py, at the same global batch.
On 2 cores these figures show overhead, not speed-up: the workers share them.
"""

import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

_RECORDS_DIR = flags.DEFINE_string('records_dir', 'records/demo', 'Records folder.')
_EPOCHS = flags.DEFINE_integer('epochs', 2, 'Training epochs per run (the first is warm-up).')
_STEPS = flags.DEFINE_integer('steps', 200, 'Batches per input timing.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Input timings per figure (median).')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 64, 'Global batch.')


def _input_rate(ds, steps, repeats, batch_size):
  iterator = iter(ds)
  for _ in range(20):  # Warm-up: tracing, the cache, the service's first splits.
    next(iterator)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      next(iterator)
    times.append(time.perf_counter() - start)
  return steps * batch_size / statistics.median(times)


def input_rates(records_dir, steps, repeats, batch_size):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from pcam_tfdata import pipeline  # pylint: disable=g-import-not-at-top
  local = pipeline.make_dataset(records_dir, 'train', batch_size=batch_size, training=True).repeat()
  rates = {'local cached pipeline': _input_rate(local, steps, repeats, batch_size)}
  for workers in (1, 2):
    dispatcher = tf.data.experimental.service.DispatchServer()
    address = dispatcher.target.split('://')[1]
    servers = [tf.data.experimental.service.WorkerServer(
        tf.data.experimental.service.WorkerConfig(dispatcher_address=address))
               for _ in range(workers)]
    ds = pipeline.make_service_dataset(records_dir, 'train', dispatcher.target,
                                       batch_size=batch_size, repeat=True,
                                       job_name=f'bench{workers}')
    rates[f'tf.data service, {workers} worker{"s" if workers > 1 else ""}'] = _input_rate(
        ds, steps, repeats, batch_size)
    for s in servers:
      s.stop()
    dispatcher.stop()
  return rates


def _train_rate(model_dir):
  with open(os.path.join(model_dir, 'history.csv')) as f:
    rows = list(csv.DictReader(f))[1:]  # The first epoch traces and fills the cache.
  return statistics.median(float(r['images_per_second']) for r in rows)


def training_rates(records_dir, epochs, batch_size, work):
  common = [f'--records_dir={records_dir}', f'--epochs={epochs}', f'--batch_size={batch_size}',
            '--mixed_precision=off', '--seed=0', '--early_stopping_patience=99']
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  rates = {}
  runs = [('default strategy, 1 process', [sys.executable, '-m', 'pcam_tfdata.train',
                                            '--strategy=default']),
          ('multi-worker, 1 local worker', [sys.executable, 'tools/launch_local_cluster.py',
                                            '--num_workers=1', '--']),
          ('multi-worker, 2 local workers', [sys.executable, 'tools/launch_local_cluster.py',
                                             '--num_workers=2', '--'])]
  for i, (name, command) in enumerate(runs):
    model_dir = os.path.join(work, f'run{i}')
    subprocess.run([*command, *common, f'--model_dir={model_dir}'], check=True, env=env,
                   capture_output=True)
    rates[name] = _train_rate(model_dir)
  return rates


def main(argv):
  del argv
  inputs = input_rates(_RECORDS_DIR.value, _STEPS.value, _REPEATS.value, _BATCH_SIZE.value)
  with tempfile.TemporaryDirectory() as work:
    trains = training_rates(_RECORDS_DIR.value, _EPOCHS.value, _BATCH_SIZE.value, work)
  for title, rates, anchor in (('input only (no model)', inputs, 'local cached pipeline'),
                               ('training, baseline model', trains,
                                'default strategy, 1 process')):
    print(f'\n{title}, batch {_BATCH_SIZE.value}, {os.cpu_count()} cores')
    print(f'| method | images/s | x {anchor} |')
    print('|---|---:|---:|')
    for name, rate in rates.items():
      print(f'| {name} | {rate:,.0f} | {rate / rates[anchor]:.2f} |')


if __name__ == '__main__':
  app.run(main)
