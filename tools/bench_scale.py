r"""Scale-out overhead on one machine: strategies and the tf.data service, in one run.

    python tools/bench_scale.py --records_dir=records/demo --epochs=4 --repeats=3

Two parts, each against its local anchor measured in the same run:
  * input: images/s of training batches (batch 64, no model) from the local
    cached pipeline, the local uncached one, the local streaming pipeline
    (exactly what service workers run: read, parse, shuffle buffer, batch),
    and through an in-process tf.data service with 1 and 2 workers (median
    of --repeats passes of --steps batches after a warm-up). Service against
    local streaming is the service's own cost; streaming against cached is
    what the missing whole-split cache costs.
  * training: images/s of the baseline model through the train CLI (epochs
    after the first, from history.csv) with the default strategy,
    MirroredStrategy on 2 logical CPU devices, and MultiWorkerMirroredStrategy
    over 1 and 2 local worker processes (tools/launch_local_cluster.py), at
    the same global batch. The runs are interleaved --repeats times, so drift
    on a shared machine hits them all; each figure is the median over runs of
    each run's median epoch.
  * feeding: ms per training step (baseline, batch 64, median of --steps
    steps after a warm-up) with the default strategy and with
    MultiWorkerMirroredStrategy over one local worker, each fed by a
    distributed iterator (`distribute_datasets_from_function`) and by the
    worker's own dataset iterated directly, which is what the trainer does
    when each worker holds one replica. Each in a fresh process.
On 2 cores these figures show overhead, not speed-up: the workers share them.
"""

import csv
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

from pcam_tfdata import cli
from pcam_tfdata import hostinfo

_RECORDS_DIR = flags.DEFINE_string('records_dir', 'records/demo', 'Records folder.')
_EPOCHS = flags.DEFINE_integer('epochs', 4, 'Training epochs per run (the first is warm-up).')
_STEPS = flags.DEFINE_integer('steps', 200, 'Batches per input timing.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Input timings per figure, and training runs '
                                'per configuration (median).')
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
  from pcam_tfdata.training import pipeline, service  # pylint: disable=g-import-not-at-top
  local = lambda cache: pipeline.make_dataset(records_dir, 'train', batch_size=batch_size,
                                              training=True, cache=cache).repeat()
  rates = {
      'local pipeline, cached (what training uses)': _input_rate(local(True), steps, repeats,
                                                                 batch_size),
      'local pipeline, uncached (reads the split each epoch)': _input_rate(
          local(False), steps, repeats, batch_size),
      'local streaming pipeline (what service workers run)': _input_rate(
          service.make_streaming_dataset(records_dir, 'train', batch_size=batch_size,
                                         repeat=True), steps, repeats, batch_size),
  }
  for workers in (1, 2):
    dispatcher = tf.data.experimental.service.DispatchServer()
    address = dispatcher.target.split('://')[1]
    servers = [tf.data.experimental.service.WorkerServer(
        tf.data.experimental.service.WorkerConfig(dispatcher_address=address))
               for _ in range(workers)]
    ds = service.make_service_dataset(records_dir, 'train', dispatcher.target,
                                      batch_size=batch_size, repeat=True,
                                      job_name=f'bench{workers}')
    rates[f'tf.data service, {workers} worker{"s" if workers > 1 else ""} (in-process, '
          'loopback gRPC)'] = _input_rate(ds, steps, repeats, batch_size)
    for s in servers:
      s.stop()
    dispatcher.stop()
  return rates


# One process per (strategy, feed): MultiWorkerMirroredStrategy needs TF_CONFIG
# before TensorFlow starts.
_STEP_PROBE = r"""
import json, os, statistics, sys, time
records_dir, kind, feed, batch, steps = sys.argv[1:3] + sys.argv[3:4] + [int(a) for a in sys.argv[4:]]
from pcam_tfdata import cli
tf = cli.import_tensorflow()
import keras
from pcam_tfdata.training import distribute, loop, models, pipeline
strategy = distribute.make_strategy(kind)
make = lambda context: pipeline.make_dataset(records_dir, 'train', batch_size=batch,
                                             training=True, seed=0,
                                             input_context=context).repeat()
if feed == 'distributed':
  ds = strategy.distribute_datasets_from_function(make)
else:
  ds = make(distribute.input_context(strategy))
with strategy.scope():
  model = models.build_model('baseline')
  optimizer = keras.optimizers.Adam()
  optimizer.build(model.trainable_variables)
train_steps = loop.make_train_fn(model, optimizer, strategy, batch)
iterator = iter(ds)
for _ in range(5):
  float(train_steps(iterator, tf.constant(1))[0])
times = []
for _ in range(steps):
  start = time.perf_counter()
  float(train_steps(iterator, tf.constant(1))[0])
  times.append(time.perf_counter() - start)
print(json.dumps(1000 * statistics.median(times)))
"""


def step_times(records_dir, batch_size, steps):
  """{(strategy, feed): median ms per training step}, each in a fresh process."""
  results = {}
  for kind in ('default', 'multi_worker'):
    for feed in ('distributed', 'direct'):
      env = dict(os.environ, CUDA_VISIBLE_DEVICES='')
      if kind == 'multi_worker':  # A cluster of this one worker, on a free loopback port.
        with socket.socket() as probe:
          probe.bind(('127.0.0.1', 0))
          port = probe.getsockname()[1]
        env['TF_CONFIG'] = json.dumps({'cluster': {'worker': [f'127.0.0.1:{port}']},
                                       'task': {'type': 'worker', 'index': 0}})
      proc = subprocess.run([sys.executable, '-c', _STEP_PROBE, records_dir, kind, feed,
                             str(batch_size), str(steps)], capture_output=True, text=True,
                            check=True, env=env)
      results[(kind, feed)] = float(proc.stdout.strip().splitlines()[-1])
  return results


def _train_rate(model_dir):
  with open(os.path.join(model_dir, 'history.csv')) as f:
    rows = list(csv.DictReader(f))[1:]  # The first epoch traces and fills the cache.
  return statistics.median(float(r['images_per_second']) for r in rows)


def training_rates(records_dir, epochs, batch_size, repeats, work):
  """{configuration: median images/s}, the configurations run interleaved."""
  common = [f'--records_dir={records_dir}', f'--epochs={epochs}', f'--batch_size={batch_size}',
            '--mixed_precision=off', '--seed=0', '--early_stopping_patience=99',
            '--reduce_lr_patience=99', '--noprogress']
  train = [sys.executable, '-m', 'pcam_tfdata.train']
  launch = [sys.executable, 'tools/launch_local_cluster.py']
  runs = [('default strategy, 1 process', [*train, '--strategy=default']),
          ('MirroredStrategy, 2 logical CPU devices, 1 process',
           [*train, '--strategy=mirrored', '--num_cpu_devices=2']),
          ('MultiWorkerMirroredStrategy, 1 local worker', [*launch, '--num_workers=1', '--']),
          ('MultiWorkerMirroredStrategy, 2 local workers', [*launch, '--num_workers=2', '--'])]
  rates = {name: [] for name, _ in runs}
  for repeat in range(repeats):
    for i, (name, command) in enumerate(runs):
      model_dir = os.path.join(work, f'run{i}_{repeat}')
      # CPU only: a GPU would change what "2 logical CPU devices" means.
      subprocess.run([*command, *common, f'--model_dir={model_dir}'], check=True,
                     capture_output=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=''))
      rates[name].append(_train_rate(model_dir))
  return {name: statistics.median(values) for name, values in rates.items()}


def main(argv):
  del argv
  cli.import_tensorflow()  # Before anything imports it: no start-up chatter in the tables.
  # Training first: the input part leaves service clients behind in this process.
  with tempfile.TemporaryDirectory() as work:
    trains = training_rates(_RECORDS_DIR.value, _EPOCHS.value, _BATCH_SIZE.value,
                            _REPEATS.value, work)
  steps = step_times(_RECORDS_DIR.value, _BATCH_SIZE.value, _STEPS.value)
  inputs = input_rates(_RECORDS_DIR.value, _STEPS.value, _REPEATS.value, _BATCH_SIZE.value)
  print(f'\n{hostinfo.describe()}')
  for title, rates in (('input only (no model)', inputs), ('training, baseline model', trains)):
    anchor = next(iter(rates))
    print(f'\n{title}, batch {_BATCH_SIZE.value}')
    print(f'| method | images/s | x {anchor.split(" (")[0]} |')
    print('|---|---:|---:|')
    for name, rate in rates.items():
      print(f'| {name} | {rate:,.0f} | {rate / rates[anchor]:.2f} |')
  print(f'\nms per training step (baseline, batch {_BATCH_SIZE.value}), by how it is fed')
  print('| strategy | distributed iterator | the worker\'s dataset directly |')
  print('|---|---:|---:|')
  for kind in ('default', 'multi_worker'):
    print(f'| {kind} | {steps[(kind, "distributed")]:.1f} | {steps[(kind, "direct")]:.1f} |')


if __name__ == '__main__':
  app.run(main)
