"""The tf.data input pipeline over the records written by tools/make_records.py.

Training, in the order of the TF performance guide: list the split's shards ->
shard them per input pipeline -> read and parse 1024 records at a time into
one tensor per field holding the whole (per-pipeline) split, once (the cache;
with augmentation and within a memory budget, the 8 dihedral variants of
every image) -> per epoch, from the seed and the epoch number, a permutation
cut into batches and every random draw of the epoch, made while the epoch
before is consumed -> each batch gathered from the cache (with the variants,
its transforms folded into the gather's index; without, applied as static
flips and transposes to the groups that drew each one) -> optional HED stain
jitter per image (or its draws passed on, for the training step) -> prefetch.

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

from pcam_tfdata import augment as augment_lib
from pcam_tfdata import schema

_PARSE_BATCH = 1024  # Records parsed per op; also the eval cache's element size.
_EVAL_READ_BUFFER = 8 << 20
SERVICE_JOB_NAME = 'pcam_tfdata_train'
_SERVICE_SHUFFLE_BUFFER = 8192  # Examples per service worker.
# Memory the 8 dihedral variants of a pipeline's cached split may take: the
# seed's 80,000 train patches at 32x32 take 1.8 GiB (at 96x96: 16.5 GiB).
DEFAULT_VARIANT_BUDGET = 4 << 30


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


def _aligned_empty(shape, dtype, alignment=64):
  """np.empty whose data starts on an `alignment`-byte boundary, as TF's kernels require."""
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape)) * dtype.itemsize
  raw = np.empty(nbytes + alignment, np.uint8)
  offset = -raw.ctypes.data % alignment
  return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def load_split(paths, count, parse, variants=False):
  """Reads shards into one tensor per field, [count, ...], at about 1x their bytes.

  Records are parsed 1,024 at a time and copied into arrays allocated once;
  the image array becomes a tensor without a copy (DLPack). Building the same
  tensor with tf.data (`unbatch().batch(count)`, then `cache`) peaked at 3.1x
  the split's bytes.

  Args:
    paths: shard files, read in this order.
    count: records they hold (from the manifest).
    parse: serialized [N] -> tuple of fields, [N, ...] each; images first.
    variants: the images field holds the 8 dihedral variants of every image,
      [8 * count, ...], variant t of image i at t * count + i
      (`augment.dihedral_variants`): 8x the images' bytes, at a peak of 9x.

  Returns:
    A tuple of tensors in the order `parse` returns its fields.

  Raises:
    schema.ShardCountError: the shards hold another number of records.
  """
  reader = tf.data.TFRecordDataset(paths, buffer_size=_EVAL_READ_BUFFER).batch(_PARSE_BATCH)
  reader = reader.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  fields, filled = None, 0
  for chunk in reader:
    arrays = [c.numpy() for c in chunk]
    if fields is None:
      fields = [np.empty(count, object) if a.dtype == object else
                _aligned_empty((count, *a.shape[1:]), a.dtype) for a in arrays]
    n = len(arrays[0])
    if filled + n > count:
      break
    for field, array in zip(fields, arrays):
      field[filled:filled + n] = array
    filled += n
  else:
    if filled == count:
      images = fields[0]
      if variants:
        images = _aligned_empty((augment_lib.NUM_DIHEDRAL, *fields[0].shape), np.uint8)
        augment_lib.dihedral_variants(fields[0], images)
        fields[0] = None  # Variant 0 is the image itself.
        images = images.reshape(-1, *images.shape[2:])
      first = tf.experimental.dlpack.from_dlpack(images.__dlpack__())  # No copy.
      return (first, *(tf.constant(f) for f in fields[1:]))
  raise schema.ShardCountError(f'{os.path.dirname(paths[0])}: its shards hold another number '
                               f'of records than the {count} manifest.json lists')


def _shards_for_pipeline(records_dir, manifest, split, input_context):
  """The split's shard paths and each one's record count, for this input pipeline."""
  shards = manifest['splits'][split]['shards']
  if input_context is not None and input_context.num_input_pipelines > 1:
    n = input_context.num_input_pipelines
    if len(shards) < n:
      raise ValueError(f'{records_dir}: split {split!r} has {len(shards)} shards, fewer than '
                       f'{n} input pipelines; rerun tools/make_records.py with '
                       f'--num_shards={n} or more')
    shards = shards[input_context.input_pipeline_id::n]
  return [f'{records_dir}/{s["file"]}' for s in shards], [s['count'] for s in shards]


def steps_per_epoch(manifest, split, batch_size, num_input_pipelines=1):
  """Training steps that every input pipeline can serve in one epoch.

  Pipelines read different shards and so hold different counts; synchronous
  training must take the same number of steps on each, the smallest.
  """
  shards = manifest['splits'][split]['shards']
  counts = [sum(s['count'] for s in shards[i::num_input_pipelines])
            for i in range(num_input_pipelines)]
  return min(counts) // batch_size


def make_dataset(records_dir, split, *, batch_size, training, cache=True, augment=None,
                 seed=None, input_context=None, with_ids=False, first_epoch=1, num_epochs=1,
                 batches_per_epoch=None, stain_jitter=0.0,
                 variant_budget=DEFAULT_VARIANT_BUDGET, stain_params=False):
  """Builds the input pipeline of one split.

  Args:
    records_dir: a folder written by tools/make_records.py (needs its manifest).
    split: 'train', 'val' or 'test'.
    batch_size: per input pipeline (per replica batch x replicas per worker).
    training: shuffle each epoch, drop the last partial batch, augment. Else
      every example exactly once, in manifest order, last batch kept.
    cache: training: read the split into memory once, here, at about 1x its
      bytes (else re-read it every epoch); evaluation: keep parsed batches
      after the first pass.
    augment: True or 'dihedral' for a flip/rotation per image, uniform over
      the 8 and independent (training only); None or False for none.
    seed: training: epoch e's order and augmentation derive from (seed, e,
      input pipeline) alone, so a run resumed at epoch e sees what the
      uninterrupted run saw. None: a fresh base seed each iteration.
    input_context: tf.distribute.InputContext; each pipeline reads its own
      subset of the shard files.
    with_ids: yield (images, labels, ids) instead of (images, labels).
    first_epoch: training: the number of the first epoch yielded (1-based).
    num_epochs: training: epochs yielded per iteration, one after the other
      (None: endless).
    stain_jitter: training: s in [0, 1), each image's haematoxylin, eosin and
      DAB concentrations scaled by U(1-s, 1+s) and shifted by U(-s, s), per
      image and stain (`augment.stain_jitter`); after the cache, never cached;
      0 for none.
    batches_per_epoch: training: batches of each epoch (default: every whole
      batch of the split). A trainer whose steps consume fewer (several
      replicas per pipeline, or pipelines of unequal size) passes what it
      takes, so that epoch e+1 starts with its own first batch, not with
      epoch e's leftovers, and a resumed run lines up with an uninterrupted one.
    variant_budget: training with `augment` and `cache`: bytes the 8
      dihedral variants of this pipeline's split may take in memory. Within
      it the cache holds them and a batch is one gather of (variant, index),
      as cheap as no augmentation; over it (said once, in the log) each
      batch is transformed after its gather. The two give the same batches.
    stain_params: training with `stain_jitter`: yield each batch's stain
      draws (`augment.draw_stain`, float32 [B, 2, 3]) as a last element
      instead of applying them, for the training step to apply on the
      accelerator; `augment.apply_stain(images, params)` is the batch the
      pipeline would have yielded (up to a pixel rounded the other way by a
      compiled function's float arithmetic).

  Returns:
    A tf.data.Dataset of (uint8 [B, H, W, 3], float32 [B]) batches (plus
    string ids [B]). Training: `num_epochs` epochs of steps_per_epoch batches.

  Raises:
    schema.ManifestError: no manifest, or no such split.
    ValueError: bad arguments, or fewer shards than input pipelines.
  """
  if batch_size < 1:
    raise ValueError(f'batch_size={batch_size}: must be >= 1')
  if augment not in (None, False, True, 'dihedral'):
    raise ValueError(f'augment={augment!r}: use None, False, True or "dihedral"')
  if not 0 <= stain_jitter < 1:
    raise ValueError(f'stain_jitter={stain_jitter}: must be in [0, 1)')
  if stain_params and not (training and stain_jitter):
    raise ValueError('stain_params=True needs training=True and stain_jitter > 0')
  if first_epoch < 1 or (num_epochs is not None and num_epochs < 1):
    raise ValueError(f'first_epoch={first_epoch}, num_epochs={num_epochs}: must be >= 1')
  manifest = schema.load_manifest(records_dir)
  schema.shard_paths(records_dir, manifest, split)  # Raises for an unknown split.
  image_shape = tuple(manifest['image_shape'])
  paths, counts = _shards_for_pipeline(records_dir, manifest, split, input_context)
  count = sum(counts)
  parse = lambda x: parse_batch(x, image_shape, with_ids)
  if not training:
    return _eval_dataset(paths, counts, batch_size, parse, cache)
  if count < batch_size:
    raise ValueError(f'{records_dir}: split {split!r} holds {count} examples for this input '
                     f'pipeline, fewer than one batch of {batch_size}')
  whole_batches = count // batch_size  # drop_remainder: static shapes.
  if batches_per_epoch is None:
    batches_per_epoch = whole_batches
  if not 1 <= batches_per_epoch <= whole_batches:
    raise ValueError(f'batches_per_epoch={batches_per_epoch}: this input pipeline has '
                     f'{whole_batches} whole batches of {batch_size} per epoch')
  pipeline_id = input_context.input_pipeline_id if input_context else 0
  variants = bool(augment) and cache
  if variants:
    need = augment_lib.NUM_DIHEDRAL * count * int(np.prod(image_shape))
    if need > variant_budget:
      variants = False
      if variant_budget:  # (0: the caller asked for no variants.)
        logging.warning('%s: the 8 dihedral variants of this pipeline\'s %d train examples '
                        'need %.2f GiB, over the %.2f GiB budget; transforming each batch '
                        'after its gather instead (the same batches, more host time)',
                        records_dir, count, need / 2**30, variant_budget / 2**30)
  return _train_dataset(paths, count, batch_size, parse, cache, bool(augment), seed,
                        pipeline_id, first_epoch, num_epochs, batches_per_epoch,
                        float(stain_jitter), variants, stain_params)


def _eval_dataset(paths, counts, batch_size, parse, cache):
  # Files in manifest order, read one after the other: a fixed order, and
  # evaluation reads each split once per epoch, so parallel reads buy little.
  # Each shard must hold the records its manifest entry lists: a truncated
  # one fails the read (FailedPreconditionError) rather than leaving
  # examples out of the metrics or the submission.
  ds = None
  for path, n in zip(paths, counts):
    shard = tf.data.TFRecordDataset(path, buffer_size=_EVAL_READ_BUFFER).apply(
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


def _train_dataset(paths, count, batch_size, parse, cache, augment, seed, pipeline_id,
                   first_epoch, num_epochs, steps, stain, variants, stain_params):
  deterministic = seed is not None
  if cache:
    # The whole split as one element: one tensor per field, [count, ...],
    # read once, here. An epoch is then a gather by index (with `variants`,
    # of (transform, index): the augmentation costs no op of its own).
    whole = tf.data.Dataset.from_tensors(load_split(paths, count, parse, variants))
  else:
    # Re-read each epoch, shard after shard in manifest order, as
    # `load_split` reads them: position i is the same example either way, so
    # the permutation below gives the cached path's batches. (The epoch is
    # shuffled whole anyway; an interleave would only reorder it.)
    records = tf.data.TFRecordDataset(paths, buffer_size=_EVAL_READ_BUFFER)
    chunks = records.batch(_PARSE_BATCH).map(parse, num_parallel_calls=tf.data.AUTOTUNE,
                                             deterministic=True)
    # (unbatch -> batch copies each example once; ragged_batch ran at a fifth.)
    whole = chunks.unbatch().batch(count)

  def plan(base, number):
    """Epoch `number`'s batches: indices and every random draw, [steps, batch, ...]."""
    order_key, augment_key = epoch_keys(base, number, pipeline_id)
    dihedral_key, stain_key = tf.unstack(tf.random.experimental.stateless_split(augment_key, 2))
    # A new permutation of the whole split each epoch, from that epoch's key.
    order = tf.random.experimental.stateless_shuffle(tf.range(count), seed=order_key)
    index = tf.reshape(order[:steps * batch_size], [steps, batch_size])
    # The draws of the whole epoch at once, here, a step ahead: a batch then
    # runs no random op (nor, with `variants`, any op but its gathers).
    draws = {'index': index}
    if augment:
      transforms = augment_lib.draw_dihedral_ids([steps, batch_size], dihedral_key)
      # With variants, the transform is folded into the image's index.
      draws['image'] = transforms * count + index if variants else transforms
    if stain:
      draws['stain'] = tf.reshape(
          augment_lib.draw_stain(steps * batch_size, stain, stain_key), [steps, batch_size, 2, 3])
    return draws

  def epoch(draws, fields):
    # `fields` repeats by reference, not by copy: each batch sees the split.
    return tf.data.Dataset.zip(tf.data.Dataset.from_tensor_slices(draws),
                               tf.data.Dataset.from_tensors(fields).repeat())

  def gather(draws, fields):
    images, *rest = fields
    index = draws['index']
    if variants:
      images = tf.gather(images, draws['image'])
    elif augment:
      images = _gather_augmented(images, index, draws['image'])
    else:
      images = tf.gather(images, index)
    rest = [tf.gather(f, index) for f in rest]
    if stain_params:
      rest.append(draws['stain'])
    elif stain:
      images = augment_lib.apply_stain(images, draws['stain'])
    return (images, *rest)

  # One base seed per iteration (the given one, or a fresh draw), then the
  # epoch numbers: (base, e) decides everything random in epoch e.
  if seed is None:
    bases = tf.data.Dataset.random(rerandomize_each_iteration=True).take(1)
  else:
    bases = tf.data.Dataset.from_tensors(tf.constant(seed, tf.int64))
  numbers = (tf.data.Dataset.counter(first_epoch) if num_epochs is None
             else tf.data.Dataset.range(first_epoch, first_epoch + num_epochs))
  # Each epoch's permutation is made a step ahead (prefetched), while the
  # epoch before it is still being consumed: no stall at the boundary.
  plans = bases.flat_map(lambda base: numbers.map(lambda e: plan(base, e))).prefetch(1)
  ds = tf.data.Dataset.zip(plans, whole.repeat()).flat_map(epoch)
  # Outside the flat_map, so that batches are gathered on all cores at once.
  ds = ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
  ds = ds.apply(tf.data.experimental.assert_cardinality(
      tf.data.INFINITE_CARDINALITY if num_epochs is None else steps * num_epochs))
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(deterministic, holds_split=cache))


def make_streaming_dataset(records_dir, split, *, batch_size, augment=None, seed=None,
                           with_ids=False, repeat=False, stain_jitter=0.0):
  """The streaming form of the training pipeline, which tf.data service workers run.

  Read (interleaved), parse 1,024 at a time, shuffle in a buffer of
  8,192 examples, batch, augment: no whole-split cache, since a service
  worker sees only the shard files the dispatcher hands it. Also how
  tools/bench_scale.py separates the service's own cost from the cache's.

  Args: as `make_service_dataset`, without the address.

  Returns:
    A local tf.data.Dataset of batches.
  """
  manifest = schema.load_manifest(records_dir)
  paths = schema.shard_paths(records_dir, manifest, split)
  image_shape = tuple(manifest['image_shape'])
  files = tf.data.Dataset.from_tensor_slices(paths)  # Split by the dispatcher, file by file.
  if repeat:
    files = files.repeat()
  ds = files.interleave(tf.data.TFRecordDataset, cycle_length=4, block_length=16,
                        num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  ds = ds.batch(_PARSE_BATCH).map(lambda x: parse_batch(x, image_shape, with_ids),
                                  num_parallel_calls=tf.data.AUTOTUNE).unbatch()
  ds = ds.shuffle(_SERVICE_SHUFFLE_BUFFER, seed=seed).batch(batch_size, drop_remainder=True)
  if augment or stain_jitter:
    # A stateless seed per batch: (seed, batch number), or random pairs.
    keys = (tf.data.Dataset.random().batch(2) if seed is None else
            tf.data.Dataset.counter().map(lambda i: tf.stack([tf.constant(seed, tf.int64), i])))

    def augment_batch(batch, key):
      images = augment_lib.random_dihedral(batch[0], key) if augment else batch[0]
      images = augment_lib.stain_jitter(images, stain_jitter,
                                        tf.random.experimental.stateless_fold_in(key, 1))
      return (images, *batch[1:])

    ds = tf.data.Dataset.zip(ds, keys).map(augment_batch, num_parallel_calls=tf.data.AUTOTUNE)
  return ds


def make_service_dataset(records_dir, split, address, *, batch_size, augment=None, seed=None,
                         with_ids=False, repeat=False, job_name=SERVICE_JOB_NAME,
                         stain_jitter=0.0):
  """The training pipeline, run by the tf.data service at `address`.

  Service workers run its streaming form (read, parse, shuffle in a buffer,
  batch, augment): the whole-split cache of `make_dataset` does not apply,
  since the dispatcher hands each worker shard files one at a time (dynamic
  sharding). Each example is read once per pass whatever the number of
  workers, and trainers sharing `job_name` share one stream of batches.

  Args:
    records_dir, split, batch_size, augment, seed, with_ids, stain_jitter: as
      pipeline.make_dataset (training mode).
    address: the dispatcher, 'grpc://host:port'.
    repeat: endless passes (training); else one pass, each example once
      (minus each service worker's last partial batch).
    job_name: consumers with the same name share one stream of batches.

  Returns:
    A tf.data.Dataset of batches, read from the service.
  """
  ds = make_streaming_dataset(records_dir, split, batch_size=batch_size, augment=augment,
                              seed=seed, with_ids=with_ids, repeat=repeat,
                              stain_jitter=stain_jitter)
  dataset_id = tf.data.experimental.service.register_dataset(address, ds)
  service = tf.data.experimental.service.from_dataset_id(
      processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC,
      service=address, dataset_id=dataset_id, element_spec=ds.element_spec,
      job_name=job_name)
  return service.prefetch(tf.data.AUTOTUNE)
