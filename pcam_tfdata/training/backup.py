"""BackupAndRestore: everything a killed run needs to go on as if it had not stopped.

After every epoch (and every --backup_every_steps steps, and at a
preemption) each worker saves the model, the optimizer, the dropout layers'
random state, the epoch number and the loop's own state (callbacks, learning
rate, the steps done into the next epoch and their running sums); a
restarted run restores the chief's copy on every worker. The last backup
stays after the run ends, so that a larger --epochs continues the run and a
different command is refused rather than mixed in.
"""

import json

import tensorflow as tf

from pcam_tfdata import fs
from pcam_tfdata import rundir


class Backup:
  """BackupAndRestore: model, optimizer, random and loop state after every epoch.

  Every worker saves (MultiWorkerMirroredStrategy needs all of them in the
  save); only the chief's copy is kept in `model_dir/backup`, the others go
  to scratch folders. A restarted run restores the chief's copy.
  """

  def __init__(self, model_dir, model, optimizer, is_chief, task_id=0):
    self._chief_dir = fs.join(model_dir, rundir.BACKUP_DIR)
    self._dir = self._chief_dir if is_chief else fs.join(
        model_dir, f'.worker{task_id}_backup')
    self._epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
    self._state = tf.Variable('', dtype=tf.string, trainable=False)
    # Keras keeps the dropout layers' random state (SeedGenerator) out of the
    # model's checkpointed weights; without it a resumed run would draw
    # epoch 1's dropout masks again.
    weights = {id(w) for w in model.weights}
    random_state = [v.value for v in model.variables if id(v) not in weights]
    self._checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, rng=random_state,
                                           epoch=self._epoch, state=self._state)
    self._manager = tf.train.CheckpointManager(self._checkpoint, self._dir, max_to_keep=1)

  def restore(self):
    """Returns (last finished epoch, loop state dict) or (0, None) to start anew."""
    latest = tf.train.latest_checkpoint(self._chief_dir)
    if latest is None:
      return 0, None
    try:
      self._checkpoint.restore(latest).assert_existing_objects_matched()
    except (tf.errors.OpError, AssertionError, ValueError) as e:
      detail = fs.error_line(e).split(' [[')[0]
      raise ValueError(f'{latest}: the backup of an interrupted run cannot be restored '
                       f'({detail}); delete {self._chief_dir} to start the run over') from None
    return int(self._epoch.numpy()), json.loads(self._state.numpy().decode())

  @property
  def path(self):
    return self._chief_dir

  def saved_state(self):
    """The last backup's loop state, read alone (nothing restored), or None without one.

    So that a restart can be checked against the run it would resume before
    anything is restored or written. A state that cannot be read is left
    for `restore` to name.
    """
    latest = tf.train.latest_checkpoint(self._chief_dir)
    if latest is None:
      return None
    try:
      return json.loads(tf.train.load_variable(latest, 'state/.ATTRIBUTES/VARIABLE_VALUE'))
    except (tf.errors.OpError, ValueError):
      return None

  def save(self, epoch, state, number):
    """Backs up after `epoch` finished epochs; `number` (steps trained in all) names the file."""
    self._epoch.assign(epoch)
    self._state.assign(json.dumps(state))
    self._manager.save(checkpoint_number=number)

  def remove_scratch(self):
    if self._dir != self._chief_dir and tf.io.gfile.exists(self._dir):
      tf.io.gfile.rmtree(self._dir)

  def remove(self):
    """Deletes this worker's backup (--restart)."""
    if tf.io.gfile.exists(self._dir):
      tf.io.gfile.rmtree(self._dir)
