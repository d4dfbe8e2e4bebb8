r"""What the global input order costs one worker: memory and images/s against the per-pipeline order.

    python tools/bench_order.py --records_dir=records/demo --pipelines=2

For each order (`--input_order`: global, per_pipeline) and each cache
(plain, the 8 dihedral variants of `--augment` on the host), a fresh process
builds input pipeline 0 of --pipelines (as worker 0 of that many builds it)
and reports the growth of its peak resident memory from just before the
pipeline is made to after --steps batches, and its images/s over those
batches (after a warm-up). The global order holds the whole split in each
worker; the per-pipeline order 1/--pipelines of it: the ratio of the two
peaks is the figure. Images/s are each order's own; the anchor is the
per-pipeline order, measured in the same run.
"""

import json
import statistics
import subprocess
import sys

from absl import app
from absl import flags

from pcam_tfdata import hostinfo

_RECORDS_DIR = flags.DEFINE_string('records_dir', 'records/demo', 'Records folder.')
_PIPELINES = flags.DEFINE_integer('pipelines', 2, 'Input pipelines (workers) the split is shared by.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 64, 'Global batch.')
_STEPS = flags.DEFINE_integer('steps', 300, 'Batches timed per process.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Processes per configuration (median).')

_CHILD = r'''
import json, resource, sys, time
import tensorflow as tf
from pcam_tfdata.training import augment, pipeline
records, pipelines, batch, steps, order, variants = sys.argv[1:7]
pipelines, batch, steps = int(pipelines), int(batch), int(steps)
options = augment.Augment(dihedral=variants == 'variants', variant_budget=64 << 30)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
context = tf.distribute.InputContext(pipelines, 0, pipelines)
ds = pipeline.make_dataset(records, 'train', batch_size=batch // pipelines, training=True,
                           seed=0, augment=options, input_context=context, num_epochs=None,
                           order=order)
it = iter(ds)
for _ in range(20):
  next(it)
start = time.perf_counter()
for _ in range(steps):
  next(it)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({'mib': (peak - before) / 1024, 'images_per_second': steps * batch // pipelines / seconds}))
'''


def _measure(order, variants):
  out = subprocess.run(
      [sys.executable, '-c', _CHILD, _RECORDS_DIR.value, str(_PIPELINES.value),
       str(_BATCH_SIZE.value), str(_STEPS.value), order, variants],
      capture_output=True, text=True, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def main(argv):
  del argv
  from pcam_tfdata import records as records_lib  # pylint: disable=g-import-not-at-top
  records = records_lib.Records.open(_RECORDS_DIR.value)
  images = records.count('train') * 3 * records.image_shape[0] * records.image_shape[1]
  print(hostinfo.describe())
  print(f'{records.path}: {records.count("train")} train images of {list(records.image_shape)}, '
        f'{images / 2**20:.1f} MiB; pipeline 0 of {_PIPELINES.value}, batch '
        f'{_BATCH_SIZE.value // _PIPELINES.value} of a global {_BATCH_SIZE.value}')
  print('| cache | order | peak growth (MiB, median) | x per-pipeline | images/s (median) | '
        'x per-pipeline |')
  print('|---|---|---|---|---|---|')
  for variants in ('plain', 'variants'):
    runs = {order: [] for order in ('per_pipeline', 'global')}
    for _ in range(_REPEATS.value):  # Interleaved: drift on a shared machine hits both.
      for order in runs:
        runs[order].append(_measure(order, variants))
    anchor = {k: statistics.median(r[k] for r in runs['per_pipeline'])
              for k in ('mib', 'images_per_second')}
    for order, results in runs.items():
      mib = statistics.median(r['mib'] for r in results)
      rate = statistics.median(r['images_per_second'] for r in results)
      print(f'| {variants} | {order} | {mib:.0f} | {mib / anchor["mib"]:.2f} | {rate:,.0f} | '
            f'{rate / anchor["images_per_second"]:.2f} |')


if __name__ == '__main__':
  app.run(main)
