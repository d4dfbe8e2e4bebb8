"""Re-reads a records folder and checks it against its manifest, record by record."""

import collections
import contextlib
import hashlib

import numpy as np

from pcam_tfdata.convert import tfds_metadata
from pcam_tfdata import fs
from pcam_tfdata import records as records_lib
from pcam_tfdata import schema


class VerifyError(ValueError):
  """The records folder does not match its manifest or its schema."""


def _read_shard(path, image_bytes):
  """(ids, labels, image digests) of every record of a shard, checking each image's size."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  spec = schema.feature_spec()
  ds = tf.data.TFRecordDataset(path).batch(4096).map(lambda x: tf.io.parse_example(x, spec))
  ids, labels, digests = [], [], []
  name = fs.basename(path)
  try:
    for batch in ds:
      sizes = tf.strings.length(batch[schema.IMAGE_KEY]).numpy()
      if (sizes != image_bytes).any():
        bad = int(np.flatnonzero(sizes != image_bytes)[0])
        raise VerifyError(f'{name}: record {len(ids) + bad} has a {sizes[bad]}-byte image, '
                          f'expected {image_bytes}')
      ids.extend(i.decode() for i in batch[schema.ID_KEY].numpy())
      labels.append(batch[schema.LABEL_KEY].numpy())
      digests.extend(hashlib.sha256(b).digest() for b in batch[schema.IMAGE_KEY].numpy())
  except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
    raise VerifyError(f'{name}: corrupt after {len(ids)} records ({e.message.splitlines()[0]})') from None
  return ids, np.concatenate(labels) if labels else np.zeros(0, np.int64), digests


def verify(records, log=print, check_tfds_metadata=True):
  """Checks every shard: checksum, record count, schema, labels, id uniqueness.

  Args:
    records: a records.Records, or the path of a folder written by
      tools/make_records.py.
    log: where a line per split goes.
    check_tfds_metadata: also check TFDS's `dataset_info.json` and
      `features.json` against the manifest, once the shards verify (so that
      a damaged shard is named as one); a folder without them (converted
      before they were written) passes, with a line saying how to add them.
      False when they are about to be rewritten.

  Returns:
    Total number of records checked. A last line reports the groups of
    records whose stored images are identical and sit in more than one
    split (at crop 96 the full patches; else the crops, which the model sees).

  Raises:
    schema.ManifestError: no or malformed manifest; tfds_metadata.MetadataError
      (one): TFDS metadata that disagrees with it.
    VerifyError: the first mismatch found, naming the shard or id.
  """
  records = records_lib.Records.of(records)
  image_bytes = int(np.prod(records.image_shape))
  listed = {s['file'] for _, s, _ in records.all_shards()}
  stray = sorted(f for f in fs.listdir(records.path)
                 if f.endswith('.tfrecord') and f not in listed)
  if stray:
    raise VerifyError(f'{fs.join(records.path, stray[0])}: shard not in the manifest')
  seen = {}
  by_digest = collections.defaultdict(list)  # Image digest -> [(split, id)].
  for split in records.splits:
    counts = {}
    for shard, path in zip(records.shards(split), records.shard_paths(split)):
      labels = _check_shard(path, shard, split, image_bytes, seen, by_digest)
      for label, n in zip(*np.unique(labels, return_counts=True)):
        counts[str(label)] = counts.get(str(label), 0) + int(n)
    written = sum(s['count'] for s in records.shards(split))
    if written != records.count(split) or counts != records.label_counts(split):
      raise VerifyError(f'split {split}: read {written} records {counts}, the manifest says '
                        f'{records.count(split)} {records.label_counts(split)}')
    log(f'{split}: {written} records in {len(records.shards(split))} shards OK {counts}')
  if check_tfds_metadata:  # After the shards: a damaged shard is named as such, not as
    log(_tfds_metadata_line(records))  # a size the metadata disagrees with.
  log(cross_split_line(by_digest.values(), records.image_shape))
  return sum(records.count(s) for s in records.splits)


def _tfds_metadata_line(records):
  """The line on the folder's TFDS metadata, checked against the manifest.

  Raises:
    tfds_metadata.MetadataError: it disagrees with the manifest.
  """
  names = ' and '.join(tfds_metadata.NAMES)
  if tfds_metadata.check(records.path, records.manifest):
    return f'TFDS metadata: {names} match the manifest (tfds.builder_from_directory opens it)'
  if fs.is_url(records.path):  # (The command writes local folders only.)
    return (f'TFDS metadata: none (converted before it was written); add {names} to the local '
            'folder this was copied from (tools/verify_records.py --write_tfds_metadata '
            'LOCAL_FOLDER), then copy the two files over')
  return (f'TFDS metadata: none (converted before it was written); add {names} with '
          f'tools/verify_records.py --write_tfds_metadata {records.path}')


def _check_shard(path, shard, split, image_bytes, seen, by_digest):
  """Checks one shard against its manifest entry; returns its labels.

  Adds each record's id to `seen` ({id: shard file}) and its image digest
  to `by_digest`.
  """
  if records_lib.sha256_file(path) != shard['sha256']:
    raise VerifyError(f'{path}: sha256 differs from the manifest')
  ids, labels, digests = _read_shard(path, image_bytes)
  if len(ids) != shard['count']:
    raise VerifyError(f'{path}: {len(ids)} records, the manifest says {shard["count"]}')
  # Kaggle's test labels are unknown (-1); PCam's HDF5 test split has them.
  allowed = (schema.TEST_LABEL, 0, 1) if split == 'test' else (0, 1)
  if not np.isin(labels, allowed).all():
    raise VerifyError(f'{path}: label {labels[~np.isin(labels, allowed)][0]} in split '
                      f'{split} (allowed: {allowed})')
  for example_id, digest in zip(ids, digests):
    by_digest[digest].append((split, example_id))
    if example_id in seen:
      raise VerifyError(f'{path}: id {example_id} also in {seen[example_id]}')
    seen[example_id] = shard['file']
  return labels


def cross_split_line(groups, image_shape):
  """One line on the groups of identical images that span splits.

  Args:
    groups: lists of (split, id) whose stored images are identical.
    image_shape: the records' [height, width, channels].
  """
  what = 'full patches' if image_shape[0] == schema.PATCH_SIZE else (
      f'{image_shape[0]}x{image_shape[1]} crops')
  across = sorted((sorted(g, key=lambda m: m[1]) for g in groups
                   if len({s for s, _ in g}) > 1), key=lambda g: g[0][1])
  if not across:
    return f'cross-split duplicates: none (no identical stored {what} in two splits)'
  pairs = collections.Counter('/'.join(sorted({s for s, _ in g}, key=schema.split_rank))
                              for g in across)
  example = ', '.join(f'{i} ({s})' for s, i in across[0][:3])
  return (f'cross-split duplicates: {len(across)} groups of identical stored {what} in more '
          f'than one split ({", ".join(f"{n} {p}" for p, n in sorted(pairs.items()))}), '
          f'e.g. {example}')


class CorruptShardError(ValueError):
  """A shard could not be read while training or predicting."""


@contextlib.contextmanager
def reading(records):
  """Turns a failed read of `records`' shards into one CorruptShardError line.

  `records` is a records.Records.

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
    raise CorruptShardError(describe_data_loss(records, e)) from None


def describe_data_loss(records, error):
  """One line for a shard of `records` (a records.Records) that could not be read whole.

  TensorFlow says only "corrupted record at 47670"; the checksums in the
  manifest say which shard.
  """
  detail = fs.error_line(error)
  detail = detail.split(' [[')[0].strip()  # Drop TensorFlow's node names.
  bad = records.first_corrupt_shard()
  check = f'check the folder with tools/verify_records.py {records.path}'
  if bad:
    return f'{bad}: corrupt or truncated shard ({detail}); {check}'
  return f'{records.path}: a shard could not be read ({detail}); {check}'
