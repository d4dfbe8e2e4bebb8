"""Re-reads a records folder and checks it against its manifest, record by record."""

import contextlib
import os

import numpy as np

from pcam_tfdata import records
from pcam_tfdata import schema


class VerifyError(ValueError):
  """The records folder does not match its manifest or its schema."""


def _read_shard(path, image_bytes):
  """(ids, labels) of every record of a shard, checking each image's size."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  spec = schema.feature_spec()
  ds = tf.data.TFRecordDataset(path).batch(4096).map(lambda x: tf.io.parse_example(x, spec))
  ids, labels = [], []
  name = os.path.basename(path)
  try:
    for batch in ds:
      sizes = tf.strings.length(batch[schema.IMAGE_KEY]).numpy()
      if (sizes != image_bytes).any():
        bad = int(np.flatnonzero(sizes != image_bytes)[0])
        raise VerifyError(f'{name}: record {len(ids) + bad} has a {sizes[bad]}-byte image, '
                          f'expected {image_bytes}')
      ids.extend(i.decode() for i in batch[schema.ID_KEY].numpy())
      labels.append(batch[schema.LABEL_KEY].numpy())
  except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
    raise VerifyError(f'{name}: corrupt after {len(ids)} records ({e.message.splitlines()[0]})') from None
  return ids, np.concatenate(labels) if labels else np.zeros(0, np.int64)


def verify(records_dir, log=print):
  """Checks every shard: checksum, record count, schema, labels, id uniqueness.

  Args:
    records_dir: a folder written by tools/make_records.py.
    log: where a line per split goes.

  Returns:
    Total number of records checked.

  Raises:
    schema.ManifestError: no or malformed manifest.
    VerifyError: the first mismatch found, naming the shard or id.
  """
  manifest = schema.load_manifest(records_dir)
  image_bytes = int(np.prod(manifest['image_shape']))
  listed = {s['file'] for info in manifest['splits'].values() for s in info['shards']}
  stray = sorted(f for f in os.listdir(records_dir) if f.endswith('.tfrecord') and f not in listed)
  if stray:
    raise VerifyError(f'{os.path.join(records_dir, stray[0])}: shard not in the manifest')
  seen = {}
  total = 0
  for split, info in manifest['splits'].items():
    counts = {}
    for shard in info['shards']:
      path = os.path.join(records_dir, shard['file'])
      if records.sha256_file(path) != shard['sha256']:
        raise VerifyError(f'{path}: sha256 differs from the manifest')
      ids, labels = _read_shard(path, image_bytes)
      if len(ids) != shard['count']:
        raise VerifyError(f'{path}: {len(ids)} records, the manifest says {shard["count"]}')
      # Kaggle's test labels are unknown (-1); PCam's HDF5 test split has them.
      allowed = (schema.TEST_LABEL, 0, 1) if split == 'test' else (0, 1)
      if not np.isin(labels, allowed).all():
        raise VerifyError(f'{path}: label {labels[~np.isin(labels, allowed)][0]} in split '
                          f'{split} (allowed: {allowed})')
      for example_id in ids:
        if example_id in seen:
          raise VerifyError(f'{path}: id {example_id} also in {seen[example_id]}')
        seen[example_id] = shard['file']
      for label, n in zip(*np.unique(labels, return_counts=True)):
        counts[str(label)] = counts.get(str(label), 0) + int(n)
    written = sum(s['count'] for s in info['shards'])
    if written != info['count'] or counts != info['label_counts']:
      raise VerifyError(f'split {split}: read {written} records {counts}, the manifest says '
                        f'{info["count"]} {info["label_counts"]}')
    total += written
    log(f'{split}: {written} records in {len(info["shards"])} shards OK {counts}')
  return total


class CorruptShardError(ValueError):
  """A shard could not be read while training or predicting."""


def first_corrupt_shard(records_dir):
  """The path of the first shard whose bytes differ from the manifest, or None."""
  manifest = schema.load_manifest(records_dir)
  for info in manifest['splits'].values():
    for shard in info['shards']:
      path = os.path.join(records_dir, shard['file'])
      if records.sha256_file(path) != shard['sha256']:
        return path
  return None


@contextlib.contextmanager
def reading(records_dir):
  """Turns a failed read of `records_dir`'s shards into one CorruptShardError line.

  Wraps only code that reads records (not checkpoints, whose errors are
  TensorFlow's too): a corrupt record (DataLossError), a shard shorter than
  the manifest says (assert_cardinality's FailedPreconditionError, or
  schema.ShardCountError from the cache).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    yield
  except (tf.errors.DataLossError, tf.errors.FailedPreconditionError,
          schema.ShardCountError) as e:
    raise CorruptShardError(describe_data_loss(records_dir, e)) from None


def describe_data_loss(records_dir, error):
  """One line for a shard of `records_dir` that could not be read whole.

  TensorFlow says only "corrupted record at 47670"; the checksums in the
  manifest say which shard.
  """
  detail = (getattr(error, 'message', None) or str(error)).splitlines()[0]
  detail = detail.split(' [[')[0].strip()  # Drop TensorFlow's node names.
  try:
    bad = first_corrupt_shard(records_dir)
  except (schema.ManifestError, OSError):
    bad = None
  check = f'check the folder with tools/verify_records.py {records_dir}'
  if bad:
    return f'{bad}: corrupt or truncated shard ({detail}); {check}'
  return f'{records_dir}: a shard could not be read ({detail}); {check}'
