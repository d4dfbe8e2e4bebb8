"""A whole split read into one tensor per field, at about 1x its bytes: the training cache.

Records are parsed 1,024 at a time and copied into arrays allocated once;
the image array becomes a tensor without a copy (DLPack). Building the same
tensor with tf.data (`unbatch().batch(count)`, then `cache`) peaked at 3.1x
the split's bytes.
"""

import os

import numpy as np
import tensorflow as tf

from pcam_tfdata import schema
from pcam_tfdata.training import augment

PARSE_BATCH = 1024  # Records parsed per op; also the eval cache's element size.
READ_BUFFER = 8 << 20  # Bytes each shard reader asks for at a time.


def aligned_empty(shape, dtype, alignment=64):
  """np.empty whose data starts on an `alignment`-byte boundary, as TF's kernels require."""
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape)) * dtype.itemsize
  raw = np.empty(nbytes + alignment, np.uint8)
  offset = -raw.ctypes.data % alignment
  return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def load_split(paths, count, parse, variants=False):
  """Reads shards into one tensor per field, [count, ...], at about 1x their bytes.

  Args:
    paths: shard files, read in this order.
    count: records they hold (from the manifest).
    parse: serialized [N] -> tuple of fields, [N, ...] each; images first.
    variants: the images field holds the 8 dihedral variants of every image,
      [8 * count, ...], variant t of image i at t * count + i
      (`augment.dihedral_variants`): 8x the images' bytes, at a peak of 9x.

  Returns:
    A tuple of tensors in the order `parse` returns its fields.

  Raises:
    schema.ShardCountError: the shards hold another number of records.
  """
  fields = _read_fields(paths, count, parse)
  if fields is None:
    raise schema.ShardCountError(f'{os.path.dirname(paths[0])}: its shards hold another '
                                 f'number of records than the {count} manifest.json lists')
  images = fields[0]
  if variants:
    images = aligned_empty((augment.NUM_DIHEDRAL, *fields[0].shape), np.uint8)
    augment.dihedral_variants(fields[0], images)
    fields[0] = None  # Variant 0 is the image itself: one copy fewer at the peak.
    images = images.reshape(-1, *images.shape[2:])
  first = tf.experimental.dlpack.from_dlpack(images.__dlpack__())  # No copy.
  return (first, *(tf.constant(f) for f in fields[1:]))


def _read_fields(paths, count, parse):
  """The parsed fields of exactly `count` records as NumPy arrays, or None for another count."""
  reader = tf.data.TFRecordDataset(paths, buffer_size=READ_BUFFER).batch(PARSE_BATCH)
  reader = reader.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  fields, filled = None, 0
  for chunk in reader:
    arrays = [c.numpy() for c in chunk]
    if fields is None:
      fields = [np.empty(count, object) if a.dtype == object else
                aligned_empty((count, *a.shape[1:]), a.dtype) for a in arrays]
    n = len(arrays[0])
    if filled + n > count:
      return None
    for field, array in zip(fields, arrays):
      field[filled:filled + n] = array
    filled += n
  return fields if filled == count else None
