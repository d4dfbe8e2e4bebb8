"""The tf.data input pipeline over the records written by tools/make_records.py.

Training, in the order of the TF performance guide: list the split's shards ->
shard them per input pipeline -> read and parse 1024 records at a time into
one tensor per field holding the whole (per-pipeline) split, once (the cache,
`split_cache`; with augmentation and within a memory budget, the 8 dihedral
variants of every image) -> per epoch, from the seed and the epoch number, a
permutation cut into batches and every random draw of the epoch, made while
the epoch before is consumed -> each batch gathered from the cache (with the
variants, its transforms folded into the gather's index; without, applied as
static flips and transposes to the groups that drew each one; or its
transform ids passed on, for the training step) -> optional HED stain jitter
per image (or its maps passed on, for the training step) -> prefetch.

Why the cache holds one tensor: a per-example cache -> shuffle -> batch chain
pays tf.data's per-element cost on every image and tops out at 140-170k
images/s on 2 cores; gathering whole batches from a tensor by index costs one
op per batch, and the permutation shuffles the whole epoch, not a buffer.
Images stay uint8 (the model scales them), a quarter of float32's bytes through
the pipeline and the host-to-device copy.
"""

from absl import logging
import numpy as np
import tensorflow as tf

from pcam_tfdata import records as records_lib
from pcam_tfdata import schema
from pcam_tfdata.training import augment as augment_lib
from pcam_tfdata.training import input_order
from pcam_tfdata.training import split_cache


def parse_batch(serialized, image_shape, with_ids=False):
  """Parses a batch of serialized Examples at once.

  Args:
    serialized: string tensor [N].
    image_shape: (H, W, 3) of every image, from the manifest.
    with_ids: also return the ids.

  Returns:
    (images uint8 [N, H, W, 3], labels float32 [N]) and ids string [N] if
    `with_ids`.
  """
  features = tf.io.parse_example(serialized, schema.feature_spec())
  images = tf.io.decode_raw(features[schema.IMAGE_KEY], tf.uint8)
  images = tf.reshape(images, [-1, *image_shape])
  labels = tf.cast(features[schema.LABEL_KEY], tf.float32)
  if with_ids:
    return images, labels, features[schema.ID_KEY]
  return images, labels


def _options(deterministic, holds_split=False):
  # Measured on 2 cores (tools/bench_input.py, 80k examples, augmented):
  # max_intra_op_parallelism=1, a private pool of 2 threads and a 2 GiB
  # autotune RAM budget each stayed within run-to-run noise of the defaults,
  # so none is set. Order only matters for evaluation and seeded runs.
  options = tf.data.Options()
  if holds_split:
    # tf.data applies its graph rewrites by serializing the dataset, and with
    # it the whole split held as an input tensor: a second copy of the split
    # for a moment (measured: 500 MB more peak for 500 MB of images). This
    # pipeline sets its parallelism and prefetch itself, so it needs no
    # default rewrite, and its one parallel map says its determinism itself
    # (`deterministic=False` in the options is a rewrite too).
    options.experimental_optimization.apply_default_optimizations = False
    options.experimental_optimization.inject_prefetch = False
  else:
    options.deterministic = deterministic
  return options


def make_dataset(records, split, *, batch_size, training, augment=None, seed=None,
                 input_context=None, with_ids=False, cache=True, first_epoch=1, num_epochs=1,
                 batches_per_epoch=None, first_batch=0, order='auto'):
  """Builds the input pipeline of one split.

  Example, with Keras' `fit` (3 different epochs, the same in every run):

    import pcam_tfdata as pt
    train = pt.make_dataset('records/demo', 'train', batch_size=64, training=True,
                            augment=True, seed=0)
    val = pt.make_dataset('records/demo', 'val', batch_size=256, training=False)
    model.fit(train, validation_data=val, epochs=3)

  Args:
    records: a records.Records, or the path of a records folder (any
      filesystem TensorFlow reads: gs://, s3://, ram://, ...).
    split: 'train', 'val' or 'test'.
    batch_size: of each yielded batch (per replica with an input context).
    training: shuffle each epoch, drop the last partial batch, augment. Else
      every example exactly once, in manifest order, last batch kept.
    augment: training: an augment.Augment (dihedral, stain jitter, where
      each runs, the variant cache's budget); True or 'dihedral' for the
      dihedral transform alone; None or False for none.
    seed: training: epoch e's order and draws derive from (seed, e) alone,
      so a resumed run sees what the uninterrupted one saw. Iteration k
      yields epochs first_epoch + k * num_epochs on, as a seeded `shuffle`
      reshuffles each iteration. None: a fresh base seed each iteration.
    input_context: tf.distribute.InputContext (see `order`).
    with_ids: yield (images, labels, ids) instead of (images, labels).
    cache: training: read the split into memory once, here, at about 1x its
      bytes (else re-read it every epoch, in the same order); evaluation:
      keep parsed batches after the first pass.
    first_epoch: training: the number of the first epoch yielded (1-based).
    num_epochs: training: epochs yielded per iteration, one after the other
      (None: endless, from `first_epoch` on each iteration).
    batches_per_epoch: training: batches yielded per epoch (default: every
      whole one); a trainer that takes fewer says so, so that each epoch
      starts with its own first batch. (Global order: whole global steps.)
    first_batch: training: batches of the first epoch skipped (a resume).
    order: training, several input pipelines: 'global', each holds the
      whole split and yields its replicas' rows of the same global batches
      on any topology; 'per_pipeline', each its own shards (1/N of the
      memory); 'auto', global while the split fits a quarter of the host's
      memory. One pipeline: the same either way. See `input_order`.

  Returns:
    A tf.data.Dataset of (uint8 [B, H, W, 3], float32 [B]) batches, plus
    string ids [B] with `with_ids`, plus with `augment.dihedral_on_device`
    or `augment.stain_on_device` a dict of what the training step applies
    (`loop.make_train_fn`): 'dihedral', the transform ids int32 [B];
    'stain', the stain maps float32 [B, 4, 3]. (Keras `fit` would take
    that dict for sample weights and refuses it: with `fit`, augment on
    the host.) Training: `num_epochs` epochs less `first_batch` batches.

  Raises:
    schema.ManifestError: no manifest, or no such split.
    ValueError: bad arguments, or fewer shards than input pipelines.
  """
  if batch_size < 1:
    raise ValueError(f'batch_size={batch_size}: must be >= 1')
  augment = augment_lib.Augment.of(augment)
  if first_epoch < 1 or (num_epochs is not None and num_epochs < 1):
    raise ValueError(f'first_epoch={first_epoch}, num_epochs={num_epochs}: must be >= 1')
  records = records_lib.Records.of(records)
  parse = lambda x: parse_batch(x, records.image_shape, with_ids)
  if not training:
    layout = input_order.Layout.of(input_context)
    shards = records.shards(split, layout.pipelines, layout.pipeline_id)
    return _eval_dataset(records.shard_paths(split, layout.pipelines, layout.pipeline_id),
                         [s['count'] for s in shards], batch_size, parse, cache)
  layout = input_order.training_layout(input_context, order, records, split, seed)
  paths = records.shard_paths(split, layout.shard_pipelines, layout.shard_id)
  count = sum(s['count'] for s in records.shards(split, layout.shard_pipelines, layout.shard_id))
  steps = _batches_per_epoch(records, split, count, batch_size, layout, batches_per_epoch,
                             first_batch)
  variants = cache and _holds_variants(records, count, augment)
  whole = _whole_split(paths, count, parse, cache, variants)
  epochs = input_order.EpochPlan(count, batch_size, steps, augment, variants, layout)
  ds = _train_dataset(whole, epochs, seed, first_epoch, num_epochs, first_batch)
  return ds.with_options(_options(seed is not None, holds_split=cache))


def _batches_per_epoch(records, split, count, batch_size, layout, batches_per_epoch, first_batch):
  """Batches this pipeline yields per epoch (checked against the split's); checks `first_batch`."""
  if count < batch_size * layout.width:
    raise ValueError(f'{records.path}: split {split!r} holds {count} examples for this input '
                     f'pipeline, fewer than one batch of {batch_size * layout.width}')
  # drop_remainder: static shapes. (In the global order: whole global batches.)
  whole_batches = count // (batch_size * layout.width) * layout.per_step
  steps = whole_batches if batches_per_epoch is None else batches_per_epoch
  if not 1 <= steps <= whole_batches or steps % layout.per_step:
    raise ValueError(f'batches_per_epoch={batches_per_epoch}: this input pipeline has '
                     f'{whole_batches} whole batches of {batch_size} per epoch'
                     + (f', {layout.per_step} per global step' if layout.per_step > 1 else ''))
  if not 0 <= first_batch < steps or first_batch % layout.per_step:
    raise ValueError(f'first_batch={first_batch}: must be in 0..{steps - 1}, the batches of '
                     'an epoch' + (f', a multiple of {layout.per_step}'
                                   if layout.per_step > 1 else ''))
  return steps


def _whole_split(paths, count, parse, cache, variants):
  """A dataset of one element: the split's fields, [count, ...] each, in shard order."""
  if cache:
    # Read once, here. An epoch is then a gather by index (with `variants`,
    # of (transform, index): the augmentation costs no op of its own).
    return tf.data.Dataset.from_tensors(split_cache.load_split(paths, count, parse, variants))
  # Re-read each epoch, shard after shard in manifest order, as the cache
  # reads them: position i is the same example either way, so the
  # permutation gives the cached path's batches. (The epoch is shuffled
  # whole anyway; an interleave would only reorder it.)
  chunks = tf.data.TFRecordDataset(paths, buffer_size=split_cache.READ_BUFFER).batch(
      split_cache.PARSE_BATCH).map(parse, num_parallel_calls=tf.data.AUTOTUNE,
                                   deterministic=True)
  # (unbatch -> batch copies each example once; ragged_batch ran at a fifth.)
  return chunks.unbatch().batch(count)


def _holds_variants(records, count, augment):
  """Whether the cached split holds the 8 dihedral variants of every image.

  For the host's dihedral transform, within the budget. Not when the
  training step transforms (`dihedral_on_device`): the host then gathers
  each batch as if unaugmented and never needs the 8 copies.
  """
  return (augment.dihedral and not augment.dihedral_on_device
          and _variants_fit(records, count, augment.variant_budget))


def _variants_fit(records, count, budget):
  """Whether the 8 dihedral variants of `count` images fit `budget` bytes (said once if not)."""
  need = augment_lib.NUM_DIHEDRAL * count * int(np.prod(records.image_shape))
  if need <= budget:
    return True
  if budget:  # (0: the caller asked for no variants.)
    logging.warning('%s: the 8 dihedral variants of this pipeline\'s %d train examples '
                    'need %.2f GiB, over the %.2f GiB budget; transforming each batch '
                    'after its gather instead (the same batches, more host time)',
                    records.path, count, need / 2**30, budget / 2**30)
  return False


def _eval_dataset(paths, counts, batch_size, parse, cache):
  # Files in manifest order, read one after the other: a fixed order, and
  # evaluation reads each split once per epoch, so parallel reads buy little.
  # Each shard must hold the records its manifest entry lists: a truncated
  # one fails the read (FailedPreconditionError) rather than leaving
  # examples out of the metrics or the submission.
  ds = None
  for path, n in zip(paths, counts):
    shard = tf.data.TFRecordDataset(path, buffer_size=split_cache.READ_BUFFER).apply(
        tf.data.experimental.assert_cardinality(n))
    ds = shard if ds is None else ds.concatenate(shard)
  count = sum(counts)
  ds = ds.batch(batch_size)  # The last partial batch is kept: every example counts.
  ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if cache:
    ds = ds.cache()
  ds = ds.apply(tf.data.experimental.assert_cardinality(-(-count // batch_size)))
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(deterministic=True))


def _iteration_numbers():
  """A dataset of one element: k, the number of iterations of it begun before this one.

  tf.data restarts a dataset from scratch on each iteration (Keras `fit`
  starts one per epoch); this count is what survives from one to the next.
  It lives in a lookup table rather than a tf.Variable: a variable made
  inside `strategy.scope()` becomes a distributed one (mirrored per replica;
  under MultiWorkerMirroredStrategy initialised by a collective), and a
  dataset is often made there. (Two iterators begun at the same instant may
  draw the same k; iterations begun one after the other, as `fit` does,
  never do.)
  """
  table = tf.lookup.experimental.MutableHashTable(tf.int64, tf.int64, default_value=0)
  key = tf.constant(0, tf.int64)

  def take_number(_):
    k = table.lookup(key)
    with tf.control_dependencies([table.insert(key, k + 1)]):
      return tf.identity(k)

  return tf.data.Dataset.from_tensors(key).map(take_number)


def _train_dataset(whole, epochs, seed, first_epoch, num_epochs, first_batch=0):
  """Epochs of the split `whole` yields: `num_epochs` per iteration, from `first_epoch` on.

  The first epoch of each iteration starts at its batch `first_batch`.

  Iteration k (k = 0, 1, ...) yields epochs first_epoch + k * num_epochs
  onwards, as tf.data's seeded shuffle reshuffles on each iteration: Keras
  `fit(ds, epochs=N)`, which iterates `ds` once per epoch, sees N different
  epochs, the same N in every run with the same seed. (An endless dataset,
  num_epochs=None, starts again at `first_epoch` on each iteration.)
  """
  # One base seed per iteration (the given one, or a fresh draw), then the
  # epoch numbers: (base, e) decides everything random in epoch e.
  if seed is None:
    bases = tf.data.Dataset.random(rerandomize_each_iteration=True).take(1)
  else:
    bases = tf.data.Dataset.from_tensors(tf.constant(seed, tf.int64))

  def numbers(k):
    if num_epochs is None:
      return tf.data.Dataset.counter(first_epoch)
    start = first_epoch + k * num_epochs
    return tf.data.Dataset.range(start, start + num_epochs)

  # Each epoch's permutation is made a step ahead (prefetched), while the
  # epoch before it is still being consumed: no stall at the boundary.
  def plan(base, e):
    # Each iteration's first epoch starts at `first_batch` (so that every
    # iteration has the same length). The skipped batches are rows of the
    # plan, dropped before any gather.
    first = e == first_epoch if num_epochs is None else (e - first_epoch) % num_epochs == 0
    return epochs.draws(base, e), tf.where(first, tf.constant(first_batch, tf.int64), 0)

  plans = tf.data.Dataset.zip(bases, _iteration_numbers()).flat_map(
      lambda base, k: numbers(k).map(lambda e: plan(base, e))).prefetch(1)

  def epoch(draws_and_skip, fields):
    draws, skip = draws_and_skip
    # `fields` repeats by reference, not by copy: each batch sees the split.
    return tf.data.Dataset.zip(tf.data.Dataset.from_tensor_slices(draws).skip(skip),
                               tf.data.Dataset.from_tensors(fields).repeat())

  ds = tf.data.Dataset.zip(plans, whole.repeat()).flat_map(epoch)
  # Outside the flat_map, so that batches are gathered on all cores at once.
  ds = ds.map(epochs.gather, num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=seed is not None)
  ds = ds.apply(tf.data.experimental.assert_cardinality(
      tf.data.INFINITE_CARDINALITY if num_epochs is None
      else epochs.steps * num_epochs - first_batch))
  return ds.prefetch(tf.data.AUTOTUNE)
