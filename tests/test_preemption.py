"""The preemption watch: a signal becomes a backup at the next step, then Preempted."""

import signal

import pytest
import tensorflow as tf
from tensorflow.python.distribute.failure_handling import failure_handling_util

from pcam_tfdata.training import preemption


def _steps(watch, signal_at, steps=6):
  """Checks after each step; the signal comes during `signal_at`. Returns (saves, stop)."""
  saves = []
  for step in range(1, steps + 1):
    if step == signal_at:
      watch._on_signal(signal.SIGTERM, None)  # pylint: disable=protected-access  # (As Python calls it.)
    try:
      watch.check(1, step, save=lambda step=step: saves.append(step))
    except preemption.Preempted as e:
      return saves, (e.epoch, e.step, str(e))
  return saves, None


@pytest.fixture
def watch():
  made = preemption.Watch(tf.distribute.get_strategy())
  yield made
  made.close()


def test_a_signal_saves_once_at_the_step_after_it_and_stops_there():
  before = signal.getsignal(signal.SIGINT)
  watch = preemption.Watch(tf.distribute.get_strategy())
  try:
    # TensorFlow's handler sets the step after the one it hears of at: the
    # signal in step 2 is acted on after step 3, the same step on every worker.
    saves, stop = _steps(watch, signal_at=2)
    assert signal.getsignal(signal.SIGINT) is before  # A second Ctrl-C acts as without us.
  finally:
    watch.close()
  assert saves == [3]
  assert stop == (1, 3, 'preempted at epoch 1, step 3: backup saved; rerun the same command '
                        'to resume')
  assert watch.signalled


def test_no_signal_no_save_and_the_signals_come_back(watch):
  assert signal.getsignal(signal.SIGINT) == watch._on_signal  # pylint: disable=protected-access
  saves, stop = _steps(watch, signal_at=None)
  assert saves == [] and stop is None and not watch.signalled
  previous_int = watch._previous[signal.SIGINT]  # pylint: disable=protected-access
  watch.close()
  assert signal.getsignal(signal.SIGINT) is previous_int  # Ctrl-C is the caller's again.


def test_where_tensorflows_handler_watches_nothing_the_process_stops_alone(monkeypatch):
  """GCE CPU VMs: TensorFlow's handler sets no SIGTERM function and never saves."""
  monkeypatch.setattr(failure_handling_util, 'detect_platform',
                      lambda: failure_handling_util.PlatformDevice.GCE_CPU)
  alone = preemption.Watch(tf.distribute.get_strategy())
  try:
    saves, stop = _steps(alone, signal_at=2)
  finally:
    alone.close()
  assert saves == [2] and stop[:2] == (1, 2)
