"""Which examples of each epoch an input pipeline serves: the global or the per-pipeline order.

In the global order every input pipeline holds the whole train split, draws
the one permutation and the one set of augmentation draws of each epoch,
cuts them into global batches and yields its own replicas' rows of each:
the global batches are a function of the seed, the records and the global
batch size alone, so a run resumes on another number of workers, GPUs or
replicas with the batches it would have had. The per-pipeline order (each
pipeline its own shards, shuffled alone) holds 1/N of the split per worker,
for splits too large to hold whole on every worker.

`choose_order` decides; `Layout` says what a pipeline serves in either;
`EpochPlan` makes an epoch's permutation and draws and gathers a batch.
"""

import os

import numpy as np
import tensorflow as tf

from pcam_tfdata.training import augment as augment_lib
from pcam_tfdata.training import config as config_lib

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


def training_layout(context, order, records, split, seed):
  """The Layout of a training pipeline with InputContext `context` (or None) in `order`.

  Raises:
    ValueError: an unknown order; several pipelines in the global order
      without a seed.
  """
  layout = Layout.of(context)
  if choose_order(order, records, split, layout.pipelines) != 'global':
    return layout
  if seed is None and layout.pipelines > 1:
    # Each would draw its own permutation: examples twice in a step, others never.
    raise ValueError(f'seed=None with {layout.pipelines} input pipelines in the global order: '
                     'they must draw one permutation; give every pipeline the same seed, '
                     "or order='per_pipeline'")
  # (With one pipeline, too: its replicas' batches of a step are then the
  # rows of one global batch, as with several.)
  return layout.global_order()


class Layout:
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
  costs no copy of its own.
  """
  order, bounds = augment_lib.group_dihedral(transforms)
  grouped = tf.gather(images, tf.gather(batch_index, order))
  return augment_lib.apply_dihedral(grouped, order, bounds)


class EpochPlan:
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
    start = layout.offset * self.batch_size
    stop = start + layout.per_step * self.batch_size

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
