"""Learning rate per training step: --lr_schedule and --warmup_epochs.

  plateau   the seed's ReduceLROnPlateau: the rate stays until the val AUC
            stalls for --reduce_lr_patience epochs, then halves
            (`loop.CallbackState`); with --warmup_epochs it first rises
            linearly from 0.
  cosine    linear warm-up (if any), then cosine decay to 0 at the last step
            of --epochs (Loshchilov & Hutter's SGDR without restarts).
  onecycle  Smith's one cycle, as PyTorch's OneCycleLR: from --learning_rate/25
            up to it over the warm-up (--warmup_epochs, or 30% of the run),
            then cosine down to 1/10,000 of the start.

A schedule is a function of the optimizer's step counter alone (and, for
plateau, of the halvings so far), so a run resumed from any backup, which
restores that counter, continues on the same curve. The default (plateau
without warm-up) keeps the optimizer's plain learning-rate variable, as
every run before these flags.
"""

import math

import keras
import tensorflow as tf

_ONECYCLE_DIV = 25.0  # PyTorch's div_factor: start at peak / 25.
_ONECYCLE_FINAL_DIV = 1e4  # final_div_factor: end at start / 1e4.
_ONECYCLE_WARMUP = 0.3  # pct_start.


def uses_schedule(config):
  """Whether the rate changes within epochs (else the plain variable of the seed's runs)."""
  return config.lr_schedule != 'plateau' or config.warmup_epochs > 0


class Schedule(keras.optimizers.schedules.LearningRateSchedule):
  """The rate at a step: peak * scale * shape(step), `scale` the plateau halvings (a variable)."""

  def __init__(self, kind, peak, steps_per_epoch, epochs, warmup_epochs):
    self.kind, self.peak = kind, float(peak)
    self.total = float(steps_per_epoch * epochs)
    if kind == 'onecycle' and not warmup_epochs:
      warmup_epochs = _ONECYCLE_WARMUP * epochs
    self.warmup = float(round(warmup_epochs * steps_per_epoch))
    # The plateau's halvings; set by the epoch loop, saved with its state.
    self.scale = tf.Variable(1.0, trainable=False, dtype=tf.float32, name='lr_scale')

  def shape(self, step):
    """The schedule's factor of the peak at a step (float32 scalar), before plateau halvings."""
    step = tf.cast(step, tf.float32)
    warmup, total = self.warmup, self.total
    if self.kind == 'onecycle':
      start = 1.0 / _ONECYCLE_DIV
      end = start / _ONECYCLE_FINAL_DIV
      up = start + (1.0 - start) * _cosine_rise(step, warmup)
      down = end + (1.0 - end) * _cosine_fall(step - warmup, total - warmup)
      return tf.where(step < warmup, up, down)
    # Step k of the warm-up trains at (k + 1) / warmup: never a step at 0.
    rise = tf.minimum((step + 1.0) / max(warmup, 1.0), 1.0) if warmup else tf.constant(1.0)
    if self.kind == 'cosine':
      return rise * _cosine_fall(step - warmup, total - warmup)
    return rise

  def __call__(self, step):
    return self.peak * self.scale * self.shape(step)

  def get_config(self):
    return {'kind': self.kind, 'peak': self.peak, 'total': self.total, 'warmup': self.warmup}


def _cosine_fall(step, length):
  """1 -> 0 along half a cosine over `length` steps (then 0)."""
  progress = tf.clip_by_value(step / max(length, 1.0), 0.0, 1.0)
  return 0.5 * (1.0 + tf.cos(math.pi * progress))


def _cosine_rise(step, length):
  """0 -> 1 along half a cosine over `length` steps, as OneCycleLR's warm-up."""
  return 1.0 - _cosine_fall(step, length)


def of(optimizer):
  """The optimizer's `Schedule`, or None for a plain learning-rate variable."""
  inner = getattr(optimizer, 'inner_optimizer', optimizer)  # (Under loss scaling.)
  rate = getattr(inner, '_learning_rate', None)
  return rate if isinstance(rate, Schedule) else None


def set_plateau_rate(optimizer, rate):
  """The plateau's rate (the seed's halvings): the plain variable, or the schedule's scale."""
  schedule = of(optimizer)
  if schedule is None:
    optimizer.learning_rate.assign(rate)
  else:
    schedule.scale.assign(rate / schedule.peak)


def last_rate(optimizer, plain_rate):
  """The rate the last step trained with (history.csv): `plain_rate` without a schedule."""
  schedule = of(optimizer)
  if schedule is None:
    return plain_rate
  return float(schedule(optimizer.iterations - 1))
