"""Precision policy and tf.distribute strategy, chosen from the hardware or asked for."""

import json
import os
import re

import keras
import tensorflow as tf

PRECISIONS = ('auto', 'float16', 'bfloat16', 'off')
STRATEGIES = ('auto', 'default', 'mirrored', 'multi_worker')
_POLICIES = {'float16': 'mixed_float16', 'bfloat16': 'mixed_bfloat16', 'off': 'float32'}


def split_cpu(num_devices):
  """Splits the host CPU into `num_devices` logical devices (before TF starts).

  MirroredStrategy then runs, and can be tested, on a machine with no GPU.

  Raises:
    ValueError: TensorFlow's runtime already started with another layout.
  """
  if num_devices <= 1:
    return
  cpu = tf.config.list_physical_devices('CPU')[0]
  layout = [tf.config.LogicalDeviceConfiguration()] * num_devices
  try:
    tf.config.set_logical_device_configuration(cpu, layout)
  except RuntimeError:
    if len(tf.config.list_logical_devices('CPU')) != num_devices:
      raise ValueError(f'--num_cpu_devices={num_devices}: TensorFlow already started with '
                       f'{len(tf.config.list_logical_devices("CPU"))} CPU devices') from None


def _tensor_core_gpus():
  gpus = tf.config.list_physical_devices('GPU')
  details = [tf.config.experimental.get_device_details(g) for g in gpus]
  return bool(gpus) and all(d.get('compute_capability', (0, 0)) >= (7, 0) for d in details)


def set_precision(mode):
  """Sets the global Keras precision policy and returns its name.

  `auto` is float16 with loss scaling on GPUs with tensor cores (compute
  capability 7.0+); elsewhere float32, which measured fastest on CPU hosts
  (tools/bench_train.py: bfloat16 and float16 are emulated there; see BUILD.md).

  Raises:
    ValueError: unknown mode.
  """
  if mode not in PRECISIONS:
    raise ValueError(f'--mixed_precision={mode}: choose one of {", ".join(PRECISIONS)}')
  if mode == 'auto':
    policy = 'mixed_float16' if _tensor_core_gpus() else 'float32'
  else:
    policy = _POLICIES[mode]
  keras.mixed_precision.set_global_policy(policy)
  return policy


def _cluster_workers():
  """Number of workers TF_CONFIG or Slurm describe (1 when neither does)."""
  try:
    config = json.loads(os.environ.get('TF_CONFIG') or '{}')
  except json.JSONDecodeError as e:
    raise ValueError(f'TF_CONFIG: not valid JSON ({e})') from None
  cluster = config.get('cluster', {})
  workers = len(cluster.get('worker', ())) + len(cluster.get('chief', ()))
  if workers:
    return workers
  return int(os.environ.get('SLURM_NTASKS', '1'))


def _resolver():
  if 'TF_CONFIG' not in os.environ and 'SLURM_JOB_ID' in os.environ:
    return tf.distribute.cluster_resolver.SlurmClusterResolver()
  return None  # TFConfigClusterResolver, the default.


def make_strategy(kind):
  """Builds the strategy.

  `auto`: MultiWorkerMirroredStrategy when TF_CONFIG (or Slurm) describes
  several workers, MirroredStrategy over all GPUs (or logical CPU devices)
  when there are several, else the default strategy.

  Raises:
    ValueError: unknown kind.
  """
  if kind not in STRATEGIES:
    raise ValueError(f'--strategy={kind}: choose one of {", ".join(STRATEGIES)}')
  cluster_workers = _cluster_workers()  # Also checks TF_CONFIG, naming it.
  if kind == 'auto':
    devices = tf.config.list_logical_devices('GPU') or tf.config.list_logical_devices('CPU')
    kind = ('multi_worker' if cluster_workers > 1
            else 'mirrored' if len(devices) > 1 else 'default')
  if kind == 'multi_worker':
    key = ('multi_worker',)
    if key not in _MADE:
      _MADE[key] = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=_resolver())
    return _MADE[key]
  if kind == 'mirrored':
    devices = tf.config.list_logical_devices('GPU') or tf.config.list_logical_devices('CPU')
    key = ('mirrored', *(d.name for d in devices))
    if key not in _MADE:
      _MADE[key] = tf.distribute.MirroredStrategy([d.name for d in devices])
    return _MADE[key]
  return tf.distribute.get_strategy()


# One strategy per kind and devices for the life of the process: a second
# MirroredStrategy numbers its collective ops from the same keys as the
# first, and its all-reduces then meet the first one's in TensorFlow's
# process-wide collective executor ("Shape mismatch in the collective
# instance"): a second run in a notebook, or a search's second trial, failed.
# (A multi-worker strategy may be made once per process anyway.)
_MADE = {}


def is_chief(strategy):
  """True on the worker that writes checkpoints, logs, metrics and plots."""
  resolver = getattr(strategy, 'cluster_resolver', None)
  if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return True
  task_type, task_id = resolver.task_type, resolver.task_id
  return task_type in (None, 'chief') or (task_type == 'worker' and task_id == 0
                                          and 'chief' not in resolver.cluster_spec().as_dict())


def num_workers(strategy):
  """Hosts in the job, each with one input pipeline (1 outside multi-worker)."""
  resolver = getattr(strategy, 'cluster_resolver', None)
  if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return 1
  spec = resolver.cluster_spec().as_dict()
  return max(1, len(spec.get('worker', ())) + len(spec.get('chief', ())))


def server_address(strategy):
  """host:port of this worker's TensorFlow server under MultiWorkerMirroredStrategy, else None."""
  resolver = getattr(strategy, 'cluster_resolver', None)
  if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return None
  try:
    return resolver.cluster_spec().task_address(resolver.task_type, resolver.task_id)
  except ValueError:
    return None


def worker_index(strategy):
  """This worker's input pipeline id: the chief first, then the workers by index.

  The same numbering MultiWorkerMirroredStrategy gives its InputContexts, so a
  worker reads the same shards whichever way its input is built.
  """
  resolver = getattr(strategy, 'cluster_resolver', None)
  if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return 0
  return id_in_cluster(resolver.cluster_spec().as_dict(), resolver.task_type, resolver.task_id)


def id_in_cluster(cluster, task_type, task_id):
  """0 for the chief, then each worker by index after it (a cluster dict as TF_CONFIG's).

  No task type (MultiWorkerMirroredStrategy without TF_CONFIG: one local
  worker) is 0, as TensorFlow numbers it.
  """
  if task_type in (None, 'chief'):
    return 0
  if task_type != 'worker':
    raise ValueError(f'task type {task_type!r} trains nothing; expected chief or worker')
  return int(task_id) + int(bool(cluster.get('chief')))


def input_context(strategy):
  """The InputContext of this worker's input pipeline (one per worker)."""
  return tf.distribute.InputContext(num_input_pipelines=num_workers(strategy),
                                    input_pipeline_id=worker_index(strategy),
                                    num_replicas_in_sync=strategy.num_replicas_in_sync)


def strategy_name(strategy):
  return {tf.distribute.MultiWorkerMirroredStrategy: 'multi_worker',
          tf.distribute.MirroredStrategy: 'mirrored'}.get(type(strategy), 'default')


SYNC_BATCH_NORM = ('auto', 'on', 'off')
JIT_COMPILE = ('auto', 'on', 'off')


def resolve_sync_batch_norm(mode, num_replicas):
  """Whether BatchNorm layers reduce their statistics over all replicas.

  `auto`: when more than one replica trains, so that BatchNorm sees the
  global batch's statistics, as the seed's single device did (and the
  replicas' moving averages stay equal instead of drifting apart).

  Raises:
    ValueError: unknown mode.
  """
  if mode not in SYNC_BATCH_NORM:
    raise ValueError(f'--sync_batch_norm={mode}: choose one of {", ".join(SYNC_BATCH_NORM)}')
  return num_replicas > 1 if mode == 'auto' else mode == 'on'


def resolve_jit_compile(mode, strategy):
  """Whether the training step's forward and backward pass is compiled by XLA.

  `auto` decides as Keras' `fit(jit_compile='auto')` does: on with a GPU, on
  one replica, without op determinism; off on CPU-only hosts (XLA measured
  about 0.5x there for the Baseline CNN, BUILD.md).

  Raises:
    ValueError: unknown mode.
  """
  if mode not in JIT_COMPILE:
    raise ValueError(f'--jit_compile={mode}: choose one of {", ".join(JIT_COMPILE)}')
  if mode != 'auto':
    return mode == 'on'
  from tensorflow.python.framework import config as tf_config  # pylint: disable=g-import-not-at-top
  return (bool(tf.config.list_physical_devices('GPU')) and strategy.num_replicas_in_sync == 1
          and not tf_config.is_op_determinism_enabled())


def make_from_chief(strategy):
  """fn(values) -> the chief's `values` (a dict of floats) on every worker.

  Each worker computes its own validation figures; on hosts whose CPUs
  round differently, or with anything replica-local, they may differ in the
  last bits, and a decision taken on a near tie (stop? halve the rate? best
  epoch?) would split the workers: a hang, or weights that drift apart. So
  every worker takes the chief's (replica 0's) figures, in float64: one
  all-reduce in which only replica 0 contributes. Outside multi-worker
  training the values are returned as they are.
  """
  if num_workers(strategy) <= 1:
    return lambda values: values
  broadcast = _summed_over_replicas(strategy, first_only=True)

  def from_chief(values):
    keys = sorted(values)
    agreed = broadcast([float(values[k]) for k in keys])
    return dict(zip(keys, (float(v) for v in agreed)))

  return from_chief


def _summed_over_replicas(strategy, first_only=False):
  """fn(list of floats) -> their float64 sum over every replica (or replica 0's alone).

  One all-reduce; every worker gets the same numbers back.
  """
  def replica_fn(x):
    context = tf.distribute.get_replica_context()
    # A tensor made on the replica's device: MultiWorkerMirroredStrategy
    # all-reduces to the devices of its input, and the argument itself has
    # none ("destinations can not be empty").
    x = (tf.where(context.replica_id_in_sync_group == 0, x, tf.zeros_like(x)) if first_only
         else tf.identity(x))
    return context.all_reduce(tf.distribute.ReduceOp.SUM, x)

  run = tf.function(lambda x: strategy.run(replica_fn, args=(x,)))
  return lambda values: strategy.experimental_local_results(
      run(tf.constant(values, tf.float64)))[0].numpy()


def any_worker(strategy, flag):
  """True on every worker if `flag` is true on any (one all-reduce; `flag` itself outside
  multi-worker training)."""
  if num_workers(strategy) <= 1:
    return bool(flag)
  return _summed_over_replicas(strategy)([float(bool(flag))])[0] > 0


_TASK = re.compile(r'/job:(\w+)/replica:\d+/task:(\d+)')


def peer_failure(error):
  """One line for a worker that lost a peer mid-run, or None if `error` is not that.

  A peer that dies (killed, out of memory, its host gone) surfaces in the
  survivors as a collective op's UnavailableError (or Aborted, or a
  deadline) some seconds later, as a traceback of some 60 lines; the task
  it names is the one that went away.
  """
  lost = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.DeadlineExceededError)
  if not isinstance(error, lost) or _cluster_workers() < 2:
    return None
  message = getattr(error, 'message', '') or str(error)
  task = _TASK.search(message)
  who = f'{task[1]} {task[2]}' if task else 'a peer'
  reasons = [l.split('aborted by:', 1)[1].strip() for l in message.splitlines()
             if 'aborted by:' in l]
  detail = f' ({reasons[0]})' if reasons else ''
  return (f'lost contact with {who}{detail}: it stopped or its host went away; rerun every '
          'worker with the same command to resume from the last backup')
