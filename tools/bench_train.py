r"""Training images/s fed by the real pipeline against the same batches held in memory.

    python tools/bench_train.py --records_dir=records/demo --steps=30 --repeats=3

    python tools/bench_train.py --records_dir=records/demo,/tmp/demo96 --policies=off \
        --models=baseline,batchnorm,resnet50v2,efficientnetv2b0 --steps=10 --repeats=2 \
        --noextra_rows

(the second: images/s per architecture at each folder's crop size, the
README's table: a step slower than the pipeline's images/s, bench_input.py,
is never fed late).
For each model and precision policy, in one run: the training step of
`pcam_tfdata.loop` (default strategy, batch 64) fed by (a) the cached training
pipeline of `pcam_tfdata.pipeline` and (b) a dataset over the same batches
already in memory, whose input cost is nil. Warm-up (tracing, the cache fill)
is excluded; each figure is the median of --repeats timings of --steps steps,
the two feeds interleaved so that drift on a shared machine hits both.

Two more float32 rows per model: the step compiled by XLA (--jit_compile=on)
and the step under TF op determinism (what --seed turns on), timed last,
since determinism cannot be turned off again in the process.

The precision columns depend on the CPU: without AVX-512 BF16/AMX, bfloat16
and float16 are emulated and far slower than float32; with them, bfloat16
runs natively. The table's header line names the CPU it ran on.
"""

import json
import statistics
import time

from absl import app
from absl import flags

from pcam_tfdata import cli
from pcam_tfdata import hostinfo

_RECORDS_DIR = flags.DEFINE_list('records_dir', ['records/demo'],
                                  'Records folders (e.g. one per crop size): rows for each.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 64, 'Batch size, as the seed.')
_STEPS = flags.DEFINE_integer('steps', 30, 'Steps per timing.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timings per figure (median).')
_STEPS_PER_EXECUTION = flags.DEFINE_integer('steps_per_execution', 1, 'Steps per compiled call.')
_AUGMENT = flags.DEFINE_bool('augment', False, 'Augment in the pipeline.')
_MODELS = flags.DEFINE_list('models', ['baseline', 'batchnorm'], 'Models to time.')
_POLICIES = flags.DEFINE_list('policies', ['off', 'bfloat16', 'float16'],
                              'Precision modes (--mixed_precision values).')
_EXTRA_ROWS = flags.DEFINE_bool('extra_rows', True, 'Also the float32 XLA and op-determinism '
                                 'rows of each model.')
_JSON = flags.DEFINE_string('json', None, 'Also write the results here.')


def _time_steps(train_steps, iterator, steps, per_call):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  done = 0
  while done < steps:
    n = min(per_call, steps - done)
    loss, _ = train_steps(iterator, tf.constant(n))
    done += n
  float(loss)  # Waits for the last step.
  return time.perf_counter() - start


def measure(model_name, mode, records_dir, batch_size, steps, repeats, per_call, augment,
            jit_compile=False):
  """(pipeline images/s, in-memory images/s, precision policy, parameters) for one model."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from pcam_tfdata import records  # pylint: disable=g-import-not-at-top
  from pcam_tfdata.training import distribute, loop, models, pipeline  # pylint: disable=g-import-not-at-top
  policy = distribute.set_precision(mode)
  strategy = tf.distribute.get_strategy()
  shape = records.Records.open(records_dir).image_shape
  model = models.build_model(model_name, shape)
  optimizer = keras.optimizers.Adam(1e-3)
  if policy == 'mixed_float16':
    optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
  optimizer.build(model.trainable_variables)
  train_steps = loop.make_train_fn(model, optimizer, strategy, batch_size,
                                   jit_compile=jit_compile)

  ds = pipeline.make_dataset(records_dir, 'train', batch_size=batch_size, training=True,
                             augment=augment, seed=0)
  for _ in ds:  # Fills the cache.
    pass
  fed = ds.repeat()
  # The same batches, already in memory: iterating them costs next to nothing.
  batches = list(ds.take(steps))
  held = tf.data.Dataset.from_tensor_slices(
      tuple(tf.stack([b[i] for b in batches]) for i in range(2))).repeat()
  fed_it, held_it = iter(fed), iter(held)
  _time_steps(train_steps, fed_it, per_call * 2, per_call)  # Tracing and warm-up.
  _time_steps(train_steps, held_it, per_call * 2, per_call)
  times = {'pipeline': [], 'memory': []}
  for _ in range(repeats):
    times['pipeline'].append(_time_steps(train_steps, fed_it, steps, per_call))
    times['memory'].append(_time_steps(train_steps, held_it, steps, per_call))
  rate = lambda k: steps * batch_size / statistics.median(times[k])
  keras.mixed_precision.set_global_policy('float32')
  return rate('pipeline'), rate('memory'), policy, model.count_params()


def main(argv):
  del argv
  cli.import_tensorflow()  # Before anything imports it: no start-up chatter in the tables.
  from pcam_tfdata import records  # pylint: disable=g-import-not-at-top
  rows = []

  def add(model_name, records_dir, mode, label=None, **kwargs):
    fed, held, policy, params = measure(
        model_name, mode, records_dir, _BATCH_SIZE.value, _STEPS.value, _REPEATS.value,
        _STEPS_PER_EXECUTION.value, _AUGMENT.value, **kwargs)
    rows.append({'model': model_name, 'params': params,
                 'crop': records.Records.open(records_dir).image_shape[0],
                 'policy': label or policy, 'pipeline_images_per_second': fed,
                 'memory_images_per_second': held, 'pipeline_over_memory': fed / held})

  for records_dir in _RECORDS_DIR.value:
    for model_name in _MODELS.value:
      for mode in _POLICIES.value:
        add(model_name, records_dir, mode)
  if _EXTRA_ROWS.value:
    for label, kwargs in [('float32 + XLA (--jit_compile=on)', dict(jit_compile=True)),
                          ('float32 + op determinism (--seed)', {})]:
      if 'determinism' in label:
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
        tf.config.experimental.enable_op_determinism()
      for records_dir in _RECORDS_DIR.value:
        for model_name in _MODELS.value:
          add(model_name, records_dir, 'off', label, **kwargs)
  host = hostinfo.describe()
  print(f'\nbatch {_BATCH_SIZE.value}, {_STEPS.value} steps x median of {_REPEATS.value}, '
        f'steps_per_execution {_STEPS_PER_EXECUTION.value}, augment {_AUGMENT.value}; {host}')
  print('| model | params | crop | policy | pipeline images/s | in-memory images/s | '
        'pipeline / in-memory | x float32 (in-memory) |')
  print('|---|---:|---:|---|---:|---:|---:|---:|')
  for row in rows:
    base = next((r for r in rows if (r['model'], r['crop']) == (row['model'], row['crop'])
                 and r['policy'] == 'float32'), None)
    relative = (f'{row["memory_images_per_second"] / base["memory_images_per_second"]:.2f}'
                if base else '')
    print(f'| {row["model"]} | {row["params"]:,} | {row["crop"]} | {row["policy"]} | '
          f'{row["pipeline_images_per_second"]:,.0f} | {row["memory_images_per_second"]:,.0f} | '
          f'{100 * row["pipeline_over_memory"]:.1f}% | {relative} |')
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump({'host': host, 'rows': rows}, f, indent=1)


if __name__ == '__main__':
  app.run(main)
