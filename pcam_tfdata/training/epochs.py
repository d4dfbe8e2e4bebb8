"""The epochs of a run: restore, train, validate, decide, back up; then the exact final evaluation.

What Keras' `fit` does with EarlyStopping, ReduceLROnPlateau,
ModelCheckpoint(save_best_only) and BackupAndRestore, as one small object
over the compiled step of `loop.make_train_fn`, under any strategy. Every
file a later step trusts is written whole or not at all (`rundir`).
"""

import hashlib
import json
import time

import tensorflow as tf

from pcam_tfdata import fs
from pcam_tfdata import rundir
from pcam_tfdata.training import backup as backup_lib
from pcam_tfdata.training import config as config_lib
from pcam_tfdata.training import distribute
from pcam_tfdata.training import evaluate
from pcam_tfdata.training import loop
from pcam_tfdata.training import models
from pcam_tfdata.training import preemption
from pcam_tfdata.training import resume
from pcam_tfdata.training import schedules
from pcam_tfdata import progress
from pcam_tfdata.training import verify

HISTORY_FIELDS = ('epoch', 'train_loss', 'train_accuracy', 'val_loss', 'val_accuracy',
                  'val_auc', 'learning_rate', 'seconds', 'images_per_second')


class EpochLoop:
  """The epochs of one run and what they leave in `config.model_dir`.

  Use in order: `restore()`, `start(datasets)`, `train(datasets)`, then (on
  the chief) `final_evaluation(...)`.
  """

  def __init__(self, config, records, setup, model, optimizer, steps, on_epoch_end=None):
    self.config, self.records, self.setup = config, records, setup
    self.on_epoch_end = on_epoch_end
    self.model, self.optimizer, self.steps = model, optimizer, steps
    self.model_dir = config.model_dir
    fs.makedirs(self.model_dir)
    self.train_steps = loop.make_train_fn(model, optimizer, setup.strategy, config.batch_size,
                                          jit_compile=setup.jit_compile,
                                          label_smoothing=config.label_smoothing)
    self.predict_fn = evaluate.make_predict_fn(model)
    self.from_chief = distribute.make_from_chief(setup.strategy)
    self.backup = backup_lib.Backup(self.model_dir, model, optimizer, setup.chief,
                                    setup.task_id)
    self.run_settings = resume.settings(config, records, setup)
    self.state = loop.CallbackState()
    self.last_epoch = 0
    # Restored from a mid-epoch backup: steps of epoch last_epoch + 1 already
    # trained, and their summed loss and correct predictions.
    self.first_step = 0
    self.partial = (0.0, 0.0)
    self.learning_rate = config.learning_rate
    self.best_weights = None  # The best epoch's weights, while this process has them.
    self._iterator = None

  def _path(self, name):
    return fs.join(self.model_dir, name)

  def _reading(self):
    # Every read of the records goes through this: TensorFlow's errors name
    # no shard. (Only those: a damaged checkpoint is not the records' fault.)
    return verify.reading(self.records)

  def restore(self):
    """BackupAndRestore: the last finished epoch's weights, optimizer and loop state, if any.

    First checked against this run's settings (`resume.check`); with
    --restart, the backup is discarded instead.
    """
    if self.config.restart:
      if self.setup.chief and self.backup.saved_state() is not None:
        print(f'--restart: discarding the backup in {self.backup.path}; training from scratch')
      self.backup.remove()  # Each worker its own; no worker reads the chief's.
      if self.setup.chief:  # The old run's curves too (history and model go at start).
        fs.rmtree(self._path('tensorboard'))
    else:
      saved = self.backup.saved_state()
      resume.check(saved and saved.get('run'), self.run_settings, self.backup.path,
                   log=print if self.setup.chief else lambda _: None,
                   trained=resume.epochs_begun(saved))
      self.last_epoch, saved = self.backup.restore()
      if saved:
        self.state = loop.CallbackState(**saved['callbacks'])
        self.learning_rate = saved['learning_rate']
        self.first_step = saved.get('step', 0)
        self.partial = tuple(saved.get('partial', (0.0, 0.0)))
    schedules.set_plateau_rate(self.optimizer, self.learning_rate)

  def start(self, datasets):
    """Builds the training input of the remaining epochs (reading the cache), then the files."""
    if self.last_epoch < self.config.epochs and not (self.state.stopped_early or
                                                     self.state.pruned):
      with self._reading():  # The cache is read here.
        # One iterator for the whole run: the local pipeline yields the
        # remaining epochs one after the other (and prefetches across their
        # boundaries); the service stream is endless and shared.
        self._iterator = iter(self._train_input(datasets['train']))
    self._tidy_files()

  def _train_input(self, train_fn):
    first_epoch = self.last_epoch + 1
    # Each pipeline serves its replicas' share of every step, and no more: a
    # batch left over would open the next epoch, and a resumed run, which
    # starts that epoch afresh, would not line up.
    per_step = self.setup.replicas // self.setup.pipelines  # Batches of a pipeline per step.
    per_epoch, first_batch = self.steps * per_step, self.first_step * per_step
    strategy = self.setup.strategy
    if self.setup.replicas == self.setup.pipelines:
      # One replica per input pipeline (the default strategy, or one device
      # per worker): the worker's own dataset feeds `strategy.run` directly.
      # A distributed iterator adds nothing here, and on a 2-core host it
      # kept the main thread busy beside TF's compute threads: every step
      # 1.8x slower under MultiWorkerMirroredStrategy (BUILD.md, "Several hosts").
      return train_fn(distribute.input_context(strategy), first_epoch, per_epoch, first_batch)
    return strategy.distribute_datasets_from_function(
        lambda context: train_fn(context, first_epoch, per_epoch, first_batch))

  def _tidy_files(self):
    """Leaves the model directory as the restored state: no newer rows, models or metrics."""
    if self.setup.chief:
      # Written again at the end; until then the run is unfinished.
      fs.remove_if_there(self._path(rundir.METRICS_JSON))
      # model.keras in step with the restored state, whenever the kill came.
      rundir.settle_best(self.model_dir, self.last_epoch, self.state.best_epoch)
    backup_dir = self._path(rundir.BACKUP_DIR)
    if self.first_step:
      print(f'resuming epoch {self.last_epoch + 1} at step {self.first_step} from {backup_dir}')
    elif self.last_epoch >= self.config.epochs:
      print(f'the run in {self.model_dir} has finished (all {self.last_epoch} epochs): '
            'evaluating its best model again; a larger --epochs trains on, --restart '
            'trains afresh')
    elif self.last_epoch and self.state.pruned:
      print(f'the run in {self.model_dir} was pruned after epoch {self.last_epoch}: '
            '--restart trains afresh')
    elif self.last_epoch and self.state.stopped_early:
      print(f'the run in {self.model_dir} has finished (early stopping after epoch '
            f'{self.last_epoch}): evaluating its best model again; --restart trains afresh')
    elif self.last_epoch:
      print(f'resuming after epoch {self.last_epoch} from {backup_dir}')
    if self.last_epoch or self.first_step:
      if self.setup.chief:  # Drops rows after the restored epoch (a kill in between).
        rows = rundir.read_history(self._path(rundir.HISTORY_CSV))
        rundir.write_history(self._path(rundir.HISTORY_CSV),
                             [r for r in rows if int(r['epoch']) <= self.last_epoch],
                             HISTORY_FIELDS)
    elif self.setup.chief:  # A fresh run: no rows or best model of an older one.
      fs.remove_if_there(self._path(rundir.HISTORY_CSV))
      fs.remove_if_there(self._path(rundir.MODEL_FILE))

  def train(self, datasets):
    """Every remaining epoch; then the final weights' digest (and the chief's best weights).

    Raises:
      preemption.Preempted: a signal stopped the run, after a backup.
    """
    writer = tf.summary.create_file_writer(self._path(
        'tensorboard' if self.setup.chief else f'.worker{self.setup.task_id}_tensorboard'))
    first = self.last_epoch + 1
    watch = preemption.Watch(self.setup.strategy)
    try:
      for epoch in range(first, self.config.epochs + 1):
        if self.state.stopped_early or self.state.pruned:  # Restored from a run that had stopped.
          break
        # --profile_steps traces steps of this process's first epoch only.
        self._epoch(epoch, datasets['val'], writer, watch, profile=epoch == first)
    finally:
      watch.close()
    if watch.signalled and self.setup.chief:
      # After the last point where the workers could agree to stop: the
      # chief stops before its final evaluation (a rerun evaluates again);
      # another worker is done anyway, and ends as usual, so that a launcher
      # or cluster manager does not take the chief's evaluation for a stop.
      raise preemption.Preempted(self.last_epoch, self.steps)
    if self._stopped_early():
      print(f'early stopping: val AUC best at epoch {self.state.best_epoch} '
            f'({self.state.best:.4f})')
    self.backup.remove_scratch()
    # Synchronous training keeps replicas identical; this line lets a user
    # (and the multi-worker test) check that across hosts.
    print(f'final weights sha256 {weights_digest(self.model)} (input pipeline '
          f'{distribute.worker_index(self.setup.strategy)})', flush=True)
    if not self.setup.chief:
      fs.rmtree(self._path(f'.worker{self.setup.task_id}_tensorboard'))

  def _stopped_early(self):
    """Whether early stopping ended the run before --epochs (not: ran out of patience at the last)."""
    return self.state.stopped_early and self.last_epoch < self.config.epochs

  def _epoch(self, epoch, val_dataset, writer, watch, profile):
    """Trains, validates, logs and backs up one epoch (and stops there if preempted)."""
    epoch_start = time.time()
    loss_sum, correct, images = self._train_epoch(epoch, watch, profile)
    row = self._end_epoch(epoch, loss_sum, correct, epoch_start, images, val_dataset)
    self._log(epoch, row, writer)
    # Asked before the backup, which so records a stop.
    if self.on_epoch_end is not None and self.on_epoch_end(epoch, dict(row)):
      self.state.pruned = True
      print(f'pruned after epoch {epoch}: val AUC {row["val_auc"]:.4f}', flush=True)
    self._save_backup(epoch)
    if self.setup.chief:  # Only now: a restart restores this epoch, and so this best model.
      rundir.commit_best(self.model_dir, epoch)
    self.last_epoch = epoch
    if epoch < self.config.epochs and not self.state.stopped_early and not self.state.pruned:
      watch.check(epoch + 1, 0, save=lambda: None)  # (Just backed up.)

  def _save_backup(self, epoch, step=0, partial=(0.0, 0.0)):
    """Backs up after `epoch` epochs and `step` steps of the next (with their running sums)."""
    self.backup.save(epoch, {'callbacks': vars(self.state), 'learning_rate': self.learning_rate,
                             'run': self.run_settings, 'epoch': epoch, 'step': step,
                             'partial': list(partial)},
                     number=epoch * self.steps + step)

  def _chunk(self, done):
    """Steps of the next compiled call: up to --steps_per_execution, --backup_every_steps.

    Calls end on a grid fixed by the step number alone, so a run resumed at
    any backup makes the calls (and float sums) the uninterrupted run made.
    """
    every = (self.config.steps_per_execution, self.config.backup_every_steps or self.steps)
    return min(self.steps - done, *(k - done % k for k in every))

  def _train_epoch(self, epoch, watch, profile=False):
    """The epoch's steps, a few per compiled call: (summed loss, correct, images here)."""
    config, chief = self.config, self.setup.chief
    done, (loss_sum, correct) = self.first_step, self.partial  # From a mid-epoch backup.
    start, self.first_step, self.partial = done, 0, (0.0, 0.0)
    profile = profile and config.profile_steps and chief
    bar = progress.Progress(self.steps, f'epoch {epoch}/{config.epochs}',
                            images_per_step=config.batch_size, initial=done,
                            enabled=config.progress and chief)
    with bar:
      while done < self.steps:
        n = self._chunk(done)
        if profile and done <= config.profile_steps[0] < done + n:
          tf.profiler.experimental.start(self._path('tensorboard'))
        with self._reading():
          batch_loss, batch_correct = self.train_steps(self._iterator, tf.constant(n))
        if profile and done < config.profile_steps[1] <= done + n:
          tf.profiler.experimental.stop()
        loss_sum += float(batch_loss)
        correct += float(batch_correct)
        done += n
        bar.update(done, loss=loss_sum / (done * config.batch_size),
                   accuracy=correct / (done * config.batch_size))
        if done < self.steps:  # (At the epoch's end, its own backup comes after validation.)
          position = (done, (loss_sum, correct))
          if config.backup_every_steps and done % config.backup_every_steps == 0:
            self._save_backup(epoch - 1, *position)
          watch.check(epoch, done, save=lambda: self._save_backup(epoch - 1, *position))
    return loss_sum, correct, (done - start) * config.batch_size

  def _end_epoch(self, epoch, loss_sum, correct, epoch_start, images, val_dataset):
    """Validation and the callbacks' decisions; returns the epoch's history row."""
    train_seconds = time.time() - epoch_start
    with self._reading():
      probs, labels, _ = evaluate.predict(self.predict_fn, val_dataset)
    # Early stopping, LR reduction and the best epoch must be decided alike
    # on every worker: all take the chief's figures.
    val = self.from_chief(evaluate.binary_metrics(labels, probs))
    improved, new_lr = self.state.update(
        epoch, val['auc'], early_stopping_patience=self.config.early_stopping_patience,
        reduce_lr_patience=self.config.reduce_lr_patience, lr=self.learning_rate)
    if self.config.lr_schedule != 'plateau':  # The schedule alone sets the rate.
      new_lr = self.learning_rate
    seen = self.steps * self.config.batch_size
    row = {'epoch': epoch, 'train_loss': loss_sum / seen, 'train_accuracy': correct / seen,
           'val_loss': val['loss'], 'val_accuracy': val['accuracy'], 'val_auc': val['auc'],
           'learning_rate': schedules.last_rate(self.optimizer, self.learning_rate),
           'seconds': round(time.time() - epoch_start, 3),
           'images_per_second': round(images / train_seconds, 1)}  # (Trained here.)
    if improved:
      self.best_weights = self.model.get_weights()
      if self.setup.chief:  # ModelCheckpoint(save_best_only=True), committed with the backup.
        self.model.save(rundir.pending_best(self.model_dir, epoch))
    if new_lr != self.learning_rate:
      print(f'epoch {epoch}: val AUC did not improve for {self.config.reduce_lr_patience} '
            f'epochs; learning rate {self.learning_rate:g} -> {new_lr:g}')
      self.learning_rate = new_lr
      schedules.set_plateau_rate(self.optimizer, new_lr)
    return row

  def _log(self, epoch, row, writer):
    """The epoch's row: history.csv (chief), TensorBoard, and one line on stdout."""
    if self.setup.chief:
      path = self._path(rundir.HISTORY_CSV)
      rundir.write_history(path, rundir.read_history(path) + [row], HISTORY_FIELDS)
    with writer.as_default(step=epoch):
      for key, value in row.items():
        if key != 'epoch':
          tf.summary.scalar(key, value)
    writer.flush()
    print(' '.join(f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}'
                   for k, v in row.items()), flush=True)

  def final_evaluation(self, datasets, seconds):
    """The best epoch's weights, evaluated exactly on both splits; plots and metrics.json.

    A pruned run skips the evaluation: its metrics.json holds its best
    epoch's validation (exact already) and `"pruned": true`.

    Returns:
      The metrics dict written to metrics.json.
    """
    if self.state.pruned:
      return self._pruned_metrics(seconds)
    # EarlyStopping(restore_best_weights=True): the best epoch's weights, kept
    # in memory, or (after a resume) from the best checkpoint on disk.
    if self.best_weights is not None:
      self.model.set_weights(self.best_weights)
    elif fs.exists(self._path(rundir.MODEL_FILE)):
      models.load_weights(self.model, self._path(rundir.MODEL_FILE))
    results = {}
    with self._reading():
      for split, dataset in (('train', datasets['train_eval']), ('val', datasets['val'])):
        bar = progress.Progress(int(dataset.cardinality()), f'evaluating {split}',
                                images_per_step=self.config.eval_batch_size,
                                enabled=self.config.progress)
        with bar:
          probs, labels, _ = evaluate.predict(self.predict_fn, dataset, bar)
        results.update({f'{split}_{k}': v
                        for k, v in evaluate.binary_metrics(labels, probs).items()})
    title = f'{self.config.model}, val split'
    evaluate.plot_confusion_matrix(labels, probs, self._path('confusion_matrix.png'), title)
    evaluate.plot_roc_curve(labels, probs, self._path('roc_curve.png'), title)
    evaluate.plot_training_curves(self._path(rundir.HISTORY_CSV),
                                  self._path('training_curves.png'), self.config.model)
    results.update(self._summary(seconds))
    rundir.write_atomic(self._path(rundir.METRICS_JSON), json.dumps(results, indent=1) + '\n')
    return results

  def _pruned_metrics(self, seconds):
    rows = rundir.read_history(self._path(rundir.HISTORY_CSV))
    best = next((r for r in rows if int(r['epoch']) == self.state.best_epoch), None)
    results = {f'val_{k}': float(best[f'val_{k}']) for k in ('accuracy', 'auc', 'loss')} if best else {}
    evaluate.plot_training_curves(self._path(rundir.HISTORY_CSV),
                                  self._path('training_curves.png'), self.config.model)
    results.update(self._summary(seconds), pruned=True)
    rundir.write_atomic(self._path(rundir.METRICS_JSON), json.dumps(results, indent=1) + '\n')
    return results

  def _summary(self, seconds):
    """What metrics.json says about the run beside the figures."""
    config, setup = self.config, self.setup
    return {
        'model': config.model,
        'weights': config.weights,
        'params': int(self.model.count_params()),
        'best_epoch': self.state.best_epoch,
        'epochs_run': self.last_epoch,
        'stopped_early': self._stopped_early(),
        'strategy': distribute.strategy_name(setup.strategy),
        'num_replicas_in_sync': setup.replicas,
        'precision_policy': setup.policy,
        'global_batch_size': config.batch_size,
        'learning_rate': config.learning_rate,
        'lr_schedule': config.lr_schedule,
        'warmup_epochs': config.warmup_epochs,
        'dropout': (config.dropout if config.dropout is not None
                    else config_lib.SEED_DROPOUT.get(config.model, 0.0)),
        'weight_decay': config.weight_decay,
        'label_smoothing': config.label_smoothing,
        'sync_batch_norm': any(getattr(l, 'synchronized', False)
                               for l in models.sublayers(self.model)),
        'augment': bool(config.augment),
        'augment_on': ('device' if setup.dihedral_on_device else 'host'
                       if config.augment else 'off'),
        'stain_jitter': config.stain_jitter,
        'stain_jitter_on': ('device' if setup.stain_on_device else 'host'
                            if config.stain_jitter else 'off'),
        'records_dir': fs.abspath(self.records.path),
        'seconds': round(seconds, 1),
    }


def weights_digest(model):
  """The first 16 hex digits of the SHA-256 of every weight's bytes, in order."""
  digest = hashlib.sha256()
  for weights in model.get_weights():
    digest.update(weights.tobytes())
  return digest.hexdigest()[:16]
