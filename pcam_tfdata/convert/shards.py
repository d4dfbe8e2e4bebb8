"""Writes one TFRecord shard from patch files: decode, center crop, encode, frame.

Each shard is an independent task, so worker processes write shards side by
side with no pixel data crossing process boundaries, and the bytes of a shard
do not depend on how many workers ran. TensorFlow is not imported here: the
TFRecord framing is done by hand (tests check it byte for byte against
`tf.io.TFRecordWriter`).
"""

import collections
import hashlib
import json
import os
import struct

import google_crc32c

from pcam_tfdata.convert import duplicates
from pcam_tfdata.convert import tiff
from pcam_tfdata import records
from pcam_tfdata import schema

_FLUSH_EVERY = 256  # Records per write and hash update, and per progress update.


def _masked_crc(data):
  # TFRecord stores CRC32C rotated right by 15 bits plus a constant, so that
  # the CRC of data that itself contains CRCs does not degenerate.
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(record):
  """A record in TFRecord framing: length, CRC of length, data, CRC of data."""
  length = struct.pack('<Q', len(record))
  return b''.join((length, struct.pack('<I', _masked_crc(length)), record,
                   struct.pack('<I', _masked_crc(record))))


class ShardWriter:
  """One shard: framed records, their SHA-256 and counts, committed by `close`.

  Records go to `<path>.partial`, written 256 at a time; `close` syncs the
  file and renames it to `path`, so a shard under its real name is whole.
  """

  def __init__(self, path):
    self.path = path
    self._file = open(path + '.partial', 'wb')
    self._digest = hashlib.sha256()
    self._pending = []
    self.count = 0
    self.label_counts = collections.Counter()

  def write(self, image, label, example_id):
    self._pending.append(frame_record(schema.encode_example(image, label, example_id)))
    self.count += 1
    self.label_counts[str(label)] += 1
    if len(self._pending) == _FLUSH_EVERY:
      self._flush()

  def _flush(self):
    data = b''.join(self._pending)
    self._file.write(data)
    self._digest.update(data)
    self._pending.clear()

  def close(self):
    """Commits the shard; returns its stats: file, count, sha256, label_counts."""
    self._flush()
    self._file.flush()
    os.fsync(self._file.fileno())
    self._file.close()
    os.replace(self.path + '.partial', self.path)
    return {'file': os.path.basename(self.path), 'count': self.count,
            'sha256': self._digest.hexdigest(),
            'label_counts': dict(sorted(self.label_counts.items()))}


def write_shard(task, progress=None):
  """Writes one shard from patch files; a finished shard is committed by a sidecar.

  The sidecar `<name>.done.json` (stats) is written after the shard's rename;
  a shard without one is redone on resume.

  Args:
    task: dict with `path` (final shard path), `examples` (list of
      (id, label, source_path)), `crop_size`, `patch_size`, `skip_bad`.
    progress: optional shared counter (multiprocessing.Value) of records done.

  Returns:
    The shard's stats: file, count, sha256, label_counts, skipped, and
    `keys` and `crop_keys`, the `duplicates.patch_key` of each example's
    full patch and of its stored crop (NO_KEY for a skipped one), aligned
    with `task['examples']`. With
    `skip_bad` a shard may hold no record; the split as a whole may not
    (checked by the caller).

  Raises:
    tiff.BadImageError: a bad patch, unless `skip_bad`.
  """
  writer = ShardWriter(task['path'])
  skipped, keys, crop_keys = [], [], []
  seen = 0
  def report():
    nonlocal seen
    if progress is not None:
      with progress.get_lock():
        progress.value += seen
    seen = 0
  for example_id, label, source in task['examples']:
    seen += 1
    if seen == _FLUSH_EVERY:
      report()
    try:
      pixels = tiff.read_patch(source, task['patch_size'])
    except (tiff.BadImageError, OSError) as e:
      if not task['skip_bad']:
        raise tiff.BadImageError(str(e)) from None
      skipped.append({'id': example_id, 'reason': str(e)})
      keys.append(duplicates.NO_KEY)
      crop_keys.append(duplicates.NO_KEY)
      continue
    crop = tiff.center_crop(pixels, task['crop_size']).tobytes()
    key, crop_key = duplicates.patch_keys(pixels, task['crop_size'], crop)
    keys.append(key)
    crop_keys.append(crop_key)
    writer.write(crop, label, example_id)
  report()
  stats = writer.close()
  stats['skipped'] = skipped
  stats['keys'] = keys
  stats['crop_keys'] = crop_keys
  write_json_atomic(task['path'] + '.done.json', stats)
  return stats


def load_done(path):
  """The stats of a shard finished by an earlier run, or None if it must be redone."""
  try:
    with open(path + '.done.json') as f:
      stats = json.load(f)
    if (records.sha256_file(path) != stats['sha256'] or 'keys' not in stats
        or 'crop_keys' not in stats):
      return None  # (A sidecar of an older version, without keys or crop keys, too.)
  except (OSError, ValueError, KeyError):
    return None
  return stats


def write_json_atomic(path, obj):
  """Writes JSON so that a reader sees the old file or the whole new one."""
  with open(path + '.tmp', 'w') as f:
    json.dump(obj, f, indent=1)
    f.write('\n')
  os.replace(path + '.tmp', path)



def key_patches(task, progress=None):
  """`duplicates.patch_keys` of each patch file of `task['paths']`.

  Args:
    task: dict with `start` (index of the first path, passed back), `paths`,
      `patch_size`, `crop_size`, `skip_bad`.
    progress: optional shared counter of files done.

  Returns:
    {'start', 'keys', 'crop_keys'}: of the full patches and of their stored
    crops; NO_KEY for a bad patch when `skip_bad` (the shard writer reports
    it if the example is kept).

  Raises:
    tiff.BadImageError: a bad patch, unless `skip_bad`.
  """
  keys, crop_keys = [], []
  for path in task['paths']:
    try:
      key, crop_key = duplicates.patch_keys(tiff.read_patch(path, task['patch_size']),
                                            task['crop_size'])
    except (tiff.BadImageError, OSError) as e:
      if not task['skip_bad']:
        raise tiff.BadImageError(str(e)) from None
      key = crop_key = duplicates.NO_KEY
    keys.append(key)
    crop_keys.append(crop_key)
  if progress is not None:
    with progress.get_lock():
      progress.value += len(task['paths'])
  return {'start': task['start'], 'keys': keys, 'crop_keys': crop_keys}
