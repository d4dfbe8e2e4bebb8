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

import os

from absl import logging
import numpy as np
import tensorflow as tf

from pcam_tfdata import records as records_lib
from pcam_tfdata import schema
from pcam_tfdata.training import augment as augment_lib
from pcam_tfdata.training import config as config_lib
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
    batch_size: of each yielded batch: per replica (the size
      `InputContext.get_per_replica_batch_size` gives) with an input context
      of several replicas, else the whole batch.
    training: shuffle each epoch, drop the last partial batch, augment. Else
      every example exactly once, in manifest order, last batch kept.
    augment: training: an augment.Augment (dihedral, stain jitter, where
      each runs, the variant cache's budget); True or 'dihedral' for the
      dihedral transform alone; None or False for none.
    seed: training: epoch e's order and augmentation derive from (seed, e)
      alone (and, in the 'per_pipeline' order, the input pipeline), so a run
      resumed at epoch e sees what the uninterrupted run saw. Iteration k
      yields the epochs from first_epoch + k * num_epochs on, as a seeded
      `shuffle` reshuffles each iteration. None: a fresh base seed each
      iteration.
    input_context: tf.distribute.InputContext: this pipeline's place among
      `num_input_pipelines`, feeding its share of `num_replicas_in_sync`
      replicas. See `order`.
    with_ids: yield (images, labels, ids) instead of (images, labels).
    cache: training: read the split into memory once, here, at about 1x its
      bytes (else re-read it every epoch, in the same order); evaluation:
      keep parsed batches after the first pass.
    first_epoch: training: the number of the first epoch yielded (1-based).
    num_epochs: training: epochs yielded per iteration, one after the other
      (None: endless, from `first_epoch` on each iteration).
    batches_per_epoch: training: batches this pipeline yields per epoch
      (default: every whole batch). A trainer whose steps consume fewer
      passes what it takes, so that epoch e+1 starts with its own first
      batch, not with epoch e's leftovers, and a resumed run lines up with
      an uninterrupted one. In the 'global' order, a multiple of this
      pipeline's replicas.
    first_batch: training: batches of the first epoch skipped (a resume).
    order: training, with several input pipelines: 'global', every pipeline
      holds the whole split, draws the same permutation and draws, cuts it
      into global batches of `batch_size x num_replicas_in_sync` and yields
      its own replicas' slices of each (replica i of the global batch takes
      rows i*batch_size...): the global batches do not depend on how many
      pipelines or replicas there are. 'per_pipeline': each pipeline holds
      and shuffles its own shards only (1/N of the memory; other batches on
      another number of pipelines). 'auto': global while the split's images
      take at most a quarter of this host's memory (`choose_order`). With
      one pipeline the two are the same.

  Returns:
    A tf.data.Dataset of (uint8 [B, H, W, 3], float32 [B]) batches, plus
    string ids [B] with `with_ids`, plus with `augment.dihedral_on_device`
    or `augment.stain_on_device` a dict of what the training step applies
    (`loop.make_train_fn`): 'dihedral', the transform ids int32 [B];
    'stain', the stain maps float32 [B, 4, 3]. (Keras `fit` would take
    that dict for sample weights and refuses it: with `fit`, augment on
    the host.) Training: `num_epochs` epochs of
    `batches_per_epoch` batches, less the `first_batch` skipped.

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
  layout = _Layout.of(input_context)
  parse = lambda x: parse_batch(x, records.image_shape, with_ids)
  if not training:
    shards = records.shards(split, layout.pipelines, layout.pipeline_id)
    return _eval_dataset(records.shard_paths(split, layout.pipelines, layout.pipeline_id),
                         [s['count'] for s in shards], batch_size, parse, cache)
  if choose_order(order, records, split, layout.pipelines) == 'global':
    if seed is None and layout.pipelines > 1:
      # Each would draw its own permutation: examples twice in a step, others never.
      raise ValueError(f'seed=None with {layout.pipelines} input pipelines in the global order: '
                       'they must draw one permutation; give every pipeline the same seed, '
                       "or order='per_pipeline'")
    # (With one pipeline, too: its replicas' batches of a step are then the
    # rows of one global batch, as with several.)
    layout = layout.global_order()
  paths = records.shard_paths(split, layout.shard_pipelines, layout.shard_id)
  count = sum(s['count'] for s in records.shards(split, layout.shard_pipelines, layout.shard_id))
  if count < batch_size * layout.width:
    raise ValueError(f'{records.path}: split {split!r} holds {count} examples for this input '
                     f'pipeline, fewer than one batch of {batch_size * layout.width}')
  steps = _batches_per_epoch(count, batch_size, layout, batches_per_epoch, first_batch)
  variants = cache and _holds_variants(records, count, augment)
  whole = _whole_split(paths, count, parse, cache, variants)
  epochs = _EpochPlan(count, batch_size, steps, augment, variants, layout)
  ds = _train_dataset(whole, epochs, seed, first_epoch, num_epochs, first_batch)
  return ds.with_options(_options(seed is not None, holds_split=cache))


ORDERS = config_lib.INPUT_ORDERS  # ('auto', 'global', 'per_pipeline')
# 'auto' holds the whole split in every pipeline up to this share of the host's memory.
GLOBAL_ORDER_SHARE = 0.25


def split_bytes(records, split):
  """Bytes of a split's images, as the training cache holds them (without dihedral variants)."""
  return records.count(split) * int(np.prod(records.image_shape))


def host_memory():
  """Physical memory of this host in bytes (None where the OS does not say)."""
  try:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  except (ValueError, OSError, AttributeError):
    return None


def choose_order(order, records, split, num_pipelines):
  """'global' or 'per_pipeline': `order` itself, or what 'auto' picks here.

  One pipeline reads every shard either way: 'global'. 'auto' is 'global'
  while the split's images fit GLOBAL_ORDER_SHARE of this host's physical
  memory (not its free memory, which would change the batches with the
  load). A trainer on several hosts must agree on it across them
  (`trainer.set_up` takes the order every worker can hold).

  Raises:
    ValueError: unknown order.
  """
  if order not in ORDERS:
    raise ValueError(f'order={order!r}: choose one of {", ".join(ORDERS)}')
  if num_pipelines <= 1:
    return 'global'
  if order != 'auto':
    return order
  memory = host_memory()
  fits = memory is None or split_bytes(records, split) <= GLOBAL_ORDER_SHARE * memory
  return 'global' if fits else 'per_pipeline'


class _Layout:
  """Which examples of each epoch one input pipeline yields.

  pipelines, pipeline_id: the input context's. shard_pipelines, shard_id:
  among how many pipelines the shards are dealt, and this one's deal (1, 0:
  it reads them all).
  width, offset: in batches of `batch_size`, the global batch of one step
  and where this pipeline's slice of it starts; `width` 1 and `offset` 0 in
  the 'per_pipeline' order, whose batches are each pipeline's own.
  key_id: folded into the epoch's keys (0 for every pipeline in the global
  order: one permutation for all).
  """

  def __init__(self, pipelines, pipeline_id, replicas):
    self.pipelines, self.pipeline_id, self.replicas = pipelines, pipeline_id, replicas
    self.shard_pipelines, self.shard_id, self.key_id = pipelines, pipeline_id, pipeline_id
    self.width, self.offset, self.per_step = 1, 0, 1

  @classmethod
  def of(cls, context):
    if context is None:
      return cls(1, 0, 1)
    return cls(context.num_input_pipelines, context.input_pipeline_id,
               context.num_replicas_in_sync)

  def global_order(self):
    """This layout in the global order: all shards, one permutation, a slice of each step."""
    if self.replicas % self.pipelines:
      raise ValueError(f'{self.replicas} replicas in sync over {self.pipelines} input '
                       'pipelines: each pipeline must feed as many replicas')
    self.per_step = self.replicas // self.pipelines  # Batches yielded per global step.
    self.shard_pipelines, self.shard_id, self.key_id = 1, 0, 0
    self.width, self.offset = self.replicas, self.pipeline_id * self.per_step
    return self


def _batches_per_epoch(count, batch_size, layout, batches_per_epoch, first_batch):
  """Batches this pipeline yields per epoch (checked against the split's), and the check of `first_batch`."""
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


def epoch_keys(base, epoch, pipeline_id):
  """Stateless seeds (order, augmentation), [2] int64 each, of one epoch of one pipeline.

  A pure function of its arguments: nothing carries over from the epochs
  before, so a restarted process computes epoch e's keys as the first did.
  """
  key = tf.random.experimental.stateless_fold_in(
      tf.stack([tf.cast(base, tf.int64), tf.cast(epoch, tf.int64)]), pipeline_id)
  order_key, augment_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  return order_key, augment_key


def _gather_augmented(images, batch_index, transforms):
  """images[batch_index], image j with dihedral transform transforms[j].

  The images are gathered already grouped by transform, so the grouping
  costs no copy of its own. (tools/bench_input.py swaps this function to
  compare augmentation methods inside the same pipeline.)
  """
  order, bounds = augment_lib.group_dihedral(transforms)
  grouped = tf.gather(images, tf.gather(batch_index, order))
  return augment_lib.apply_dihedral(grouped, order, bounds)


class _EpochPlan:
  """Every random draw of an epoch, made at once, and how a batch applies them."""

  def __init__(self, count, batch_size, steps, augment, variants, layout):
    self.count, self.batch_size, self.steps = count, batch_size, steps
    self.augment, self.variants, self.layout = augment, variants, layout

  def draws(self, base, number):
    """Epoch `number`'s batches: indices and every random draw, [steps, batch, ...]."""
    layout = self.layout
    order_key, augment_key = epoch_keys(base, number, layout.key_id)
    dihedral_key, stain_key = tf.unstack(tf.random.experimental.stateless_split(augment_key, 2))
    # Drawn for the global batches of every step (each `width` batches
    # wide), then cut to this pipeline's slice of each: every pipeline
    # draws the same, so each example's transform and stain depend on its
    # place in the global batch, not on which pipeline serves it.
    rows, width = self.steps // layout.per_step, layout.width * self.batch_size
    start, stop = layout.offset * self.batch_size, (layout.offset + layout.per_step) * self.batch_size

    def mine(drawn):  # [rows, width, ...] -> this pipeline's [steps, batch, ...].
      return tf.reshape(drawn[:, start:stop], [self.steps, self.batch_size, *drawn.shape[2:]])

    # A new permutation of the whole split each epoch, from that epoch's key.
    order = tf.random.experimental.stateless_shuffle(tf.range(self.count), seed=order_key)
    index = mine(tf.reshape(order[:rows * width], [rows, width]))
    # The draws of the whole epoch at once, a step ahead: a batch then runs
    # no random op (nor, with `variants`, any op but its gathers).
    draws = {'index': index}
    if self.augment.dihedral:
      transforms = mine(augment_lib.draw_dihedral_ids([rows, width], dihedral_key))
      # With variants, the transform is folded into the image's index.
      draws['image'] = transforms * self.count + index if self.variants else transforms
    if self.augment.stain_jitter:
      # As the map each image's draws make (for either path: bit-identical images).
      draws['stain'] = mine(tf.reshape(augment_lib.stain_transform(
          augment_lib.draw_stain(rows * width, self.augment.stain_jitter, stain_key)),
          [rows, width, 4, 3]))
    return draws

  def gather(self, draws, fields):
    """One batch from the split's fields and its draws."""
    images, *rest = fields
    index = draws['index']
    if self.variants:
      images = tf.gather(images, draws['image'])
    elif self.augment.dihedral and not self.augment.dihedral_on_device:
      images = _gather_augmented(images, index, draws['image'])
    else:
      images = tf.gather(images, index)
    rest = [tf.gather(f, index) for f in rest]
    drawn = {}  # What the training step applies (`loop.make_train_fn`).
    if self.augment.dihedral_on_device:
      drawn['dihedral'] = draws['image']
    if self.augment.stain_on_device:
      drawn['stain'] = draws['stain']
    elif self.augment.stain_jitter:
      images = augment_lib.apply_stain(images, draws['stain'])
    return (images, *rest, drawn) if drawn else (images, *rest)


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
