"""One training loop for every strategy, with the seed's callbacks as plain code.

Keras 3's `Model.fit` does not run under MultiWorkerMirroredStrategy
(keras-team/keras#20585), so training is a short custom loop: `strategy.run`
over Keras layers and optimizer (whose TF backend all-reduces gradients), a
few steps per compiled call. EarlyStopping, ReduceLROnPlateau and
ModelCheckpoint become the small state machine below, with Keras' semantics
(mode max on val AUC, `wait` counters, best weights restored);
BackupAndRestore is `backup.Backup`.
"""

import dataclasses
import math

import keras
import tensorflow as tf

from pcam_tfdata.training import augment

MONITOR = 'val_auc'  # Maximized, as the seed's EarlyStopping and checkpoint.


@dataclasses.dataclass
class CallbackState:
  """What EarlyStopping, ReduceLROnPlateau and ModelCheckpoint remember."""
  best: float = -math.inf
  best_epoch: int = 0
  wait: int = 0  # Epochs since the monitor last improved (EarlyStopping).
  lr_wait: int = 0  # The same, reset at each LR reduction (ReduceLROnPlateau).
  stopped_early: bool = False
  pruned: bool = False  # The run's `on_epoch_end` asked it to stop (a search pruned it).

  def update(self, epoch, value, *, early_stopping_patience, reduce_lr_patience, lr,
             lr_factor=0.5, min_lr=1e-6):
    """Takes one epoch's monitor value; returns (improved, new learning rate)."""
    improved = value > self.best  # NaN never improves, as in Keras.
    if improved:
      self.best, self.best_epoch, self.wait, self.lr_wait = value, epoch, 0, 0
    else:
      self.wait += 1
      self.lr_wait += 1
      if self.lr_wait >= reduce_lr_patience and lr > min_lr:
        lr = max(lr * lr_factor, min_lr)
        self.lr_wait = 0
      if self.wait >= early_stopping_patience:
        self.stopped_early = True
    return improved, lr


def make_train_fn(model, optimizer, strategy, global_batch_size, jit_compile=False,
                  label_smoothing=0.0):
  """A compiled function running `n` training steps from a distributed iterator.

  Args:
    model, optimizer: built in `strategy.scope()`; the optimizer may be a
      keras.optimizers.LossScaleOptimizer (float16).
    strategy: the tf.distribute strategy.
    global_batch_size: examples per step over all replicas; the loss is
      divided by it, so that the replicas' summed gradients are the mean.
    jit_compile: compile each replica's forward and backward pass with XLA
      (the gradient reduction and the update stay outside, where the
      strategy's collectives run).
    label_smoothing: the training loss' targets 0 and 1 become s/2 and
      1 - s/2 (Keras' BinaryCrossentropy); accuracy counts the true labels.

  Returns:
    fn(iterator, n) -> (sum of per-example losses, correct predictions), both
    summed over the n steps and all replicas. The iterator yields (images,
    labels), or (images, labels, drawn): `drawn`, what the pipeline drew
    for the device to apply (`pipeline.make_dataset`), holds 'dihedral'
    transform ids (int32 [B]) and/or 'stain' maps (float32 [B, 4, 3]).
    Each is applied here, on the replica's share of the batch
    (`augment.apply_dihedral_ids`, `augment.apply_stain`), to the same bits
    as in the pipeline.
  """
  loss_fn = keras.losses.BinaryCrossentropy(reduction=None, label_smoothing=label_smoothing)
  loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

  def forward_backward(images, labels):
    with tf.GradientTape() as tape:
      probs = model(images, training=True)
      per_example = loss_fn(labels, probs)
      # Summed over replicas by the optimizer: divide by the global batch.
      loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch_size)
      scaled = optimizer.scale_loss(loss)  # Loss scaling under float16; else a no-op.
    return probs, per_example, tape.gradient(scaled, model.trainable_variables)

  if jit_compile:
    forward_backward = tf.function(forward_backward, jit_compile=True)

  def step(images, labels, drawn=None):
    drawn = drawn or {}
    if 'dihedral' in drawn:
      images = augment.apply_dihedral_ids(images, drawn['dihedral'])
    if 'stain' in drawn:
      images = augment.apply_stain(images, drawn['stain'])
    labels = tf.reshape(labels, [-1, 1])
    probs, per_example, grads = forward_backward(images, labels)
    if loss_scaled and strategy.num_replicas_in_sync > 1:
      grads = _agree_on_finite(grads)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    correct = tf.reduce_sum(tf.cast(tf.equal(tf.cast(probs >= 0.5, tf.float32), labels),
                                    tf.float32))
    return tf.reduce_sum(per_example), correct

  @tf.function
  def train_steps(iterator, n):
    loss_sum = tf.constant(0.0)
    correct = tf.constant(0.0)
    for _ in tf.range(n):
      loss, right = strategy.run(step, args=tuple(next(iterator)))
      # One reduce per value: MultiWorkerMirroredStrategy does not take a tuple.
      loss_sum += strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
      correct += strategy.reduce(tf.distribute.ReduceOp.SUM, right, axis=None)
    return loss_sum, correct

  return train_steps


def _agree_on_finite(grads):
  """Makes every replica's gradients non-finite if any replica's are.

  Keras' LossScaleOptimizer checks each replica's own gradients, before they
  are summed, and follows the first replica's verdict (or each its own): a
  NaN on any other replica was applied to the weights for good, and under
  MultiWorkerMirroredStrategy workers that disagreed hung. One all-reduced
  count per step makes the verdict global, so every replica skips the step
  and halves the scale together, or none does.
  """
  bad = tf.add_n([tf.reduce_sum(tf.cast(~tf.math.is_finite(g), tf.float32)) for g in grads])
  bad = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, bad)
  poison = tf.where(bad > 0, tf.constant(float('nan')), tf.constant(0.0))
  return [grads[0] + tf.cast(poison, grads[0].dtype), *grads[1:]]
