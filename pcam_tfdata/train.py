r"""Trains one model (the seed's Baseline or BatchNorm CNN, ResNet50V2 or EfficientNetV2B0) on the records, on any strategy.

    python -m pcam_tfdata.train --flagfile=configs/demo.flags --model=batchnorm

--flagfile=configs/NAME.flags reads ./configs/NAME.flags, or where there is
none, the copy installed with the package (demo, baseline, batchnorm,
resnet50v2, efficientnetv2b0).

This file is kept short: flags become a `Config`, and `run(config)` does the
work. From Python, `pcam_tfdata.train(records_dir, model_dir, **flags)` is
the same run (`import pcam_tfdata.train` gives that function; this module is
`importlib.import_module('pcam_tfdata.train')`, or `from pcam_tfdata.train
import Config, run`).
"""

import json
import sys

from absl import flags
from absl import logging

from pcam_tfdata import cli
from pcam_tfdata import records as records_lib
from pcam_tfdata import rundir
from pcam_tfdata.training import config as config_lib
from pcam_tfdata.training import preemption

# The settings and their checks, as this module has always offered them.
Config = config_lib.Config
check_config = config_lib.check_config

_RECORDS_DIR = flags.DEFINE_string('records_dir', 'records/demo', 'Records folder.')
_MODEL_DIR = flags.DEFINE_string('model_dir', None, 'Where checkpoints, logs and results go.')
_MODEL = flags.DEFINE_enum(
    'model', 'baseline', config_lib.MODEL_NAMES,
    "Architecture: the seed's baseline or batchnorm CNN, or a Keras application without its "
    'top (resnet50v2, efficientnetv2b0; images of at least 32x32).')
_WEIGHTS = flags.DEFINE_enum(
    'weights', 'none', config_lib.WEIGHTS,
    "Initial weights of resnet50v2 or efficientnetv2b0: none (random) or imagenet (Keras' "
    'published weights, fetched once into ~/.keras/models).')
_EPOCHS = flags.DEFINE_integer('epochs', 10, 'Maximum epochs (early stopping may end sooner).')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 64, 'Global batch, over all replicas.')
_LEARNING_RATE = flags.DEFINE_float('learning_rate', 1e-3, 'Adam learning rate (the peak, '
                                     'with --lr_schedule=cosine or onecycle).')
_DROPOUT = flags.DEFINE_float(
    'dropout', None, 'Dropout before the output layer (default: the seed\'s, 0.2 for baseline '
    'and 0.5 for batchnorm; none for the applications).')
_WEIGHT_DECAY = flags.DEFINE_float(
    'weight_decay', 0.0, 'Decoupled weight decay: > 0 trains with AdamW instead of Adam.')
_LABEL_SMOOTHING = flags.DEFINE_float(
    'label_smoothing', 0.0, 'Training targets 0 and 1 become s/2 and 1 - s/2 (the val loss '
    'stays plain).')
_LR_SCHEDULE = flags.DEFINE_enum(
    'lr_schedule', 'plateau', config_lib.LR_SCHEDULES,
    'plateau: the seed\'s ReduceLROnPlateau (halved after --reduce_lr_patience epochs without '
    'a better val AUC); cosine: cosine decay to 0 over --epochs; onecycle: up from '
    '--learning_rate/25 to it over --warmup_epochs (0: 30 percent of the run), then cosine down.')
_WARMUP_EPOCHS = flags.DEFINE_float(
    'warmup_epochs', 0.0, 'Linear warm-up of the learning rate from 0 over this many epochs '
    '(fractions allowed), step by step.')
_MIXED_PRECISION = flags.DEFINE_enum(
    'mixed_precision', 'auto', ['auto', 'float16', 'bfloat16', 'off'],
    'auto: float16 with loss scaling on tensor-core GPUs, float32 on CPU hosts.')
_STRATEGY = flags.DEFINE_enum('strategy', 'auto', ['auto', 'default', 'mirrored', 'multi_worker'],
                              'tf.distribute strategy; auto picks from the hardware and TF_CONFIG.')
_NUM_CPU_DEVICES = flags.DEFINE_integer(
    'num_cpu_devices', 1, 'Split the CPU into this many logical devices (MirroredStrategy '
    'without GPUs).')
_SYNC_BATCH_NORM = flags.DEFINE_enum(
    'sync_batch_norm', 'auto', ['auto', 'on', 'off'],
    'BatchNorm statistics over the global batch; auto: on when more than one replica trains.')
_JIT_COMPILE = flags.DEFINE_enum(
    'jit_compile', 'auto', ['auto', 'on', 'off'],
    "XLA for the training step's forward and backward pass; auto: as Keras decides "
    '(on with one GPU, off on CPU hosts and under op determinism).')
_AUGMENT = flags.DEFINE_bool('augment', False, 'A random dihedral flip/rotation per image.')
_AUGMENT_ON = flags.DEFINE_enum(
    'augment_on', 'auto', ['auto', 'host', 'device'],
    'Where --augment\'s flips/rotations run: host (in the input pipeline) or device (in the '
    'training step, from the transform ids the pipeline draws; the host then only gathers, '
    'and never holds the 8 variants of the split); auto: device with a GPU or TPU, else '
    'host. Bit-identical images either way.')
_STAIN_JITTER = flags.DEFINE_float(
    'stain_jitter', 0.0, 'HED stain augmentation strength s in [0, 1): each image\'s '
    'haematoxylin, eosin and DAB scaled by U(1-s, 1+s) and shifted by U(-s, s), in '
    'skimage rgb2hed units (tissue spans about 0-0.1: 0.01 is visible, 0.05 strong); 0 off.')
_STAIN_JITTER_ON = flags.DEFINE_enum(
    'stain_jitter_on', 'auto', ['auto', 'host', 'device'],
    'Where the stain jitter runs: host (in the input pipeline) or device (in the training '
    'step, from draws the pipeline makes); auto: device with a GPU or TPU, else host. The '
    'same draws either way (a compiled step may round a pixel the other way).')
_AUGMENT_CACHE_GIB = flags.DEFINE_float(
    'augment_cache_gib', 4.0,
    'With --augment: memory (GiB, per input pipeline) the cached train split may take to '
    'hold all 8 flips/rotations of every image, so a batch costs one gather (8x the split: '
    '1.8 GiB for 80,000 patches at 32x32). Over it, each batch is transformed after its '
    'gather instead (the same batches, more host time). Building them holds the split once '
    'more for a moment (9x at peak). 0: never. Unused with --augment_on=device.')
_INPUT_ORDER = flags.DEFINE_enum(
    'input_order', 'auto', config_lib.INPUT_ORDERS,
    'With several workers: global, every worker holds the whole train split and takes its '
    'share of the same global batches, so a run resumes on another number of workers, GPUs '
    'or replicas with the same batches; per_pipeline, each worker holds and shuffles its own '
    'shards (1/N of the memory, batches that depend on the number of workers). auto: global '
    'while the split\'s images take at most a quarter of the smallest worker\'s memory.')
_SEED = flags.DEFINE_integer(
    'seed', None, 'Seed of weights, data order, augmentation and dropout: a rerun, or a '
    'resumed run, ends with bit-identical weights (on GPU hosts, with TF op determinism).')
_STEPS_PER_EXECUTION = flags.DEFINE_integer('steps_per_execution', 1,
                                            'Training steps per compiled call.')
_STEPS_PER_EPOCH = flags.DEFINE_integer(
    'steps_per_epoch', 0, 'Train at most N steps an epoch, as Keras fit\'s steps_per_epoch: a '
    'quick try of a large model or set (0: every whole batch of the train split).')
_BACKUP_EVERY_STEPS = flags.DEFINE_integer(
    'backup_every_steps', 0, 'Also back up every N steps within an epoch, so that a run killed '
    'mid-epoch resumes there (0: at epoch ends only).')
_EARLY_STOPPING_PATIENCE = flags.DEFINE_integer(
    'early_stopping_patience', 3, 'Epochs without a better val AUC before stopping.')
_REDUCE_LR_PATIENCE = flags.DEFINE_integer(
    'reduce_lr_patience', 2, 'Epochs without a better val AUC before halving the learning rate.')
_DATA_SERVICE_ADDRESS = flags.DEFINE_string(
    'data_service_address', None, 'grpc://host:port of a tf.data service dispatcher '
    '(python -m pcam_tfdata.data_service): read training batches through it.')
_PROFILE_STEPS = flags.DEFINE_string('profile_steps', None,
                                     'START,STOP: write a profiler trace of these steps.')
_PROGRESS = flags.DEFINE_bool('progress', True, 'Show progress within each epoch and '
                              'evaluation (a bar on a terminal, a line every 30 s in logs); '
                              '--noprogress for none.')
_RESTART = flags.DEFINE_bool(
    'restart', False, 'Discard the backup of an interrupted run in --model_dir and train from '
    'scratch. Without it a rerun resumes the backup, and refuses one made with other settings '
    '(naming each).')
_VERBOSE = flags.DEFINE_bool('verbose', False, "Show TensorFlow's C++ info and warning lines "
                             '(hidden unless TF_CPP_MIN_LOG_LEVEL says otherwise).')
PROGRAM = 'train'  # How its errors name it (also as __main__).


def run(config, strategy=None, datasets=None):
  """Trains, evaluates exactly and writes the results into `config.model_dir`.

  Args:
    config: a Config.
    strategy: a tf.distribute strategy to use instead of building one.
    datasets: optional {'train': fn(input_context, first_epoch,
      batches_per_epoch, first_batch) -> dataset of the epochs from
      first_epoch to config.epochs, one after the other, batches_per_epoch
      batches each (the first from its batch first_batch on: a run resumed
      mid-epoch), 'val': dataset, 'train_eval': dataset} replacing the record
      pipelines (eval datasets yield (images, labels, ids)).

  Returns:
    The metrics dict written to metrics.json (on the chief; {} elsewhere).

  Raises:
    ValueError: a bad setting, naming its flag; schema.ManifestError: no records.
    preemption.Preempted: SIGTERM or SIGINT stopped the run, after a backup
      (rerun to resume).
  """
  from pcam_tfdata.training import trainer  # pylint: disable=g-import-not-at-top
  check_config(config)
  return trainer.train_and_evaluate(config, strategy, datasets)


def _config_from_flags():
  profile = None
  if _PROFILE_STEPS.value:
    try:
      start, stop = (int(x) for x in _PROFILE_STEPS.value.split(','))
    except ValueError:
      raise ValueError(f'--profile_steps={_PROFILE_STEPS.value}: expected START,STOP') from None
    profile = (start, stop)
  if not _MODEL_DIR.value:
    raise ValueError('--model_dir is required')
  return Config(
      records_dir=_RECORDS_DIR.value, model_dir=_MODEL_DIR.value, model=_MODEL.value,
      weights=_WEIGHTS.value,
      epochs=_EPOCHS.value, batch_size=_BATCH_SIZE.value, learning_rate=_LEARNING_RATE.value,
      dropout=_DROPOUT.value, weight_decay=_WEIGHT_DECAY.value,
      label_smoothing=_LABEL_SMOOTHING.value, lr_schedule=_LR_SCHEDULE.value,
      warmup_epochs=_WARMUP_EPOCHS.value,
      mixed_precision=_MIXED_PRECISION.value, strategy=_STRATEGY.value,
      num_cpu_devices=_NUM_CPU_DEVICES.value, sync_batch_norm=_SYNC_BATCH_NORM.value,
      jit_compile=_JIT_COMPILE.value, augment=_AUGMENT.value, augment_on=_AUGMENT_ON.value,
      stain_jitter=_STAIN_JITTER.value, stain_jitter_on=_STAIN_JITTER_ON.value,
      augment_cache_gib=_AUGMENT_CACHE_GIB.value, input_order=_INPUT_ORDER.value,
      seed=_SEED.value,
      steps_per_execution=_STEPS_PER_EXECUTION.value, steps_per_epoch=_STEPS_PER_EPOCH.value,
      backup_every_steps=_BACKUP_EVERY_STEPS.value,
      early_stopping_patience=_EARLY_STOPPING_PATIENCE.value,
      reduce_lr_patience=_REDUCE_LR_PATIENCE.value, profile_steps=profile,
      data_service_address=_DATA_SERVICE_ADDRESS.value, progress=_PROGRESS.value,
      restart=_RESTART.value)


def main(argv):
  if len(argv) > 1:
    cli.fail(PROGRAM, f'unexpected arguments {" ".join(argv[1:])}')
  # Per-save INFO lines drown the per-epoch lines; --verbosity still overrides.
  if _VERBOSE.value:
    logging.set_verbosity(logging.INFO)
  elif not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  # Ctrl-C before training starts (or after it ends): one line, status 130.
  # Within training, SIGINT and SIGTERM are a preemption: a backup, then
  # one line and status preemption.EXIT_STATUS.
  with cli.stops_on_interrupt(PROGRAM, 'interrupted; rerun the same command to resume from '
                              'the last backup'):
    try:
      config = _config_from_flags()
      check_config(config)
      # A wrong folder fails before TensorFlow starts (but for a URL, which only
      # TensorFlow reads); the run reads no manifest again.
      cli.import_tensorflow_for((config.records_dir, config.model_dir), _VERBOSE.value)
      config.records_dir = records_lib.Records.open(config.records_dir)
      with cli.writes_to(PROGRAM, f'--model_dir={config.model_dir}'):
        rundir.check_writable(config.model_dir)  # (Also before TensorFlow.)
        cli.import_tensorflow(_VERBOSE.value)
        metrics = run(config)
    except preemption.Preempted as e:
      print(f'{PROGRAM}: {e}', file=sys.stderr, flush=True)
      sys.exit(preemption.EXIT_STATUS)
    except ValueError as e:  # schema.ManifestError is one.
      cli.fail(PROGRAM, e)
    except Exception as e:  # pylint: disable=broad-except
      lost = _lost_peer(e)
      if lost is None:
        raise
      cli.fail(PROGRAM, lost)
  if metrics:
    print(json.dumps(metrics, indent=1))


def _lost_peer(error):
  """One line for a lost multi-worker peer or tf.data service job, else None."""
  if 'tensorflow' not in sys.modules:
    return None
  from pcam_tfdata.training import distribute  # pylint: disable=g-import-not-at-top
  from pcam_tfdata.training import service  # pylint: disable=g-import-not-at-top
  return distribute.peer_failure(error) or service.service_failure(error)


if __name__ == '__main__':
  cli.run_program(sys.modules[__name__])
