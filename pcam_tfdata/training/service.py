"""The training pipeline as tf.data service workers run it: streamed, not cached.

A service worker sees only the shard files the dispatcher hands it, one at a
time (dynamic sharding), so the whole-split cache of `pipeline.make_dataset`
does not apply: read (interleaved), parse 1,024 at a time, shuffle in a
buffer of 8,192 examples, batch, augment. Each example is read once per pass
whatever the number of workers, and trainers sharing a job name share one
stream of batches.
"""

import tensorflow as tf

from pcam_tfdata import records as records_lib
from pcam_tfdata.training import augment as augment_lib
from pcam_tfdata.training import pipeline
from pcam_tfdata.training import split_cache

SERVICE_JOB_NAME = 'pcam_tfdata_train'
_SHUFFLE_BUFFER = 8192  # Examples per service worker.


def make_streaming_dataset(records, split, *, batch_size, augment=None, seed=None,
                           with_ids=False, repeat=False):
  """The streaming form of the training pipeline, which tf.data service workers run.

  Also how tools/bench_scale.py separates the service's own cost from the
  cache's.

  Args: as `make_service_dataset`, without the address.

  Returns:
    A local tf.data.Dataset of batches.
  """
  records = records_lib.Records.of(records)
  augment = augment_lib.Augment.of(augment)
  paths = records.shard_paths(split)
  files = tf.data.Dataset.from_tensor_slices(paths)  # Split by the dispatcher, file by file.
  if repeat:
    files = files.repeat()
  ds = files.interleave(tf.data.TFRecordDataset, cycle_length=4, block_length=16,
                        num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  parse = lambda x: pipeline.parse_batch(x, records.image_shape, with_ids)
  ds = ds.batch(split_cache.PARSE_BATCH).map(parse, num_parallel_calls=tf.data.AUTOTUNE)
  # No larger than the split: a buffer of several passes (endless input)
  # would first read them all, and mix copies of one example into one batch.
  buffer = min(_SHUFFLE_BUFFER, records.count(split))
  ds = ds.unbatch().shuffle(buffer, seed=seed).batch(batch_size, drop_remainder=True)
  if augment:
    # A stateless seed per batch: (seed, batch number), or random pairs.
    keys = (tf.data.Dataset.random().batch(2) if seed is None else
            tf.data.Dataset.counter().map(lambda i: tf.stack([tf.constant(seed, tf.int64), i])))

    def augment_batch(batch, key):
      images = augment_lib.random_dihedral(batch[0], key) if augment.dihedral else batch[0]
      images = augment_lib.stain_jitter(images, augment.stain_jitter,
                                        tf.random.experimental.stateless_fold_in(key, 1))
      return (images, *batch[1:])

    ds = tf.data.Dataset.zip(ds, keys).map(augment_batch, num_parallel_calls=tf.data.AUTOTUNE)
  return ds


def make_service_dataset(records, split, address, *, batch_size, augment=None, seed=None,
                         with_ids=False, repeat=False, job_name=SERVICE_JOB_NAME):
  """The training pipeline, run by the tf.data service at `address`.

  Args:
    records: a records.Records or the path of a records folder.
    split: the split to read.
    address: the dispatcher, 'grpc://host:port'.
    batch_size, augment, seed, with_ids: as `pipeline.make_dataset` (training
      mode); augmentation always runs on the service workers.
    repeat: endless passes (training); else one pass, each example once
      (minus each service worker's last partial batch).
    job_name: consumers with the same name share one stream of batches.

  Returns:
    A tf.data.Dataset of batches, read from the service.
  """
  augment = augment_lib.Augment.of(augment)
  for where in ('stain_on_device', 'dihedral_on_device'):
    if getattr(augment, where):
      raise ValueError(f'{where}=True: the tf.data service workers augment the batches '
                       'themselves')
  ds = make_streaming_dataset(records, split, batch_size=batch_size, augment=augment,
                              seed=seed, with_ids=with_ids, repeat=repeat)
  dataset_id = tf.data.experimental.service.register_dataset(address, ds)
  service = tf.data.experimental.service.from_dataset_id(
      processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC,
      service=address, dataset_id=dataset_id, element_spec=ds.element_spec,
      job_name=job_name)
  return service.prefetch(tf.data.AUTOTUNE)


def service_failure(error):
  """One line for a dispatcher restarted without its journal, or None if `error` is not that."""
  message = getattr(error, 'message', '') or ''
  if 'dispatcher is not configured to be fault tolerant' not in message:
    return None
  return ('the tf.data service dispatcher restarted and no longer knows this run\'s job (its '
          'state was in memory only): start it with --work_dir to survive restarts, then rerun '
          'the same command to resume from the last backup')


def dispatcher_config(port, work_dir=None):
  """A dispatcher's config: with `work_dir`, journaled there (fault-tolerant mode).

  A dispatcher restarted with the same work_dir and port replays the journal
  and keeps its jobs; without one, its state is in memory only.
  """
  return tf.data.experimental.service.DispatcherConfig(
      port=port, work_dir=work_dir, fault_tolerant_mode=bool(work_dir))
