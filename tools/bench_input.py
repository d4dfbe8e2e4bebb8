r"""Input throughput: the training pipeline against the loaders it replaces, in one run.

    python tools/bench_input.py --records_dir=records/demo --data_dir=records/demo_kaggle

Every figure is images/s, the median over --epochs timed epochs after one
untimed warm-up epoch (the cached pipeline's first epoch is reported apart, as
"first epoch from disk"). All methods iterate the same way, a Python `for`
over the dataset, on the same examples:

  * pipeline: `pcam_tfdata.pipeline.make_dataset` on the train split, cached
    steady state and first epoch, batch 64 and 256, with and without
    augmentation; and, in the same pipeline, the by-position augmentation it
    replaced (position i of B got transform 8i/B: uniform only when B/8 is a
    whole number, never a 90-degree rotation at B = 4), with HED stain
    jitter on top (`--stain_jitter=0.05`), and, timed last, the batch-64
    pipeline under TF op determinism;
  * seed-style loader: Keras' legacy ImageDataGenerator.flow_from_dataframe
    over the train TIFFs, then the center crop (as the seed fed its models);
  * TFDS-style reader: 96x96 PNG-encoded records decoded and cropped per
    example, uncached (how tensorflow_datasets stores patch_camelyon);
  * tf.data ceiling: `Dataset.from_tensors(one_batch).repeat()`, one batch
    made once and handed out again and again. It does no work at all: what
    it measures is the fixed cost of one element through tf.data's iterator
    (a C++ GetNext, the prefetch-free hand-off of a tensor that is not
    copied) plus one turn of the Python `for` loop that receives it, the
    same loop every method here is timed with. No pipeline that iterates
    from Python can beat it at the same batch size;
  * memory-copy floor: a NumPy copy of the same uint8 bytes into a
    preallocated array (one thread).
The seed-style loader reads as many images as the pipeline's split holds
(--seed_images=0), in one process: Keras' generator decodes on the calling
thread. The tf.data methods use every core. The `processes` column says
which, so a ratio can be read per core where it matters.
It also reports what the training cache costs in memory against the raw bytes
it holds, kept and at its peak (for --records_dir and each --memory_records).

    python tools/bench_input.py --records_dir=/tmp/bench_rec --suite=augment

--suite=augment runs only the augmentation table (issue 13), in one process,
every method iterated the same way through one iterator over --epochs + 1
epochs (the first a warm-up), in --rounds interleaved rounds, median of all:
the tf.data ceiling, a bare gather by index from the whole-split tensor, the
pipeline unaugmented, with the dihedral transform from the cached variants
and per batch after the gather (no variant budget), and with stain jitter
applied in the pipeline or only drawn there (applied in the training step);
batch 64 and 256. Also the first batch of each epoch against the median
batch (one iterator for the run, and a new iterator per epoch), and the
memory of the plain and the variant cache.
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
_SEED_IMAGES = flags.DEFINE_integer(
    'seed_images', 0, 'Images read by the seed-style loader; 0: as many as the train split.')
_TFDS_IMAGES = flags.DEFINE_integer('tfds_images', 20000, 'Images in the TFDS-style PNG records.')
_MEMORY_RECORDS = flags.DEFINE_list(
    'memory_records', [], 'More records folders (e.g. the same split at crop 96) whose '
    'training cache memory is measured too.')
_JSON = flags.DEFINE_string('json', None, 'Also write the results here.')
_SUITE = flags.DEFINE_enum('suite', 'all', ['all', 'augment'],
                           'all: every table; augment: only the augmentation table.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, '--suite=augment: interleaved rounds.')


def _epoch_rate(ds, batch_size):
  start = time.perf_counter()
  steps = 0
  for _ in ds:
    steps += 1
  return steps * batch_size / (time.perf_counter() - start)


def _dihedral_by_position(images):
  """The augmentation before issue 11: eight static slices, transform 8i//B at position i."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from pcam_tfdata.training import augment  # pylint: disable=g-import-not-at-top
  size = images.shape[0]
  bounds = [-(-size * k // 8) for k in range(9)]
  return tf.concat([augment.dihedral_transform(images[bounds[k]:bounds[k + 1]], k)
                    for k in range(8)], 0)


def by_position_rate(records_dir, batch_size, epochs):
  """The pipeline with its augmentation swapped for the by-position one."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from pcam_tfdata.training import pipeline  # pylint: disable=g-import-not-at-top
  uniform = pipeline._gather_augmented  # pylint: disable=protected-access
  pipeline._gather_augmented = lambda images, index, transforms: _dihedral_by_position(  # pylint: disable=protected-access
      tf.ensure_shape(tf.gather(images, index), [batch_size, *images.shape[1:]]))
  try:
    # The swapped function runs only where the variants are not cached.
    return pipeline_rates(records_dir, batch_size, True, epochs, variant_budget=0)[1]
  finally:
    pipeline._gather_augmented = uniform  # pylint: disable=protected-access


def pipeline_rates(records_dir, batch_size, augment, epochs, stain_jitter=0.0,
                   variant_budget=None):
  """(first epoch, median cached epoch) images/s of the training pipeline.

  The first epoch includes building the dataset, which reads the split into
  memory.
  """
  from pcam_tfdata.training import pipeline  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  budget = {} if variant_budget is None else {'variant_budget': variant_budget}
  ds = pipeline.make_dataset(records_dir, 'train', batch_size=batch_size, training=True,
                             augment=augment, stain_jitter=stain_jitter, **budget)
  build = time.perf_counter() - start
  rate = _epoch_rate(ds, batch_size)
  steps = len(ds)
  first = steps * batch_size / (build + steps * batch_size / rate)
  _epoch_rate(ds, batch_size)  # Warm-up of the cached path.
  return first, statistics.median(_epoch_rate(ds, batch_size) for _ in range(epochs))


_CACHE_PROBE = r"""
import json, sys
from pcam_tfdata import cli
cli.import_tensorflow()
from pcam_tfdata.training import pipeline
augment, budget = sys.argv[2] == 'augment', int(sys.argv[3])
def status_mib(key):
  with open('/proc/self/status') as f:
    return next(int(l.split()[1]) for l in f if l.startswith(key)) / 1024
import tensorflow as tf
for _ in tf.data.Dataset.range(10).map(lambda x: x + 1).batch(2):  # tf.data's runtime up.
  pass
with open('/proc/self/clear_refs', 'w') as f:
  f.write('5')  # Linux: VmHWM starts again from VmRSS.
before = status_mib('VmRSS')
ds = pipeline.make_dataset(sys.argv[1], 'train', batch_size=256, training=True,
                           augment=augment, variant_budget=budget)
for _ in ds:
  pass
print(json.dumps({'retained': status_mib('VmRSS') - before,
                  'peak': status_mib('VmHWM') - before}))
"""


def cache_cost(records_dir, augment=False, budget=0):
  """Memory of the training cache, per raw image byte of the split it holds.

  In a fresh process with TensorFlow and tf.data started: `retained` is the
  resident memory that building the pipeline and one epoch add and keep,
  `peak` the most they added at any moment (VmHWM, reset before), the part
  that decides whether the split fits. Both include tracing and prefetch
  buffers, a few MiB.
  """
  from pcam_tfdata import schema  # pylint: disable=g-import-not-at-top
  manifest = schema.load_manifest(records_dir)
  raw = manifest['splits']['train']['count'] * int(np.prod(manifest['image_shape']))
  proc = subprocess.run([sys.executable, '-c', _CACHE_PROBE, records_dir,
                         'augment' if augment else 'plain', str(budget)],
                        capture_output=True, text=True, check=True)
  growth = json.loads(proc.stdout.strip().splitlines()[-1])
  return {'crop': manifest['image_shape'][0], 'raw_mib': raw / 2**20,
          'retained': growth['retained'] * 2**20 / raw, 'peak': growth['peak'] * 2**20 / raw}


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
        .batch(64).prefetch(tf.data.AUTOTUNE))
  _epoch_rate(ds, 64)  # Warm-up: the page cache, as for every other method.
  return statistics.median(_epoch_rate(ds, 64) for _ in range(3))


def ceiling_rate(batch_size, image_shape, steps, epochs):
  """Iterating a dataset that does no work at all."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  batch = (tf.zeros([batch_size, *image_shape], tf.uint8), tf.zeros([batch_size]))
  ds = tf.data.Dataset.from_tensors(batch).repeat(steps)
  _epoch_rate(ds, batch_size)
  return statistics.median(_epoch_rate(ds, batch_size) for _ in range(epochs))


def memcpy_rate(count, image_shape, epochs):
  src = np.random.default_rng(0).integers(0, 256, (count, *image_shape), dtype=np.uint8)
  dst = np.empty_like(src)
  times = []
  for _ in range(epochs + 1):
    start = time.perf_counter()
    np.copyto(dst, src)
    times.append(time.perf_counter() - start)
  return count / statistics.median(times[1:])


def _timed_epochs(ds, steps, batch_size):
  """Per epoch of one iterator: (images/s, seconds to its first batch); per-batch median."""
  rates, firsts, gaps = [], [], []
  last = time.perf_counter()
  start = last
  for i, _ in enumerate(ds):
    now = time.perf_counter()
    gaps.append(now - last)
    if i % steps == 0:
      firsts.append(now - last)
      start = last
    if i % steps == steps - 1:
      rates.append(steps * batch_size / (now - start))
    last = now
  return rates, firsts, statistics.median(gaps)


def _gather_only(images, labels, count, steps, batch_size, epochs):
  """The bare gather: a permutation's batches gathered from the split's tensors."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  index = tf.reshape(tf.random.shuffle(tf.range(count))[:steps * batch_size], [steps, batch_size])
  ds = tf.data.Dataset.from_tensor_slices(index).repeat(epochs)
  ds = ds.map(lambda i: (tf.gather(images, i), tf.gather(labels, i)),
              num_parallel_calls=tf.data.AUTOTUNE)
  return ds.prefetch(tf.data.AUTOTUNE)


def augment_suite(records_dir, epochs, rounds):
  """The augmentation table of issue 13; returns its rows."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from pcam_tfdata import schema  # pylint: disable=g-import-not-at-top
  from pcam_tfdata.training import pipeline  # pylint: disable=g-import-not-at-top
  manifest = schema.load_manifest(records_dir)
  count = manifest['splits']['train']['count']
  shape = tuple(manifest['image_shape'])
  paths = schema.shard_paths(records_dir, manifest, 'train')
  images, labels = pipeline.load_split(paths, count, lambda x: pipeline.parse_batch(x, shape))
  n = epochs + 1  # The first is a warm-up.
  make = lambda batch, **kw: pipeline.make_dataset(
      records_dir, 'train', batch_size=batch, training=True, num_epochs=n, seed=0, **kw)
  methods = {
      'tf.data ceiling: one batch repeated': lambda b, steps: tf.data.Dataset.from_tensors(
          (images[:b], labels[:b])).repeat(steps * n),
      'bare gather by index from the split tensor': lambda b, steps: _gather_only(
          images, labels, count, steps, b, n),
      'pipeline, no augmentation': lambda b, _: make(b),
      'pipeline, dihedral from the cached variants': lambda b, _: make(b, augment=True),
      'pipeline, dihedral per batch after the gather (no variant budget)':
          lambda b, _: make(b, augment=True, variant_budget=0),
      'pipeline, dihedral (variants) + stain jitter 0.05 applied in the pipeline':
          lambda b, _: make(b, augment=True, stain_jitter=0.05),
      'pipeline, dihedral (variants) + stain jitter 0.05 drawn (applied in the step)':
          lambda b, _: make(b, augment=True, stain_jitter=0.05, stain_params=True),
  }
  found = {}
  for _ in range(rounds):
    for batch in (64, 256):
      steps = count // batch
      for name, build in methods.items():
        ds = build(batch, steps)
        rates, firsts, median_gap = _timed_epochs(ds, steps, batch)
        entry = found.setdefault((batch, name), {'rates': [], 'firsts': [], 'gaps': []})
        entry['rates'].extend(rates[1:])
        entry['firsts'].extend(firsts[1:])  # Epochs 2.. of one iterator.
        entry['gaps'].append(median_gap)
  # A new iterator per epoch (as before issue 11): the first batch of each.
  fresh = {}
  for batch in (64, 256):
    ds = pipeline.make_dataset(records_dir, 'train', batch_size=batch, training=True,
                               augment=True, seed=0)
    times = []
    for _ in range(epochs + 1):  # The first also traces: left out.
      start = time.perf_counter()
      next(iter(ds))
      times.append(time.perf_counter() - start)
    fresh[batch] = statistics.median(times[1:])
  rows = []
  for (batch, name), entry in found.items():
    rows.append({'batch': batch, 'method': name,
                 'images_per_second': statistics.median(entry['rates']),
                 'first_batch_ms': 1e3 * statistics.median(entry['firsts']),
                 'median_batch_ms': 1e3 * statistics.median(entry['gaps'])})
  memory = {'plain cache': cache_cost(records_dir),
            'variant cache': cache_cost(records_dir, augment=True,
                                        budget=pipeline.DEFAULT_VARIANT_BUDGET)}
  return rows, fresh, memory, count, shape


def print_augment_suite(rows, fresh, memory, count, shape, epochs, rounds):
  print(f'\n{count} train examples of {list(shape)}; one iterator over {epochs} timed epochs '
        f'after a warm-up, {rounds} interleaved rounds, median; {hostinfo.describe()}\n')
  print('| batch | method | images/s | x unaugmented pipeline | % of ceiling | '
        'first batch of an epoch ms | median batch ms | cores for 8 x 60k images/s |')
  print('|---:|---|---:|---:|---:|---:|---:|---:|')
  cores = len(os.sched_getaffinity(0))
  for row in rows:
    same = {r['method']: r['images_per_second'] for r in rows if r['batch'] == row['batch']}
    rate = row['images_per_second']
    plain = same['pipeline, no augmentation']
    ceiling = same['tf.data ceiling: one batch repeated']
    need = 8 * 60000 / (rate / cores)  # Cores at this run's rate per core.
    print(f'| {row["batch"]} | {row["method"]} | {rate:,.0f} | {rate / plain:.2f} | '
          f'{100 * rate / ceiling:.0f}% | {row["first_batch_ms"]:.2f} | '
          f'{row["median_batch_ms"]:.2f} | {need:.1f} |')
  print('\nFirst batch of a new iterator per epoch (dihedral, variants): ' + ', '.join(
      f'batch {b}: {1e3 * t:.1f} ms' for b, t in fresh.items()))
  print('\n| training cache | raw image bytes MiB | retained x raw | peak x raw |')
  print('|---|---:|---:|---:|')
  for name, m in memory.items():
    print(f'| {name}, crop {m["crop"]} | {m["raw_mib"]:,.0f} | {m["retained"]:.2f} | '
          f'{m["peak"]:.2f} |')


def main(argv):
  del argv
  cli.import_tensorflow()  # Before anything imports it: no start-up chatter in the tables.
  if _SUITE.value == 'augment':
    found = augment_suite(_RECORDS_DIR.value, _EPOCHS.value, _ROUNDS.value)
    print_augment_suite(*found, _EPOCHS.value, _ROUNDS.value)
    if _JSON.value:
      rows, fresh, memory, count, shape = found
      with open(_JSON.value, 'w') as f:
        json.dump({'host': hostinfo.describe(), 'examples': count, 'image_shape': shape,
                   'rows': rows, 'fresh_iterator_first_batch_s': fresh,
                   'cache_memory': memory}, f, indent=1)
    return
  from pcam_tfdata import schema  # pylint: disable=g-import-not-at-top
  manifest = schema.load_manifest(_RECORDS_DIR.value)
  count = manifest['splits']['train']['count']
  shape = tuple(manifest['image_shape'])
  crop = shape[0]
  epochs = _EPOCHS.value
  rows, results = [], {}
  with tempfile.TemporaryDirectory() as work:
    results['seed-style loader (ImageDataGenerator, batch 64)'] = seed_loader_rate(
        _DATA_DIR.value, _SEED_IMAGES.value or count, crop)
    results['TFDS-style PNG records, uncached (batch 64)'] = tfds_style_rate(
        _DATA_DIR.value, _TFDS_IMAGES.value, crop, work)
  for batch_size in (64, 256):
    for augment in (False, True):
      first, steady = pipeline_rates(_RECORDS_DIR.value, batch_size, augment, epochs)
      name = f'pipeline, batch {batch_size}, {"dihedral" if augment else "no"} augmentation'
      results[f'{name}: cached'] = steady
      if not augment:
        results[f'{name}: first epoch from disk'] = first
      else:
        results[f'pipeline, batch {batch_size}, by-position augmentation (before): cached'] = (
            by_position_rate(_RECORDS_DIR.value, batch_size, epochs))
        results[f'pipeline, batch {batch_size}, dihedral + stain jitter 0.05: cached'] = (
            pipeline_rates(_RECORDS_DIR.value, batch_size, True, epochs, stain_jitter=0.05)[1])
    results[f'tf.data ceiling (batch {batch_size})'] = ceiling_rate(
        batch_size, shape, count // batch_size, epochs)
  results['memory-copy floor (NumPy)'] = memcpy_rate(count, shape, epochs)
  # Last: op determinism cannot be turned off again in this process.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.experimental.enable_op_determinism()
  tf.random.set_seed(0)  # Unseeded random ops are refused under op determinism.
  for augment in (False, True):
    name = f'pipeline, batch 64, {"dihedral" if augment else "no"} augmentation'
    results[f'{name}: cached, under op determinism'] = pipeline_rates(
        _RECORDS_DIR.value, 64, augment, epochs)[1]
  memory = [cache_cost(d) for d in [_RECORDS_DIR.value, *_MEMORY_RECORDS.value]]

  seed = results['seed-style loader (ImageDataGenerator, batch 64)']
  host = hostinfo.describe()
  print(f'\n{count} train examples of {list(shape)} from {_RECORDS_DIR.value}; median of '
        f'{epochs} epochs after a warm-up; seed-style loader over '
        f'{_SEED_IMAGES.value or count} images; {host}\n')
  print('| method | processes | images/s | x seed-style loader | '
        '% of tf.data ceiling (same batch) |')
  print('|---|---|---:|---:|---:|')
  for name, rate in results.items():
    ceiling = results['tf.data ceiling (batch 256)' if 'batch 256' in name
                      else 'tf.data ceiling (batch 64)']
    share = f'{100 * rate / ceiling:.0f}%' if 'pipeline' in name or 'ceiling' in name else ''
    processes = '1 (one thread)' if name.startswith(('seed', 'memory')) else 'all cores'
    print(f'| {name} | {processes} | {rate:,.0f} | {rate / seed:,.1f} | {share} |')
    rows.append({'method': name, 'processes': processes, 'images_per_second': rate,
                 'x_seed': rate / seed})
  print('\n| training cache | raw image bytes MiB | retained x raw | peak x raw |')
  print('|---|---:|---:|---:|')
  for m in memory:
    print(f'| crop {m["crop"]} | {m["raw_mib"]:,.0f} | {m["retained"]:.2f} | {m["peak"]:.2f} |')
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump({'host': host, 'examples': count, 'image_shape': shape, 'rows': rows,
                 'cache_memory': memory}, f, indent=1)


if __name__ == '__main__':
  app.run(main)
