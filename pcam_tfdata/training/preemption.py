"""Preemption, the TensorFlow way: a signal becomes a backup at a step every worker reaches.

Cluster managers stop a job with SIGTERM and kill it some seconds later
(Kubernetes 30 s, Slurm's --signal); a user stops one with Ctrl-C. Either
signal, to any worker, is handed to TensorFlow's
`tf.distribute.experimental.PreemptionCheckpointHandler` as a termination
notice. Under MultiWorkerMirroredStrategy the handler agrees, through the
coordination service, on the next step all workers reach; there each saves
the run's backup (`save_fn`, our `Backup`) and leaves (`exit_fn`, which
raises `Preempted`). On one process it does the same without the
agreement. A second signal acts as it would without us (Ctrl-C raises
KeyboardInterrupt; SIGTERM ends the process).

On Google Compute Engine CPU and TPU VMs TensorFlow's handler watches
nothing (it logs "does not support usage with TPU or CPU device on GCP");
there each signalled process saves at its next step on its own: exact on
one process; across several workers, without the agreement, untested.
"""

import logging
import signal
import threading

# TensorFlow's own exit status after a preemption checkpoint outside GCP
# (`BorgTerminationConfig`): a restart policy can key on it.
EXIT_STATUS = 42
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _HandlerDeprecation(logging.Filter):
  """Drops the deprecation warning TensorFlow's handler logs about itself at each save."""

  def filter(self, record):
    return 'PreemptionCheckpointHandler.total_run_calls' not in record.getMessage()


_HANDLER_DEPRECATION = _HandlerDeprecation()  # One object: addFilter adds it once.


class Preempted(Exception):
  """The run was stopped by a signal after saving a backup at (epoch, step)."""

  def __init__(self, epoch, step):
    super().__init__(f'preempted at epoch {epoch}, step {step}: backup saved; rerun the same '
                     'command to resume')
    self.epoch, self.step = epoch, step


class Watch:
  """SIGTERM or SIGINT -> a backup at the next step every worker reaches, then `Preempted`.

  Call `check(epoch, step, save)` between steps, at the same points on every
  worker (after the same steps): if a signal has come, here or on a peer,
  the handler calls `save()` at the agreed step, then `Preempted(epoch,
  step)` is raised. `close()` gives the signals back.
  """

  def __init__(self, strategy):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  # (Preempted is TF-free.)
    self._errors = tf.errors
    # (Its own `_save_checkpoint` reads its deprecated `total_run_calls`.)
    tf.get_logger().addFilter(_HANDLER_DEPRECATION)
    self._signalled = threading.Event()
    self._position = None
    self._notify = None
    main = self._main = threading.current_thread() is threading.main_thread()  # (Python's rule.)
    self._previous = {sig: signal.getsignal(sig) for sig in _SIGNALS} if main else {}
    # Made in the main thread, the handler watches SIGTERM itself (a signal
    # handler, no polling thread); elsewhere no signal can reach us, and a
    # watcher that is never set keeps this worker in its peers' agreement.
    config = tf.distribute.experimental.TerminationConfig(
        termination_watcher_fn=None if main else self._signalled.is_set, exit_fn=self._exit,
        save_fn=self._save, grace_period=0)
    # The handler must be given a checkpoint manager, and restores from it
    # when made; ours reads from a folder that never exists and writes
    # nothing (`save_fn` saves), so every worker's step count starts at 0,
    # and they agree, whatever scratch folders an earlier run left.
    unused = tf.train.CheckpointManager(tf.train.Checkpoint(), '/nonexistent/pcam_tfdata',
                                        max_to_keep=1)
    resolver = getattr(strategy, 'cluster_resolver', None)
    if resolver is not None and not resolver.cluster_spec().jobs:
      resolver = None  # One process: no peers to agree with.
    self._peers = resolver is not None
    self._handler = tf.distribute.experimental.PreemptionCheckpointHandler(
        resolver, unused, termination_config=config)
    if main:
      # Ctrl-C as well as SIGTERM goes to the handler's own SIGTERM function.
      # If it set none (on GCE CPU and TPU VMs TensorFlow's handler watches
      # nothing, by its own rule), `check` stops this process alone.
      installed = signal.getsignal(signal.SIGTERM)
      if installed is not self._previous[signal.SIGTERM]:
        self._notify = installed
      for sig in _SIGNALS:
        signal.signal(sig, self._on_signal)

  @property
  def signalled(self):
    """Whether a signal came to this process (whatever became of it)."""
    return self._signalled.is_set()

  def _on_signal(self, signum, frame):
    self._signalled.set()
    self._restore_signals()  # A second signal acts as it would without us.
    if self._notify is not None:
      self._notify(signum, frame)

  def _restore_signals(self):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}

  def check(self, epoch, step, save):
    """Saves with `save()` and raises Preempted if the cluster stops at this point."""
    self._position = (epoch, step, save)
    if self._main and self._notify is None and self._signalled.is_set():
      save()  # TensorFlow's handler watches nothing here: no peer to agree with.
      self._exit()
    try:
      self._handler.save_checkpoint_if_preempted()
    except self._errors.AlreadyExistsError:
      # A peer finished training and closed its watch as the signal came:
      # past the last step, nothing is left to agree on.
      pass

  def _save(self):
    self._position[2]()

  def _exit(self):
    raise Preempted(*self._position[:2])

  def close(self):
    self._restore_signals()
    handler, self._handler = self._handler, None
    if handler is not None and (self._peers or not self._main):
      # Ends the threads that wait on the coordination service for a peer's
      # notice (and tells the peers theirs may end) or poll the watcher. The
      # handler's __del__ does this, but the threads hold the handler, so it
      # would never come, or come in one of them (which cannot join itself).
      handler.__del__()
