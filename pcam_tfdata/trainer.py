"""train_and_evaluate: precision, strategy, data, the loop, exact evaluation, outputs."""

import hashlib
import json
import os
import shutil
import time

import keras
import tensorflow as tf
from tensorflow.python.framework import config as tf_config  # pylint: disable=g-direct-tensorflow-import

from pcam_tfdata import distribute
from pcam_tfdata import evaluate
from pcam_tfdata import loop
from pcam_tfdata import models
from pcam_tfdata import pipeline
from pcam_tfdata import progress
from pcam_tfdata import rundir
from pcam_tfdata import schema
from pcam_tfdata import verify

_HISTORY_FIELDS = ('epoch', 'train_loss', 'train_accuracy', 'val_loss', 'val_accuracy',
                   'val_auc', 'learning_rate', 'seconds', 'images_per_second')


def stain_on_device(config):
  """Whether the training step applies the stain jitter (else the input pipeline).

  On the accelerator when there is one: per-pixel float arithmetic that the
  host's few cores would otherwise spend on every image. Not with the
  tf.data service, whose workers build whole batches.
  """
  if not config.stain_jitter or config.data_service_address:
    return False
  if config.stain_jitter_on == 'auto':
    return bool(tf.config.list_logical_devices('GPU') or tf.config.list_logical_devices('TPU'))
  return config.stain_jitter_on == 'device'


def _datasets(config, manifest, global_batch):
  """The training dataset function and the two evaluation datasets."""
  def train_fn(context, first_epoch, batches_per_epoch):
    batch_size = context.get_per_replica_batch_size(global_batch)
    if config.data_service_address:
      # Endless, so that every trainer (sharing the job) can take its steps.
      return pipeline.make_service_dataset(
          config.records_dir, 'train', config.data_service_address, batch_size=batch_size,
          augment=config.augment, seed=config.seed, repeat=True,
          stain_jitter=config.stain_jitter)
    # Every remaining epoch, each from (seed, epoch number): a resumed run
    # sees the batches the uninterrupted one would have.
    return pipeline.make_dataset(
        config.records_dir, 'train', batch_size=batch_size, training=True,
        augment=config.augment, stain_jitter=config.stain_jitter, seed=config.seed,
        input_context=context,
        first_epoch=first_epoch, num_epochs=config.epochs - first_epoch + 1,
        batches_per_epoch=batches_per_epoch,
        variant_budget=int(config.augment_cache_gib * 2**30),
        stain_params=stain_on_device(config))
  evaluation = lambda split, cache: pipeline.make_dataset(
      config.records_dir, split, batch_size=config.eval_batch_size, training=False,
      cache=cache, with_ids=True)
  if 'val' not in manifest['splits']:
    raise ValueError(f'{config.records_dir}: no val split to monitor')
  # The train split is evaluated once, at the end: streamed, not a second
  # copy beside the training cache.
  return {'train': train_fn, 'val': evaluation('val', True),
          'train_eval': evaluation('train', False)}


def _append_history(path, row):
  rundir.write_history(path, rundir.read_history(path) + [row], _HISTORY_FIELDS)


def _trim_history(path, last_epoch):
  """Drops rows after the restored epoch (a kill between the row and the backup)."""
  if os.path.exists(path):
    rows = [r for r in rundir.read_history(path) if int(r['epoch']) <= last_epoch]
    rundir.write_history(path, rows, _HISTORY_FIELDS)


def train_and_evaluate(config, strategy=None, datasets=None):
  """See train.run."""
  start = time.time()
  # Every read of the records goes through this: TF's errors name no shard.
  # (Only those: a damaged checkpoint is not the records' fault.)
  reading = lambda: verify.reading(config.records_dir)
  manifest = schema.load_manifest(config.records_dir)
  # Policy first, then the strategy (MultiWorkerMirroredStrategy must come
  # before any TF op), then the batch check, then the model in its scope (as
  # the Flax and TF Models examples do).
  policy = distribute.set_precision(config.mixed_precision)
  if strategy is None:
    distribute.split_cpu(config.num_cpu_devices)
    strategy = distribute.make_strategy(config.strategy)
  address = distribute.server_address(strategy)
  if address:
    print(f'TensorFlow gRPC server of this worker on {address}: it listens on every interface '
          'and is unauthenticated; keep the cluster on a private network (README, Security)',
          flush=True)
  if config.seed is not None:
    keras.utils.set_random_seed(config.seed)  # Same initial weights on every worker.
    if tf.config.list_physical_devices('GPU'):
      # Bit-exact reruns and resumes need deterministic GPU kernels (cuDNN,
      # atomics). Not on CPU hosts: their kernels are deterministic already
      # (the resume tests pass without it), and op determinism also makes
      # tf.data run the pipeline's maps one at a time, which halved its
      # throughput here (BUILD.md).
      tf.config.experimental.enable_op_determinism()
  replicas = strategy.num_replicas_in_sync
  if config.batch_size % replicas:
    raise ValueError(f'--batch_size={config.batch_size} is not divisible by the '
                     f'{replicas} replicas in sync')
  chief = distribute.is_chief(strategy)
  show_progress = config.progress and chief
  pipelines = distribute.num_workers(strategy)
  steps = pipeline.steps_per_epoch(manifest, 'train', config.batch_size // pipelines, pipelines)
  if steps < 1:
    raise ValueError(f'--batch_size={config.batch_size}: larger than the train split '
                     f'({manifest["splits"]["train"]["count"]} examples)')
  datasets = datasets or _datasets(config, manifest, config.batch_size)
  if pipelines > 1:
    context = distribute.input_context(strategy)
    print(f'input pipeline {context.input_pipeline_id} of {pipelines}: {steps} steps of '
          f'{config.batch_size // pipelines} per epoch', flush=True)
  sync_bn = distribute.resolve_sync_batch_norm(config.sync_batch_norm, replicas)
  jit = distribute.resolve_jit_compile(config.jit_compile, strategy)
  if jit and config.seed is not None and tf_config.is_op_determinism_enabled():
    # Measured: XLA has no deterministic MaxPool gradient, so with op
    # determinism on (what --seed needs on GPUs) the first step fails.
    raise ValueError(f'--jit_compile={config.jit_compile} with --seed on GPUs: XLA has no '
                     'deterministic form of these models\' max-pool gradient; drop one of the two')
  if jit and sync_bn and replicas > 1 and config.model == 'batchnorm':
    # Its cross-replica sums would sit inside the XLA function, which
    # tf.distribute cannot synchronize (a merge_call inside a tf.function).
    raise ValueError(f'--jit_compile={config.jit_compile} cannot compile synchronized '
                     f'BatchNorm over {replicas} replicas; use --jit_compile=off or '
                     '--sync_batch_norm=off')

  model_dir = config.model_dir
  os.makedirs(model_dir, exist_ok=True)
  with strategy.scope():
    model = models.build_model(config.model, tuple(manifest['image_shape']),
                               sync_batch_norm=sync_bn)
    optimizer = keras.optimizers.Adam(config.learning_rate)
    if policy == 'mixed_float16':
      optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
  train_steps = loop.make_train_fn(model, optimizer, strategy, config.batch_size,
                                   jit_compile=jit)
  predict_fn = evaluate.make_predict_fn(model)
  from_chief = distribute.make_from_chief(strategy)
  task_id = getattr(getattr(strategy, 'cluster_resolver', None), 'task_id', 0) or 0
  backup = loop.Backup(model_dir, model, optimizer, chief, task_id)

  last_epoch, saved = backup.restore()
  state = loop.CallbackState(**saved['callbacks']) if saved else loop.CallbackState()
  train_ds = None
  if last_epoch < config.epochs and not state.stopped_early:
    first_epoch = last_epoch + 1
    # Each pipeline serves its replicas' share of every step, and no more: a
    # batch left over would open the next epoch, and a resumed run, which
    # starts that epoch afresh, would not line up.
    per_epoch = steps * (replicas // pipelines)
    if replicas == pipelines:
      # One replica per input pipeline (the default strategy, or one device
      # per worker): the worker's own dataset feeds `strategy.run` directly.
      # A distributed iterator adds nothing here, and on a 2-core host it kept
      # the main thread busy beside TF's compute threads: every step 1.8x
      # slower under MultiWorkerMirroredStrategy (BUILD.md, "Several hosts").
      with reading():  # The cache is read here.
        train_ds = datasets['train'](distribute.input_context(strategy), first_epoch,
                                     per_epoch)
    else:
      with reading():
        train_ds = strategy.distribute_datasets_from_function(
            lambda context: datasets['train'](context, first_epoch, per_epoch))
  learning_rate = saved['learning_rate'] if saved else config.learning_rate
  optimizer.learning_rate.assign(learning_rate)
  history_path = os.path.join(model_dir, rundir.HISTORY_CSV)
  best_path = os.path.join(model_dir, rundir.MODEL_FILE)
  metrics_path = os.path.join(model_dir, rundir.METRICS_JSON)
  if chief and os.path.exists(metrics_path):
    os.remove(metrics_path)  # Written again at the end; until then the run is unfinished.
  if chief:  # model.keras in step with the restored state, whenever the kill came.
    rundir.settle_best(model_dir, last_epoch, state.best_epoch)
  if last_epoch:
    print(f'resuming after epoch {last_epoch} from {os.path.join(model_dir, rundir.BACKUP_DIR)}')
    if chief:
      _trim_history(history_path, last_epoch)
  elif chief:  # A fresh run: no rows or best model of an older one.
    for stale in (history_path, best_path):
      if os.path.exists(stale):
        os.remove(stale)
  writer = tf.summary.create_file_writer(
      os.path.join(model_dir, 'tensorboard') if chief else os.path.join(
          model_dir, f'.worker{task_id}_tensorboard'))
  best_weights = None

  finished = last_epoch
  # One iterator for the whole run: the local pipeline yields the remaining
  # epochs one after the other (and prefetches across their boundaries); the
  # service stream is endless and shared.
  iterator = iter(train_ds) if train_ds is not None else None
  for epoch in range(last_epoch + 1, config.epochs + 1):
    if state.stopped_early:  # Restored from a run that had stopped.
      break
    epoch_start = time.time()
    loss_sum = correct = 0.0
    done = 0
    bar = progress.Progress(steps, f'epoch {epoch}/{config.epochs}',
                            images_per_step=config.batch_size, enabled=show_progress)
    with bar:
      while done < steps:
        n = min(config.steps_per_execution, steps - done)
        profile = config.profile_steps and chief and epoch == last_epoch + 1
        if profile and done <= config.profile_steps[0] < done + n:
          tf.profiler.experimental.start(os.path.join(model_dir, 'tensorboard'))
        with reading():
          batch_loss, batch_correct = train_steps(iterator, tf.constant(n))
        if profile and done < config.profile_steps[1] <= done + n:
          tf.profiler.experimental.stop()
        loss_sum += float(batch_loss)
        correct += float(batch_correct)
        done += n
        bar.update(done, loss=loss_sum / (done * config.batch_size),
                   accuracy=correct / (done * config.batch_size))
    seen = steps * config.batch_size
    train_seconds = time.time() - epoch_start
    with reading():
      probs, labels, _ = evaluate.predict(predict_fn, datasets['val'])
    # Early stopping, LR reduction and the best epoch must be decided alike
    # on every worker: all take the chief's figures.
    val = from_chief(evaluate.binary_metrics(labels, probs))
    improved, new_lr = state.update(
        epoch, val['auc'], early_stopping_patience=config.early_stopping_patience,
        reduce_lr_patience=config.reduce_lr_patience, lr=learning_rate)
    row = {'epoch': epoch, 'train_loss': loss_sum / seen, 'train_accuracy': correct / seen,
           'val_loss': val['loss'], 'val_accuracy': val['accuracy'], 'val_auc': val['auc'],
           'learning_rate': learning_rate, 'seconds': round(time.time() - epoch_start, 3),
           'images_per_second': round(seen / train_seconds, 1)}
    if improved:
      best_weights = model.get_weights()
      if chief:  # ModelCheckpoint(save_best_only=True), committed with the backup below.
        model.save(rundir.pending_best(model_dir, epoch))
    if new_lr != learning_rate:
      print(f'epoch {epoch}: val AUC did not improve for {config.reduce_lr_patience} epochs; '
            f'learning rate {learning_rate:g} -> {new_lr:g}')
      learning_rate = new_lr
      optimizer.learning_rate.assign(learning_rate)
    if chief:
      _append_history(history_path, row)
    with writer.as_default(step=epoch):
      for key, value in row.items():
        if key != 'epoch':
          tf.summary.scalar(key, value)
    writer.flush()
    print(' '.join(f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}'
                   for k, v in row.items()), flush=True)
    backup.save(epoch, {'callbacks': vars(state), 'learning_rate': learning_rate})
    if chief:  # Only now: a restart restores this epoch, and so this best model.
      rundir.commit_best(model_dir, epoch)
    finished = epoch
  if state.stopped_early:
    print(f'early stopping: val AUC best at epoch {state.best_epoch} ({state.best:.4f})')

  backup.remove_scratch()
  # Synchronous training keeps replicas identical; this line lets a user (and
  # the multi-worker test) check that across hosts.
  print(f'final weights sha256 {_weights_digest(model)} (input pipeline '
        f'{distribute.worker_index(strategy)})', flush=True)
  if not chief:
    shutil.rmtree(os.path.join(model_dir, f'.worker{task_id}_tensorboard'), ignore_errors=True)
    return {}
  # EarlyStopping(restore_best_weights=True): the best epoch's weights, kept in
  # memory, or (after a resume) from the best checkpoint on disk.
  if best_weights is not None:
    model.set_weights(best_weights)
  elif os.path.exists(best_path):
    model.load_weights(best_path)
  with reading():
    metrics = _final_evaluation(config, model, predict_fn, datasets, state, strategy, policy,
                                time.time() - start, finished)
  # Only now: a run killed during the final evaluation resumes and redoes it.
  backup.remove()
  return metrics


def _weights_digest(model):
  digest = hashlib.sha256()
  for weights in model.get_weights():
    digest.update(weights.tobytes())
  return digest.hexdigest()[:16]


def _final_evaluation(config, model, predict_fn, datasets, state, strategy, policy, seconds,
                      epochs_run):
  results = {}
  for split in ('train', 'val'):
    dataset = datasets['train_eval' if split == 'train' else 'val']
    bar = progress.Progress(int(dataset.cardinality()), f'evaluating {split}',
                            images_per_step=config.eval_batch_size, enabled=config.progress)
    with bar:
      probs, labels, _ = evaluate.predict(predict_fn, dataset, bar)
    for key, value in evaluate.binary_metrics(labels, probs).items():
      results[f'{split}_{key}'] = value
  model_dir = config.model_dir
  title = f'{config.model}, val split'
  evaluate.plot_confusion_matrix(labels, probs, os.path.join(model_dir, 'confusion_matrix.png'),
                                 title)
  evaluate.plot_roc_curve(labels, probs, os.path.join(model_dir, 'roc_curve.png'), title)
  evaluate.plot_training_curves(os.path.join(model_dir, rundir.HISTORY_CSV),
                                os.path.join(model_dir, 'training_curves.png'), config.model)
  results.update({
      'model': config.model,
      'params': int(model.count_params()),
      'best_epoch': state.best_epoch,
      'epochs_run': epochs_run,
      'stopped_early': state.stopped_early,
      'strategy': distribute.strategy_name(strategy),
      'num_replicas_in_sync': strategy.num_replicas_in_sync,
      'precision_policy': policy,
      'global_batch_size': config.batch_size,
      'sync_batch_norm': any(getattr(l, 'synchronized', False) for l in model.layers),
      'augment': bool(config.augment),
      'stain_jitter': config.stain_jitter,
      'stain_jitter_on': ('device' if stain_on_device(config) else 'host'
                          if config.stain_jitter else 'off'),
      'records_dir': os.path.abspath(config.records_dir),
      'seconds': round(seconds, 1),
  })
  rundir.write_atomic(os.path.join(model_dir, rundir.METRICS_JSON),
                      json.dumps(results, indent=1) + '\n')
  return results
