"""Training and prediction as calls: what `python -m pcam_tfdata.train` and `.predict` do.

    import pcam_tfdata as pt
    metrics = pt.train('records/demo', 'runs/nb', model='batchnorm', epochs=5, seed=0)
    ids, probs = pt.predict('runs/nb', 'records/demo')

The keyword arguments are the commands' flags, with the same defaults and
checks; TensorFlow is imported on the first call, not before.
"""

import dataclasses

from pcam_tfdata import records as records_lib
from pcam_tfdata.training import config as config_lib

_OPTIONS = tuple(f.name for f in dataclasses.fields(config_lib.Config)
                 if f.name not in ('records_dir', 'model_dir'))


def train(records_dir, model_dir, *, strategy=None, on_epoch_end=None, **options):
  """Trains, evaluates exactly and writes a run folder, as `python -m pcam_tfdata.train`.

  The run folder is the command's: model.keras (the best epoch's weights),
  metrics.json, history.csv, plots, TensorBoard logs and a backup a rerun
  resumes from (an interrupted call, rerun the same way, continues from its
  last backup; a finished one is evaluated again, not trained again, unless
  `epochs` grows).

  Example:

    import pcam_tfdata as pt
    metrics = pt.train('records/demo', 'runs/nb', model='batchnorm', epochs=5,
                       augment=True, seed=0)
    metrics['val_auc']

  Args:
    records_dir: a records folder (or a `Records`).
    model_dir: the run folder.
    strategy: a tf.distribute strategy to train under (e.g. a
      `tf.distribute.MirroredStrategy()` made in the notebook); None builds
      one as the `strategy` option says.
    on_epoch_end: fn(epoch, row) called after each epoch's validation, with
      its history.csv row (a dict: val_auc, val_loss, ...); a true result
      stops the run there, as pruned (a search's pruner: pcam_tfdata.tune):
      metrics.json then holds the best epoch's validation and
      "pruned": true, and a rerun does not train on. Called on every
      worker with the same row; it must decide alike on each.
    **options: the command's flags as keyword arguments, with its defaults:
      model='baseline', weights='none', epochs=10, batch_size=64 (global),
      learning_rate=1e-3, dropout=None (the seed's), weight_decay=0.0,
      label_smoothing=0.0, lr_schedule='plateau', warmup_epochs=0.0,
      mixed_precision='auto', strategy='auto' (as a name, when no
      `strategy` object is given), num_cpu_devices=1, sync_batch_norm='auto',
      jit_compile='auto', augment=False, augment_on='auto', stain_jitter=0.0,
      stain_jitter_on='auto', augment_cache_gib=4.0, seed=None,
      steps_per_execution=1, steps_per_epoch=0, backup_every_steps=0, early_stopping_patience=3,
      reduce_lr_patience=2,
      profile_steps=None (a (start, stop) pair), eval_batch_size=512,
      data_service_address=None, progress=True, restart=False. A `seed` also turns on
      TensorFlow's op determinism for the rest of the process, as the
      bit-exact rerun needs.

  Returns:
    The metrics dict written to metrics.json (on the chief; {} on other
    workers).

  Raises:
    TypeError: an unknown option. ValueError: a bad value (the message names
    its flag), or records that cannot be read (schema.ManifestError).
    preemption.Preempted: an interrupt (the kernel's) or SIGTERM while it
      trained; a backup was saved there, and the same call resumes.
  """
  from pcam_tfdata.training import trainer  # pylint: disable=g-import-not-at-top
  if isinstance(strategy, str):  # The flag's name for it, as the command takes it.
    options['strategy'], strategy = strategy, None
  unknown = sorted(set(options) - set(_OPTIONS))
  if unknown:
    raise TypeError(f'pcam_tfdata.train: unknown option {unknown[0]!r}; the options are '
                    f'{", ".join(_OPTIONS)}')
  if isinstance(options.get('profile_steps'), str):  # 'START,STOP', as the flag.
    options['profile_steps'] = tuple(int(x) for x in options['profile_steps'].split(','))
  config = config_lib.Config(records_dir=records_dir, model_dir=model_dir, **options)
  config_lib.check_config(config)
  config.records_dir = records_lib.Records.of(config.records_dir)
  return trainer.train_and_evaluate(config, strategy, on_epoch_end=on_epoch_end)


def predict(model_dir, records_dir, split='test', *, tta=False, batch_size=128,
            with_labels=False, progress=True):
  """Probabilities of class 1 for every example of a split, as `python -m pcam_tfdata.predict`.

  Example (write the Kaggle submission with `pt.write_submission`):

    import pcam_tfdata as pt
    ids, probs = pt.predict(['runs/fold0', 'runs/fold1'], 'records/demo', tta=True)
    pt.write_submission(ids, probs, 'submission.csv',
                        'records/demo_kaggle/sample_submission.csv')

  Args:
    model_dir: a finished run folder (holds model.keras), or a list of them:
      the mean of their probabilities (a fold ensemble).
    records_dir: a records folder (or a `Records`).
    split: 'test' (the default), 'val' or 'train'.
    tta: average each model over the 8 flips and rotations of each patch.
    batch_size: images per forward pass (times 8 with `tta`).
    with_labels: also return the split's labels (-1 for Kaggle's unlabelled
      test split).
    progress: a progress bar over the batches.

  Returns:
    (ids, probabilities), NumPy arrays in the records' order; plus the labels
    with `with_labels`.

  Raises:
    ValueError: naming the file: no such model or records, a model trained
      on another image shape, a shard that fails its checks.
  """
  from pcam_tfdata.training import submission  # pylint: disable=g-import-not-at-top
  model_dirs = [model_dir] if isinstance(model_dir, str) or not hasattr(
      model_dir, '__iter__') else list(model_dir)
  if not model_dirs:
    raise ValueError('pcam_tfdata.predict: no model_dir given')
  if batch_size < 1:
    raise ValueError(f'--batch_size={batch_size}: must be >= 1')
  records = records_lib.Records.of(records_dir)
  models = submission.load_models([str(d) for d in model_dirs], records.image_shape,
                                  records.path)
  ids, probs, labels = submission.predict_split(models, records, split, batch_size, tta,
                                                show_progress=progress)
  return (ids, probs, labels) if with_labels else (ids, probs)
