"""A training run in its phases: set up, data, model (and restore), the epochs, the final evaluation.

`train_and_evaluate` reads as that list; each phase is a function or a small
object with one job, and gets what it needs from the phases before it.
"""

import contextlib
import dataclasses
import time

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.framework import config as tf_config  # pylint: disable=g-direct-tensorflow-import

from pcam_tfdata import folderlock
from pcam_tfdata import fs
from pcam_tfdata import records as records_lib
from pcam_tfdata import rundir
from pcam_tfdata.training import augment
from pcam_tfdata.training import config as config_lib
from pcam_tfdata.training import distribute
from pcam_tfdata.training import epochs as epochs_lib
from pcam_tfdata.training import input_order as order_lib
from pcam_tfdata.training import models
from pcam_tfdata.training import pipeline
from pcam_tfdata.training import schedules
from pcam_tfdata.training import service


@dataclasses.dataclass
class Setup:
  """What the set-up phase decided: precision, strategy, and this worker's place in it."""
  strategy: tf.distribute.Strategy
  policy: str  # The Keras precision policy.
  replicas: int  # Replicas in sync, over all workers.
  pipelines: int  # Input pipelines: one per worker.
  chief: bool  # This worker writes the outputs.
  task_id: int
  sync_batch_norm: bool
  jit_compile: bool
  stain_on_device: bool  # The training step applies the stain jitter (else the pipeline).
  dihedral_on_device: bool  # The training step applies --augment's flips and rotations.
  # The train batches' order (pipeline.make_dataset): 'global', the same on
  # any number of workers and replicas; 'per_pipeline', each worker's own
  # shards; 'service', the tf.data service's.
  order: str = 'global'
  # The input pipelines' base seed: --seed, or without it (several workers
  # in the global order) one drawn by the chief, so that all draw the same
  # permutation.
  data_seed: int | None = None


def train_and_evaluate(config, strategy=None, datasets=None, on_epoch_end=None):
  """See train.run."""
  start = time.time()
  records = records_lib.Records.of(config.records_dir)  # The manifest, read once.
  setup = set_up(config, strategy, records)
  with one_writer(config, setup):
    steps, datasets = make_data(config, records, setup, datasets)
    model, optimizer = build_model(config, records, setup, steps)
    run = epochs_lib.EpochLoop(config, records, setup, model, optimizer, steps, on_epoch_end)
    run.restore()
    run.start(datasets)
    run.train(datasets)
    if not setup.chief:
      return {}
    # The backup stays: rerun, the same command evaluates again, a larger
    # --epochs trains on, and another command is refused (resume.check).
    return run.final_evaluation(datasets, time.time() - start)


def one_writer(config, setup):
  """The chief's lock on --model_dir for the whole run (folderlock); the other workers take none.

  Taken before anything is restored or written, so a second run into the
  folder (a second terminal, a restarted job whose old pod still runs) is
  refused in one line instead of mixing its rows, curves and models in.

  Raises:
    folderlock.FolderBusy: a live run holds it.
  """
  if not setup.chief:
    return contextlib.nullcontext()
  if fs.is_url(config.model_dir):
    # A POSIX lock needs a local filesystem, and gfile offers no
    # create-if-absent to build one on an object store.
    print(f'--model_dir={config.model_dir}: not locked (a URL); a second run started into '
          'it would not be refused', flush=True)
    return contextlib.nullcontext()
  fs.makedirs(config.model_dir)
  return folderlock.FolderLock(fs.join(config.model_dir, folderlock.LOCK_NAME),
                               f'--model_dir={config.model_dir}')


def set_up(config, strategy=None, records=None):
  """Precision, then the strategy, then the seed, then the checks that need them.

  In this order, as the Flax and TF Models examples do:
  MultiWorkerMirroredStrategy must come before any TF op, and the batch
  check needs the strategy's replicas.

  Raises:
    ValueError: a setting the strategy or hardware cannot run, naming its flag.
  """
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
  resolver = getattr(strategy, 'cluster_resolver', None)
  setup = Setup(strategy=strategy, policy=policy, replicas=replicas,
                pipelines=distribute.num_workers(strategy),
                chief=distribute.is_chief(strategy),
                task_id=getattr(resolver, 'task_id', 0) or 0,
                sync_batch_norm=distribute.resolve_sync_batch_norm(config.sync_batch_norm,
                                                                   replicas),
                jit_compile=distribute.resolve_jit_compile(config.jit_compile, strategy),
                stain_on_device=stain_on_device(config),
                dihedral_on_device=dihedral_on_device(config))
  _check_compilation(config, setup)
  if records is not None:
    setup.order = input_order(config, records, setup)
  setup.data_seed = config.seed
  if config.seed is None and setup.pipelines > 1 and setup.order == 'global':
    drawn = float(np.random.default_rng().integers(2**31))  # (Exact in float64.)
    setup.data_seed = int(distribute.make_from_chief(strategy)({'seed': drawn})['seed'])
  return setup


def input_order(config, records, setup):
  """The train batches' order: --input_order, with `auto` agreed by every worker.

  `auto` is 'global' only if every worker can hold the whole split
  (`input_order.choose_order` on each, then one all-reduce): workers that
  disagreed would cut the epoch into other steps and hang in a collective.
  """
  if config.data_service_address:
    return 'service'
  order = order_lib.choose_order(config.input_order, records, 'train', setup.pipelines)
  if config.input_order == 'auto' and setup.pipelines > 1:
    short = distribute.any_worker(setup.strategy, order != 'global')
    order = 'per_pipeline' if short else 'global'
    if order == 'per_pipeline' and setup.chief:
      gib = order_lib.split_bytes(records, 'train') / 2**30
      print(f'--input_order=auto: the train split ({gib:.2f} GiB of images) is over a quarter '
            'of a worker\'s memory, so each worker holds its own shards: the batches depend '
            'on the number of workers, and a resume on another number is refused '
            '(--input_order=global holds it whole)', flush=True)
  return order


def _check_compilation(config, setup):
  if not setup.jit_compile:
    return
  if config.seed is not None and tf_config.is_op_determinism_enabled():
    # Measured: XLA has no deterministic MaxPool gradient, so with op
    # determinism on (what --seed needs on GPUs) the first step fails.
    raise ValueError(f'--jit_compile={config.jit_compile} with --seed on GPUs: XLA has no '
                     'deterministic form of these models\' max-pool gradient; drop one of the two')
  if setup.sync_batch_norm and setup.replicas > 1 and config.model in config_lib.BATCH_NORM_MODELS:
    # Its cross-replica sums would sit inside the XLA function, which
    # tf.distribute cannot synchronize (a merge_call inside a tf.function).
    raise ValueError(f'--jit_compile={config.jit_compile} cannot compile synchronized '
                     f'BatchNorm over {setup.replicas} replicas; use --jit_compile=off or '
                     '--sync_batch_norm=off')


def stain_on_device(config):
  """Whether the training step applies the stain jitter (else the input pipeline).

  On the accelerator when there is one: per-pixel float arithmetic that the
  host's few cores would otherwise spend on every image. Not with the
  tf.data service, whose workers build whole batches.
  """
  return bool(config.stain_jitter) and _on_device(config, config.stain_jitter_on)


def dihedral_on_device(config):
  """Whether the training step applies --augment's flips and rotations (else the pipeline).

  On the accelerator when there is one: the host then gathers each batch
  as if unaugmented, and holds the split once, not its 8 variants (which
  at 96 px outgrow the default budget). Not with the tf.data service.
  """
  return bool(config.augment) and _on_device(config, config.augment_on)


def _on_device(config, choice):
  """A --*_on flag's verdict: `auto` is device when a GPU or TPU trains."""
  if config.data_service_address:
    return False
  if choice == 'auto':
    return bool(tf.config.list_logical_devices('GPU') or tf.config.list_logical_devices('TPU'))
  return choice == 'device'


def make_data(config, records, setup, datasets=None):
  """(training steps per epoch, the datasets): see train.run for `datasets`.

  Raises:
    ValueError: a global batch larger than an input pipeline's share of the
      train split, or (building the datasets) records without a val split.
  """
  batch = config.batch_size // setup.pipelines
  if setup.order == 'global':  # Whole global batches of the split, on any topology.
    steps = records.steps_per_epoch('train', config.batch_size)
  else:  # As the smallest pipeline's shards allow.
    steps = records.steps_per_epoch('train', batch, setup.pipelines)
  if steps < 1:
    raise ValueError(f'--batch_size={config.batch_size}: larger than the train split '
                     f'({records.count("train")} examples)')
  if config.steps_per_epoch:  # Each epoch's first N batches of its own order.
    steps = min(steps, config.steps_per_epoch)
  datasets = datasets or _datasets(config, records, setup)
  if setup.pipelines > 1:
    context = distribute.input_context(setup.strategy)
    print(f'input pipeline {context.input_pipeline_id} of {setup.pipelines}: {steps} steps of '
          f'{batch} per epoch', flush=True)
  return steps, datasets


def _datasets(config, records, setup):
  """The training dataset function and the two evaluation datasets."""
  if 'val' not in records.splits:
    raise ValueError(f'{records.path}: no val split to monitor')
  options = augment.Augment(
      dihedral=config.augment, stain_jitter=config.stain_jitter,
      stain_on_device=setup.stain_on_device, dihedral_on_device=setup.dihedral_on_device,
      variant_budget=int(config.augment_cache_gib * 2**30))

  def train_fn(context, first_epoch, batches_per_epoch, first_batch=0):
    batch_size = context.get_per_replica_batch_size(config.batch_size)
    if config.data_service_address:
      # Endless, so that every trainer (sharing the job) can take its steps.
      return service.make_service_dataset(
          records, 'train', config.data_service_address, batch_size=batch_size,
          augment=options, seed=setup.data_seed, repeat=True)
    # Every remaining epoch, each from (seed, epoch number): a resumed run
    # sees the batches the uninterrupted one would have.
    return pipeline.make_dataset(
        records, 'train', batch_size=batch_size, training=True, augment=options,
        seed=setup.data_seed, input_context=context, first_epoch=first_epoch,
        num_epochs=config.epochs - first_epoch + 1, batches_per_epoch=batches_per_epoch,
        first_batch=first_batch, order=setup.order)

  evaluation = lambda split, cache: pipeline.make_dataset(
      records, split, batch_size=config.eval_batch_size, training=False, cache=cache,
      with_ids=True)
  # The train split is evaluated once, at the end: streamed, not a second
  # copy beside the training cache.
  return {'train': train_fn, 'val': evaluation('val', True),
          'train_eval': evaluation('train', False)}


def build_model(config, records, setup, steps_per_epoch):
  """The model and its optimizer, built in the strategy's scope.

  Adam as the seed, or AdamW with --weight_decay; the learning rate a plain
  variable (the seed's plateau halvings) or a `schedules.Schedule` of the
  step counter.
  """
  # A backup to resume replaces the initial weights: ImageNet's are not
  # fetched for it (a preempted run resumes offline), and the resume check
  # names a changed --weights rather than a failed fetch.
  weights = config.weights
  if not config.restart and tf.train.latest_checkpoint(
      fs.join(config.model_dir, rundir.BACKUP_DIR)):
    weights = 'none'
  with setup.strategy.scope():
    model = models.build_model(config.model, records.image_shape,
                               sync_batch_norm=setup.sync_batch_norm, weights=weights,
                               dropout=config.dropout)
    rate = config.learning_rate
    if schedules.uses_schedule(config):
      rate = schedules.Schedule(config.lr_schedule, rate, steps_per_epoch, config.epochs,
                                config.warmup_epochs)
    if config.weight_decay:
      optimizer = keras.optimizers.AdamW(rate, weight_decay=config.weight_decay)
    else:
      optimizer = keras.optimizers.Adam(rate)
    if setup.policy == 'mixed_float16':
      optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
  return model, optimizer
