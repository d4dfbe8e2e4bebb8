"""What a backup must match to be resumed: the settings that decide a run's batches and steps.

A backup records them; a restart whose command differs in any is refused
with one line naming each (before anything is restored or written), since
resuming would silently mix two runs (two folds in one --model_dir, say).
`--epochs` may grow (also past the end of a finished run, whose backup
stays): each epoch's batches derive from (seed, epoch) alone; it may not
fall below the epochs already trained. In the global input order
(`pipeline.make_dataset`) the number of replicas, workers and GPUs may
change too: the global batches are the same on any of them.
"""

from pcam_tfdata.training import config as config_lib

# Each checked setting, and how the command line names it.
_NAMES = {
    'records': '--records_dir',
    'model': '--model',
    'weights': '--weights',
    'batch_size': '--batch_size',
    'steps_per_epoch': '--steps_per_epoch',
    'learning_rate': '--learning_rate',
    'dropout': '--dropout',
    'weight_decay': '--weight_decay',
    'label_smoothing': '--label_smoothing',
    'lr_schedule': '--lr_schedule',
    'warmup_epochs': '--warmup_epochs',
    'seed': '--seed',
    'augment': '--augment',
    'stain_jitter': '--stain_jitter',
    'stain_jitter_on': '--stain_jitter_on',
    'precision': 'the precision policy (--mixed_precision)',
    'sync_batch_norm': '--sync_batch_norm',
    'input_order': 'the input order (--input_order)',
    'replicas': 'the replicas in sync (--strategy, --num_cpu_devices, the workers)',
    'input_pipelines': 'the input pipelines (the workers)',
}
# What may differ on a resume in the global input order: the batches are the same.
_TOPOLOGY = ('replicas', 'input_pipelines')


def settings(config, records, setup):
  """This run's checked settings (and --epochs), as the backup records them."""
  return {
      'records': {'path': records.path, 'fingerprint': records.manifest.get('fingerprint')},
      'model': config.model, 'weights': config.weights, 'batch_size': config.batch_size,
      'steps_per_epoch': config.steps_per_epoch,  # (Where each epoch ends.)
      'learning_rate': config.learning_rate, 'seed': config.seed,
      'dropout': config.dropout, 'weight_decay': config.weight_decay,
      'label_smoothing': config.label_smoothing, 'lr_schedule': config.lr_schedule,
      'warmup_epochs': config.warmup_epochs,
      'augment': bool(config.augment),  # (True and 'dihedral' ask for the same.)
      'stain_jitter': config.stain_jitter,
      # (Where the stain jitter runs can round a pixel differently on a GPU;
      # where --augment_on runs the dihedral maps cannot: those only move
      # pixels, so it is free to change on resume and not recorded.)
      'stain_jitter_on': 'device' if setup.stain_on_device else 'host',
      'precision': setup.policy,
      # Only where there is BatchNorm to synchronize.
      'sync_batch_norm': (setup.sync_batch_norm if config.model in config_lib.BATCH_NORM_MODELS
                          else None),
      'input_order': setup.order,
      'replicas': setup.replicas, 'input_pipelines': setup.pipelines,
      'epochs': config.epochs,
  }


def epochs_begun(state):
  """The epochs a backup's loop state has trained, one stopped in included (None: not recorded)."""
  if not state or state.get('epoch') is None:
    return None
  return state['epoch'] + (1 if state.get('step') else 0)


def check(saved, current, backup_path, log=print, trained=None):
  """Raises ValueError naming every setting in which `current` differs from the backup's.

  Args:
    saved: the backup's recorded settings; None for a backup made before
      they were recorded (resumed unchecked).
    current: `settings` of this run.
    backup_path: the backup folder, for the message.
    log: where the note on a changed --epochs goes.
    trained: `epochs_begun` of the backup's state.
  """
  if saved is None:
    return
  differ = []
  spanned = saved.get('lr_schedule') in ('cosine', 'onecycle')
  if spanned and saved.get('epochs') not in (None, current['epochs']):
    # The curve is drawn over the run's epochs: more of them would bend it mid-run.
    differ.append(f'--epochs: {saved.get("epochs")} then, {current["epochs"]} now '
                  f'(--lr_schedule={saved["lr_schedule"]} spans the epochs the run began with)')
  elif trained is not None and current['epochs'] < trained:
    differ.append(f'--epochs: {saved.get("epochs")} then, {current["epochs"]} now, fewer than '
                  f'the {trained} trained')
  then_order = _order(saved)
  free = then_order == current['input_order'] == 'global'  # The topology may change.
  for key, name in _NAMES.items():
    then, now = saved.get(key), current[key]
    if key == 'records':  # The same records, wherever the folder now is.
      if then and then['fingerprint'] != now['fingerprint']:
        differ.append(f'{name}: {then["path"]} then, {now["path"]} (other records) now')
    elif key == 'input_order':
      if then_order is not None and then_order != now:
        # (A backup from before the order was recorded, of several pipelines: their own shards.)
        hint = (f'; add --input_order={then_order} to resume it' if 'input_order' not in saved
                else '')
        differ.append(f'{name}: {then_order} then, {now} now{hint}')
    elif key == 'sync_batch_norm' and key in saved:
      # Synchronized over several replicas or one replica alone: the global batch's moments.
      moments = _moments(saved), _moments(current)
      if None in moments and moments[0] != moments[1]:  # (Another model: named there.)
        differ.append(f'{name}: {then} then, {now} now')
      elif moments[0] != moments[1]:
        differ.append(f'BatchNorm\'s moments ({name}): {_moments_said(saved)} then, '
                      f'{_moments_said(current)} now')
    elif key in _TOPOLOGY and free:
      continue
    elif key in saved and then != now:
      differ.append(f'{name}: {then} then, {now} now')
  if differ:
    raise ValueError(f'{backup_path}: the backup is of a run with other settings ('
                     f'{"; ".join(differ)}); rerun the command it was started with to resume, '
                     'or add --restart to train from scratch')
  if 'input_order' not in saved and (saved.get('replicas') or 1) > 1:
    # Before issue 33 each replica drew its own dropout mask (its seed folded with its id).
    log('the backup predates dropout masks drawn for the global batch: from here on this '
        'run\'s masks differ from those an uninterrupted run would have drawn (alike in '
        'distribution)')
  before, after = _topology(saved), _topology(current)
  if free and None not in (before, after) and before != after:
    log(f'resuming on {after} (the run began on {before}): the same batches; float sums '
        'may round differently')
  if saved.get('epochs') not in (None, current['epochs']):
    log(f'continuing with --epochs={current["epochs"]} (the run was started with '
        f'--epochs={saved["epochs"]})')


def _order(saved):
  """The backup's input order (None: not recorded, nor its pipelines).

  Before it was recorded, one pipeline's order was the global one and
  several pipelines' their own shards'.
  """
  if 'input_order' in saved:
    return saved['input_order']
  if 'input_pipelines' not in saved:
    return None
  return 'global' if saved['input_pipelines'] == 1 else 'per_pipeline'


def _moments(settings):
  """Whose moments BatchNorm normalizes with: 'global' (synchronized or one replica), 'replica'."""
  sync = settings.get('sync_batch_norm')
  if sync is None:  # No BatchNorm.
    return None
  return 'global' if sync or settings.get('replicas', 1) == 1 else 'replica'


def _moments_said(settings):
  """`_moments` in words, with the replicas."""
  replicas = settings.get('replicas', 1)
  if _moments(settings) == 'replica':
    return f'each of {replicas} replicas\' own (not synchronized)'
  return 'the global batch\'s' + (f', synchronized over {replicas} replicas' if replicas != 1
                                  else '')


def _topology(settings):
  """'2 workers', '1 worker with 4 replicas': where a run trains (None: not recorded)."""
  workers, replicas = settings.get('input_pipelines'), settings.get('replicas')
  if workers is None or replicas is None:
    return None
  where = f'{workers} worker{"s" if workers != 1 else ""}'
  if replicas != workers:
    where += f' with {replicas} replicas'
  return where
