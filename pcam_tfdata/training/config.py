"""A training run's settings, as plain values: the flags of `python -m pcam_tfdata.train`.

TensorFlow-free, so that the command checks its flags before TensorFlow
starts, and `pcam_tfdata.train(...)` its keyword arguments.
"""

import dataclasses

from pcam_tfdata import records as records_lib

# models.MODELS and models.APPLICATIONS, without importing Keras here.
APPLICATIONS = ('resnet50v2', 'efficientnetv2b0')
MODEL_NAMES = ('baseline', 'batchnorm', *APPLICATIONS)
BATCH_NORM_MODELS = ('batchnorm', *APPLICATIONS)
WEIGHTS = ('none', 'imagenet')
PLACES = ('auto', 'host', 'device')  # Where an augmentation runs (--augment_on, --stain_jitter_on).
LR_SCHEDULES = ('plateau', 'cosine', 'onecycle')  # --lr_schedule (schedules.py says what each is).
# The seed's dropout before the output layer, per model (--dropout's default);
# the applications have none unless --dropout asks for one.
INPUT_ORDERS = ('auto', 'global', 'per_pipeline')  # input_order.ORDERS, TF-free.
SEED_DROPOUT = {'baseline': 0.2, 'batchnorm': 0.5}


@dataclasses.dataclass
class Config:
  """Everything a run needs; the flags of `python -m pcam_tfdata.train`, as plain values.

  `records_dir` is a folder's path or a `records.Records` already open (the
  CLI opens it once, to fail on a wrong folder before TensorFlow starts).
  """
  records_dir: str | records_lib.Records
  model_dir: str
  model: str = 'baseline'
  weights: str = 'none'  # Initial weights of the Keras applications: none or imagenet.
  epochs: int = 10
  batch_size: int = 64
  learning_rate: float = 1e-3
  dropout: float | None = None  # None: the seed's rate for --model (SEED_DROPOUT), else none.
  weight_decay: float = 0.0  # > 0: AdamW (decoupled weight decay) instead of Adam.
  label_smoothing: float = 0.0
  lr_schedule: str = 'plateau'
  warmup_epochs: float = 0.0
  mixed_precision: str = 'auto'
  strategy: str = 'auto'
  num_cpu_devices: int = 1
  sync_batch_norm: str = 'auto'
  jit_compile: str = 'auto'
  augment: bool = False
  augment_on: str = 'auto'
  stain_jitter: float = 0.0
  stain_jitter_on: str = 'auto'
  augment_cache_gib: float = 4.0  # As pipeline.DEFAULT_VARIANT_BUDGET (TF-free here).
  input_order: str = 'auto'  # As input_order.ORDERS (TF-free here).
  seed: int | None = None
  steps_per_execution: int = 1
  steps_per_epoch: int = 0  # 0: every whole batch of the train split.
  backup_every_steps: int = 0  # 0: a backup at each epoch's end only.
  early_stopping_patience: int = 3
  reduce_lr_patience: int = 2
  profile_steps: tuple | None = None
  eval_batch_size: int = 512
  data_service_address: str | None = None
  progress: bool = True  # On the chief only.
  restart: bool = False  # Discard the backup of an interrupted run instead of resuming it.


# Each --*_on flag and the setting that turns its augmentation on.
_PLACED = (('augment_on', 'augment'), ('stain_jitter_on', 'stain_jitter'))


def check_config(config):
  """Raises ValueError naming the flag for a bad value."""
  checks = [
      (config.model in MODEL_NAMES, f'--model={config.model}: choose one of {MODEL_NAMES}'),
      (config.weights in WEIGHTS,
       f'--weights={config.weights}: choose one of {", ".join(WEIGHTS)}'),
      (config.weights == 'none' or config.model in APPLICATIONS,
       f'--weights={config.weights}: only the Keras applications ({", ".join(APPLICATIONS)}) '
       f'have published weights, not --model={config.model}'),
      (config.epochs >= 1, f'--epochs={config.epochs}: must be >= 1'),
      (config.batch_size >= 1, f'--batch_size={config.batch_size}: must be >= 1'),
      (config.learning_rate > 0, f'--learning_rate={config.learning_rate}: must be > 0'),
      (config.dropout is None or 0 <= config.dropout < 1,
       f'--dropout={config.dropout}: must be in [0, 1)'),
      (0 <= config.weight_decay < float('inf'),
       f'--weight_decay={config.weight_decay}: must be >= 0 (0: Adam, as the seed)'),
      (0 <= config.label_smoothing < 1,
       f'--label_smoothing={config.label_smoothing}: must be in [0, 1)'),
      (config.lr_schedule in LR_SCHEDULES,
       f'--lr_schedule={config.lr_schedule}: choose one of {", ".join(LR_SCHEDULES)}'),
      (0 <= config.warmup_epochs < config.epochs if config.epochs >= 1 else True,
       f'--warmup_epochs={config.warmup_epochs}: must be >= 0 and below --epochs={config.epochs}'),
      (config.num_cpu_devices >= 1, f'--num_cpu_devices={config.num_cpu_devices}: must be >= 1'),
      (config.steps_per_epoch >= 0,
       f'--steps_per_epoch={config.steps_per_epoch}: must be >= 0 (0: the whole train split)'),
      (config.steps_per_execution >= 1,
       f'--steps_per_execution={config.steps_per_execution}: must be >= 1'),
      (config.backup_every_steps >= 0,
       f'--backup_every_steps={config.backup_every_steps}: must be >= 0 (0: at epoch ends)'),
      (config.early_stopping_patience >= 1,
       f'--early_stopping_patience={config.early_stopping_patience}: must be >= 1'),
      (config.reduce_lr_patience >= 1,
       f'--reduce_lr_patience={config.reduce_lr_patience}: must be >= 1'),
      (0 <= config.stain_jitter < 1,
       f'--stain_jitter={config.stain_jitter}: must be in [0, 1)'),
      *[(getattr(config, flag) in PLACES,
         f'--{flag}={getattr(config, flag)}: choose one of {", ".join(PLACES)}')
        for flag, _ in _PLACED],
      (0 <= config.augment_cache_gib < 2**20,  # (Also refuses inf and nan.)
       f'--augment_cache_gib={config.augment_cache_gib}: must be a number of GiB, >= 0'),
      (config.input_order in INPUT_ORDERS,
       f'--input_order={config.input_order}: choose one of {", ".join(INPUT_ORDERS)}'),
      (config.seed is None or 0 <= config.seed < 2**32,
       f'--seed={config.seed}: must be in 0..{2**32 - 1} (NumPy and Keras seeds)'),
      (config.sync_batch_norm in ('auto', 'on', 'off'),
       f'--sync_batch_norm={config.sync_batch_norm}: choose one of auto, on, off'),
      (config.jit_compile in ('auto', 'on', 'off'),
       f'--jit_compile={config.jit_compile}: choose one of auto, on, off'),
      (not config.data_service_address or config.data_service_address.startswith('grpc://'),
       f'--data_service_address={config.data_service_address}: expected grpc://host:port'),
      # The service's workers build whole batches, augmented: no draws reach the step.
      *[(not (config.data_service_address and getattr(config, used)
              and getattr(config, flag) == 'device'),
         f'--{flag}=device: with --data_service_address the tf.data service workers augment '
         f'the batches; use --{flag}=auto or host')
        for flag, used in _PLACED],
  ]
  for ok, message in checks:
    if not ok:
      raise ValueError(message)
