r"""Input throughput: the training pipeline against its ceilings and the loaders it replaces.

    python tools/bench_input.py --records_dir=/tmp/bench_rec --data_dir=/tmp/bench_src

Every rate is images/s on the same train split, in one run. Batches are
consumed two ways:
  * in graph, as training consumes them: a compiled function pulls
    --per_call batches from the iterator in a `tf.range` loop (what
    `--steps_per_execution` does), touching each batch;
  * from Python: a `for` over the dataset, one batch per turn (how a
    notebook or Keras' per-step loop sees it).
The ceiling of each is the same consumer on `Dataset.from_tensors(batch)
.repeat().prefetch()`: one batch made once and handed out again and again.
In graph, no pipeline can pass it, and "% of ceiling" reads each pipeline
row against it at the same batch size. From Python the loop's own cost per
batch dominates both, and a pipeline can come out ahead of the repeated
batch by noise: the Python rates are given for the loaders that are
consumed that way (the seed's), not as a share of anything.

  * pipeline: `pcam_tfdata.training.pipeline.make_dataset` on the train
    split, cached, batch 64 and 256, without augmentation and with the
    dihedral transform (from the cached variants), median of --epochs
    epochs after a warm-up epoch; and its first epoch, which includes
    building it (reading the split into memory);
  * seed-style loader: Keras' legacy ImageDataGenerator.flow_from_dataframe
    over the train TIFFs, then the center crop, as the seed fed its models
    (one thread: it decodes on the calling thread);
  * TFDS-style reader: 96x96 PNG-encoded records decoded and cropped per
    example, uncached (how tensorflow_datasets stores patch_camelyon);
  * memory-copy floor: a NumPy copy of the same uint8 bytes (one thread);
  * the training cache's memory against the raw bytes it holds, kept and at
    its peak (for --records_dir and each --memory_records).

    python tools/bench_input.py --records_dir=/tmp/bench_rec --suite=augment

--suite=augment: every way the pipeline augments, in graph, against the
unaugmented pipeline measured right beside it: each method is built beside
a fresh unaugmented pipeline, and in each of --rounds rounds the two run
back to back (every other round in the other order), each for at least
--min_seconds, and the ratio is taken within the round; the table gives the median ratio and its range over the
rounds, so a shared machine's drift shows as a range, not as a method
faster than doing nothing. The "drawn" methods are the pipeline's side of
--augment_on=device and --stain_jitter_on=device: it yields the draws, and
the training step (not timed here) applies them. The cached-variants method
is measured only where the 8 variants fit the default budget.

    python tools/bench_input.py --records_dir=/tmp/bench_rec96 --suite=augment
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
import pandas as pd

from pcam_tfdata import cli
from pcam_tfdata import hostinfo

_RECORDS_DIR = flags.DEFINE_string('records_dir', 'records/demo', 'Records folder (train split).')
_DATA_DIR = flags.DEFINE_string('data_dir', 'records/demo_kaggle',
                                'Kaggle-layout folder holding the same train TIFFs.')
_EPOCHS = flags.DEFINE_integer('epochs', 5, 'Timed epochs per pipeline figure (median).')
_PER_CALL = flags.DEFINE_integer('per_call', 50, 'Batches pulled per compiled call (in graph).')
_SEED_IMAGES = flags.DEFINE_integer('seed_images', 12800, 'Images read by the seed-style loader.')
_TFDS_IMAGES = flags.DEFINE_integer('tfds_images', 10000, 'Images in the TFDS-style PNG records.')
_MEMORY_RECORDS = flags.DEFINE_list(
    'memory_records', [], 'More records folders (e.g. the same split at crop 96) whose '
    'training cache memory is measured too.')
_SUITE = flags.DEFINE_enum('suite', 'all', ['all', 'augment'],
                           'all: the main table; augment: only the augmentation table.')
_ROUNDS = flags.DEFINE_integer('rounds', 6, '--suite=augment: rounds (ratios taken within each; '
                                'every other one with the method first).')
_MIN_SECONDS = flags.DEFINE_float('min_seconds', 3.0,
                                  '--suite=augment: the shortest timed sample of a method.')
_JSON = flags.DEFINE_string('json', None, 'Also write the results here.')


def python_rate(iterator, batch, steps):
  """images/s of `steps` batches taken by a Python loop."""
  start = time.perf_counter()
  for _ in range(steps):
    next(iterator)
  return steps * batch / (time.perf_counter() - start)


def make_graph_consumer(iterator, per_call):
  """fn(steps) -> seconds to pull `steps` batches in compiled calls of `per_call`, as training."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  @tf.function
  def pull(n):
    touched = tf.constant(0.0)
    for _ in tf.range(n):
      images, labels = next(iterator)[:2]
      # Each batch used (a pixel and the labels), so none is dropped unread.
      touched += tf.reduce_sum(labels) + tf.cast(images[0, 0, 0, 0], tf.float32)
    return touched

  def consume(steps):
    start = time.perf_counter()
    done = 0
    while done < steps:
      n = min(per_call, steps - done)
      float(pull(tf.constant(n)))  # Waits for the call.
      done += n
    return time.perf_counter() - start

  pull(tf.constant(1))  # Traced before any timing.
  return consume


def ceiling(batch, image_shape):
  """One batch made once and handed out again and again, prefetched."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  one = (tf.zeros([batch, *image_shape], tf.uint8), tf.zeros([batch]))
  return tf.data.Dataset.from_tensors(one).repeat().prefetch(tf.data.AUTOTUNE)


def endless_pipeline(records_dir, batch, augment=None):
  """The training pipeline over endless epochs (seeded)."""
  from pcam_tfdata.training import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.make_dataset(records_dir, 'train', batch_size=batch, training=True,
                               augment=augment, seed=0, num_epochs=None)


def rates_both_ways(ds, batch, steps, epochs, per_call):
  """(in-graph, Python) images/s: medians of `epochs` epochs after a warm-up, each way."""
  iterator = iter(ds)
  consume = make_graph_consumer(iterator, per_call)
  consume(steps)  # Warm-up: tracing, the first epoch's plan.
  graph = statistics.median(steps * batch / consume(steps) for _ in range(epochs))
  python = statistics.median(python_rate(iterator, batch, steps) for _ in range(epochs))
  return graph, python


def first_epoch_rate(records_dir, batch, steps):
  """images/s of building the cached pipeline (reading the split) plus its first epoch."""
  from pcam_tfdata.training import pipeline  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  ds = pipeline.make_dataset(records_dir, 'train', batch_size=batch, training=True, seed=0)
  for _ in ds:
    pass
  return steps * batch / (time.perf_counter() - start)


_CACHE_PROBE = r"""
import json, sys
from pcam_tfdata import cli
cli.import_tensorflow()
from pcam_tfdata.training import augment, pipeline
options = augment.Augment(dihedral=sys.argv[2] == 'augment')
def status_mib(key):
  with open('/proc/self/status') as f:
    return next(int(l.split()[1]) for l in f if l.startswith(key)) / 1024
import tensorflow as tf
for _ in tf.data.Dataset.range(10).map(lambda x: x + 1).batch(2):  # tf.data's runtime up.
  pass
with open('/proc/self/clear_refs', 'w') as f:
  f.write('5')  # Linux: VmHWM starts again from VmRSS.
before = status_mib('VmRSS')
ds = pipeline.make_dataset(sys.argv[1], 'train', batch_size=256, training=True, augment=options)
for _ in ds:
  pass
print(json.dumps({'retained': status_mib('VmRSS') - before,
                  'peak': status_mib('VmHWM') - before}))
"""


def cache_cost(records_dir, augment=False):
  """Memory of the training cache per raw image byte, in a fresh process.

  `retained`: what building the pipeline and one epoch add and keep;
  `peak`: the most they added at any moment (VmHWM, reset before).
  """
  from pcam_tfdata import records  # pylint: disable=g-import-not-at-top
  opened = records.Records.open(records_dir)
  raw = opened.count('train') * int(np.prod(opened.image_shape))
  proc = subprocess.run([sys.executable, '-c', _CACHE_PROBE, records_dir,
                         'augment' if augment else 'plain'],
                        capture_output=True, text=True, check=True)
  growth = json.loads(proc.stdout.strip().splitlines()[-1])
  return {'crop': opened.image_shape[0], 'augment': augment, 'raw_mib': raw / 2**20,
          'retained': growth['retained'] * 2**20 / raw, 'peak': growth['peak'] * 2**20 / raw}


def _variants_bytes(count, shape):
  """Bytes the 8 dihedral variants of `count` images of `shape` take."""
  from pcam_tfdata.training import augment  # pylint: disable=g-import-not-at-top
  return augment.NUM_DIHEDRAL * count * int(np.prod(shape))


def _variants_fit(records_dir):
  """Whether the 8 dihedral variants of the train split fit the default budget."""
  from pcam_tfdata import records  # pylint: disable=g-import-not-at-top
  from pcam_tfdata.training import augment  # pylint: disable=g-import-not-at-top
  opened = records.Records.open(records_dir)
  need = _variants_bytes(opened.count('train'), opened.image_shape)
  return need <= augment.DEFAULT_VARIANT_BUDGET


def seed_loader_rate(data_dir, images, crop):
  """Keras' legacy ImageDataGenerator over the TIFFs, then the center crop."""
  from keras.src.legacy.preprocessing.image import ImageDataGenerator  # pylint: disable=g-import-not-at-top
  frame = pd.read_csv(os.path.join(data_dir, 'train_labels.csv'), dtype=str)
  frame['filename'] = frame['id'] + '.tif'
  gen = ImageDataGenerator(rescale=1.0 / 255).flow_from_dataframe(
      frame, directory=os.path.join(data_dir, 'train'), x_col='filename', y_col='label',
      target_size=(96, 96), class_mode='binary', batch_size=64, shuffle=True, seed=0)
  c = (96 - crop) // 2
  steps = max(2, images // 64)
  next(gen)  # Warm-up.
  start = time.perf_counter()
  for _ in range(steps):
    x, _ = next(gen)
    x = x[:, c:c + crop, c:c + crop]
  return steps * 64 / (time.perf_counter() - start)


def tfds_style_rate(data_dir, images, crop, work):
  """96x96 PNG records, decoded and cropped one example at a time, uncached."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from pcam_tfdata.convert import tiff  # pylint: disable=g-import-not-at-top
  frame = pd.read_csv(os.path.join(data_dir, 'train_labels.csv'), dtype=str).head(images)
  path = os.path.join(work, 'tfds_style.tfrecord')
  with tf.io.TFRecordWriter(path) as writer:
    for example_id, label in zip(frame['id'], frame['label']):
      pixels = tiff.read_patch(os.path.join(data_dir, 'train', example_id + '.tif'))
      feature = {
          'image': tf.train.Feature(bytes_list=tf.train.BytesList(
              value=[tf.io.encode_png(pixels).numpy()])),
          'label': tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
      }
      writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
  spec = {'image': tf.io.FixedLenFeature([], tf.string),
          'label': tf.io.FixedLenFeature([], tf.int64)}
  c = (96 - crop) // 2

  def decode(record):
    example = tf.io.parse_single_example(record, spec)
    image = tf.io.decode_png(example['image'], channels=3)[c:c + crop, c:c + crop]
    return image, tf.cast(example['label'], tf.float32)

  ds = (tf.data.TFRecordDataset(path).map(decode, num_parallel_calls=tf.data.AUTOTUNE)
        .batch(64).prefetch(tf.data.AUTOTUNE).repeat())
  iterator = iter(ds)
  steps = len(frame) // 64
  python_rate(iterator, 64, steps)  # Warm-up: the page cache, as for every other method.
  return statistics.median(python_rate(iterator, 64, steps) for _ in range(3))


def memcpy_rate(count, image_shape, epochs):
  src = np.random.default_rng(0).integers(0, 256, (count, *image_shape), dtype=np.uint8)
  dst = np.empty_like(src)
  times = []
  for _ in range(epochs + 1):
    start = time.perf_counter()
    np.copyto(dst, src)
    times.append(time.perf_counter() - start)
  return count / statistics.median(times[1:])


def main_table(records_dir, data_dir, epochs, per_call):
  """Rows of the main table: (method, processes, in-graph images/s, Python images/s)."""
  from pcam_tfdata import records  # pylint: disable=g-import-not-at-top
  opened = records.Records.open(records_dir)
  count, shape = opened.count('train'), opened.image_shape
  rows = []
  with tempfile.TemporaryDirectory() as work:
    rows.append(('seed-style loader (ImageDataGenerator + crop, batch 64)', '1 thread', None,
                 seed_loader_rate(data_dir, _SEED_IMAGES.value, shape[0])))
    rows.append(('TFDS-style PNG records, decoded and cropped per example, uncached (batch 64)',
                 'all cores', None, tfds_style_rate(data_dir, _TFDS_IMAGES.value, shape[0],
                                                    work)))
  for batch in (64, 256):
    steps = count // batch
    rows.append((f'ceiling: one batch repeated (batch {batch})', 'all cores',
                 *rates_both_ways(ceiling(batch, shape), batch, steps, epochs, per_call)))
    for name, augment in (('no augmentation', None), ('dihedral augmentation', True)):
      rows.append((f'pipeline, batch {batch}, {name}: cached', 'all cores',
                   *rates_both_ways(endless_pipeline(records_dir, batch, augment), batch, steps,
                                    epochs, per_call)))
    rows.append((f'pipeline, batch {batch}: first epoch, from disk (building included)',
                 'all cores', None, first_epoch_rate(records_dir, batch, steps)))
  rows.append(('memory-copy floor (NumPy copy of the same bytes)', '1 thread', None,
               memcpy_rate(count, shape, epochs)))
  return rows, count, shape


def print_main_table(rows, count, shape, epochs, per_call):
  print(f'\n{count} train examples of {list(shape)}; median of {epochs} epochs after a '
        f'warm-up; in graph: {per_call} batches per compiled call; {hostinfo.describe()}\n')
  print('| method | processes | in graph images/s | % of in-graph ceiling (same batch) | '
        'Python loop images/s | x seed-style loader (Python loop) |')
  print('|---|---|---:|---:|---:|---:|')
  seed = rows[0][3]
  batch_of = lambda name: 256 if 'batch 256' in name else 64
  ceilings = {batch_of(name): graph for name, _, graph, _ in rows if name.startswith('ceiling')}
  for name, processes, graph, python in rows:
    batch = batch_of(name)
    share = f'{100 * graph / ceilings[batch]:.0f}%' if graph and 'pipeline' in name else ''
    print(f'| {name} | {processes} | {f"{graph:,.0f}" if graph else ""} | {share} | '
          f'{python:,.0f} | {python / seed:,.1f} |')


def augment_table(records_dir, rounds, min_seconds, per_call):
  """{(batch, method): [ratio to the unaugmented pipeline, per round]}, and the rates.

  One method at a time beside a fresh unaugmented pipeline, the two sampled
  back to back in every round: two caches in memory at a time, never all.
  """
  import gc  # pylint: disable=g-import-not-at-top
  from pcam_tfdata.training import augment  # pylint: disable=g-import-not-at-top
  from pcam_tfdata import records  # pylint: disable=g-import-not-at-top
  opened = records.Records.open(records_dir)
  count, shape = opened.count('train'), opened.image_shape
  fits = _variants_fit(records_dir)
  host = 'variants' if fits else 'per batch'  # What the host path does at the default budget.
  methods = {
      'ceiling': None,
      'dihedral per batch after the gather (no variant budget)':
          augment.Augment(dihedral=True, variant_budget=0),
      'dihedral drawn, ids applied in the step (--augment_on=device)':
          augment.Augment(dihedral=True, dihedral_on_device=True),
      f'dihedral ({host}) + stain jitter 0.05 in the pipeline':
          augment.Augment(dihedral=True, stain_jitter=0.05),
      f'dihedral ({host}) + stain jitter 0.05 drawn (applied in the step)':
          augment.Augment(dihedral=True, stain_jitter=0.05, stain_on_device=True),
      'dihedral and stain jitter 0.05 both drawn (both --*_on=device)':
          augment.Augment(dihedral=True, stain_jitter=0.05, stain_on_device=True,
                          dihedral_on_device=True),
  }
  if fits:  # Else the default budget would fall back to the per-batch path: not measured.
    methods['dihedral from the cached variants'] = augment.Augment(dihedral=True)
  ratios, rates = {}, {}
  for batch in (64, 256):
    steps = count // batch
    for name, options in methods.items():
      plain = make_graph_consumer(iter(endless_pipeline(records_dir, batch)), per_call)
      method = make_graph_consumer(iter(
          ceiling(batch, shape) if name == 'ceiling' else
          endless_pipeline(records_dir, batch, options)), per_call)
      plain(steps)  # Warm-up: an epoch each.
      method(steps)
      for r in range(rounds):
        if r % 2:  # Every other round the method first: no order effect in the median.
          rate = _sample(method, batch, steps, min_seconds)
          base = _sample(plain, batch, steps, min_seconds)
        else:
          base = _sample(plain, batch, steps, min_seconds)
          rate = _sample(method, batch, steps, min_seconds)
        ratios.setdefault((batch, name), []).append(rate / base)
        rates.setdefault((batch, name), []).append(rate)
        rates.setdefault((batch, 'unaugmented'), []).append(base)
      del plain, method
      gc.collect()  # The two caches go before the next pair is built.
  return ratios, rates, count, shape


def _sample(consume, batch, steps, min_seconds):
  """images/s over whole epochs, at least `min_seconds` of them."""
  seconds, epochs = 0.0, 0
  while seconds < min_seconds:
    seconds += consume(steps)
    epochs += 1
  return epochs * steps * batch / seconds


def print_augment_table(ratios, rates, count, shape, rounds, min_seconds, per_call):
  from pcam_tfdata.training import augment  # pylint: disable=g-import-not-at-top
  need = _variants_bytes(count, shape)
  fit = 'fit' if need <= augment.DEFAULT_VARIANT_BUDGET else 'do not fit'
  print(f'\n{count} train examples of {list(shape)}; in graph, {per_call} batches per call; '
        f'{rounds} rounds, each sample at least {min_seconds:g} s; the 8 variants '
        f'({need / 2**30:.1f} GiB) {fit} the default '
        f'{augment.DEFAULT_VARIANT_BUDGET / 2**30:g} GiB budget; {hostinfo.describe()}\n')
  print('| batch | method | images/s (median) | x unaugmented, same round: median | range |')
  print('|---:|---|---:|---:|---|')
  for batch in (64, 256):
    print(f'| {batch} | pipeline, no augmentation | '
          f'{statistics.median(rates[(batch, "unaugmented")]):,.0f} | 1.00 | |')
    for (b, name), values in ratios.items():
      if b == batch:
        label = 'ceiling: one batch repeated' if name == 'ceiling' else f'pipeline, {name}'
        print(f'| {batch} | {label} | {statistics.median(rates[(b, name)]):,.0f} | '
              f'{statistics.median(values):.2f} | {min(values):.2f}-{max(values):.2f} |')


def main(argv):
  del argv
  cli.import_tensorflow()  # Before anything imports it: no start-up chatter in the tables.
  if _SUITE.value == 'augment':
    found = augment_table(_RECORDS_DIR.value, _ROUNDS.value, _MIN_SECONDS.value, _PER_CALL.value)
    print_augment_table(*found, _ROUNDS.value, _MIN_SECONDS.value, _PER_CALL.value)
    ratios, rates = found[:2]
    result = {'ratios': {f'{b} {n}': v for (b, n), v in ratios.items()},
              'rates': {f'{b} {n}': v for (b, n), v in rates.items()}}
  else:
    rows, count, shape = main_table(_RECORDS_DIR.value, _DATA_DIR.value, _EPOCHS.value,
                                    _PER_CALL.value)
    print_main_table(rows, count, shape, _EPOCHS.value, _PER_CALL.value)
    memory = [cache_cost(d, augment) for d in [_RECORDS_DIR.value, *_MEMORY_RECORDS.value]
              for augment in (False, True) if not augment or _variants_fit(d)]
    print('\n| training cache | raw image bytes MiB | retained x raw | peak x raw |')
    print('|---|---:|---:|---:|')
    for m in memory:
      kind = 'dihedral variants' if m['augment'] else 'plain'
      print(f'| {kind}, crop {m["crop"]} | {m["raw_mib"]:,.0f} | {m["retained"]:.2f} | '
            f'{m["peak"]:.2f} |')
    result = {'rows': rows, 'cache_memory': memory}
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump({'host': hostinfo.describe(), **result}, f, indent=1)


if __name__ == '__main__':
  app.run(main)
