"""The record schema: feature keys, Example encoding, shard names and the manifest.

Writer (tools/make_records.py) and reader (pcam_tfdata/pipeline.py) both take
every name from here, so the two cannot drift apart.
"""

import functools
import json
import re

from pcam_tfdata import fs

IMAGE_KEY = 'image'  # Raw uint8 bytes, H x W x 3, row-major: the exact center crop.
LABEL_KEY = 'label'  # int64: 0 or 1; TEST_LABEL where the label is unknown.
ID_KEY = 'id'  # The Kaggle file stem (40 hex digits) or another stable id.
TEST_LABEL = -1

SPLITS = ('train', 'val', 'test')
MANIFEST_NAME = 'manifest.json'
FORMAT_VERSION = 1
PATCH_SIZE = 96  # PCam patches are 96x96 RGB.

_SHARD_RE = re.compile(r'^(?P<split>[a-z]+)-(?P<index>\d{5})-of-(?P<total>\d{5})\.tfrecord$')


class ManifestError(ValueError):
  """A records folder is missing its manifest or does not match it."""


class ShardCountError(ManifestError):
  """Shards that hold another number of records than the manifest lists."""


def split_rank(name):
  """Sort key of split names: train, val, test, then any other."""
  return SPLITS.index(name) if name in SPLITS else len(SPLITS)


def shard_name(split, index, total):
  """TFDS-style shard file name, e.g. `train-00003-of-00032.tfrecord`."""
  return f'{split}-{index:05d}-of-{total:05d}.tfrecord'


def parse_shard_name(name):
  """Returns (split, index, total) for a shard file name, or None."""
  m = _SHARD_RE.match(name)
  if not m:
    return None
  return m['split'], int(m['index']), int(m['total'])


def _varint(value):
  if value < 0:
    value += 1 << 64  # int64 on the wire: two's complement in ten bytes.
  out = bytearray()
  while True:
    byte = value & 0x7F
    value >>= 7
    if value:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _field(number, payload):
  """A length-delimited protobuf field (wire type 2)."""
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _map_entry(key, feature):
  # Features.feature is map<string, Feature>: each entry is a message with
  # key = field 1 and value = field 2, stored as repeated field 1.
  return _field(1, _field(1, key.encode()) + _field(2, feature))


@functools.lru_cache(maxsize=None)
def _bytes_entry_prefix(key, length):
  """Everything of a bytes feature's map entry before its `length`-byte value."""
  bytes_list = _varint(1 << 3 | 2) + _varint(length)  # BytesList.value = 1.
  feature = _varint(1 << 3 | 2) + _varint(len(bytes_list) + length)  # Feature.bytes_list = 1.
  entry_key = _field(1, key.encode())
  value = _varint(2 << 3 | 2) + _varint(len(feature) + len(bytes_list) + length)
  entry = entry_key + value + feature + bytes_list
  return _varint(1 << 3 | 2) + _varint(len(entry) + length) + entry


@functools.lru_cache(maxsize=None)
def _label_entry(label):
  # Feature.int64_list = 3, Int64List.value = 1 (packed).
  return _map_entry(LABEL_KEY, _field(3, _field(1, _varint(label))))


def encode_example(image, label, example_id):
  """Serializes one record as a `tf.train.Example`, without importing TF.

  The converter runs in worker processes that must not pay TensorFlow's import
  (about 5 s and 700 MB each here); the protobuf wire format of Example is
  small and fixed, and tests check the bytes parse back as TF's own Example.
  Keys are emitted in a fixed order, so the same inputs give the same bytes.
  Everything but the values is cached by value length: this runs 220k times.

  Args:
    image: bytes, the raw uint8 crop.
    label: int, 0, 1 or TEST_LABEL.
    example_id: str, the example id.

  Returns:
    The serialized Example as bytes.
  """
  id_bytes = example_id.encode()
  features = b''.join((_bytes_entry_prefix(ID_KEY, len(id_bytes)), id_bytes,
                       _bytes_entry_prefix(IMAGE_KEY, len(image)), image,
                       _label_entry(label)))
  return _varint(1 << 3 | 2) + _varint(len(features)) + features  # Example.features = 1.


def feature_spec():
  """The parse spec for `tf.io.parse_example`; imports TF only when called."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return {
      IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
      LABEL_KEY: tf.io.FixedLenFeature([], tf.int64),
      ID_KEY: tf.io.FixedLenFeature([], tf.string),
  }


def manifest_header(crop_size):
  """The manifest entries every source writes: format, image shape, crop, keys."""
  return {
      'format_version': FORMAT_VERSION,
      'image_shape': [crop_size, crop_size, 3],
      'crop': {'size': crop_size, 'offset': (PATCH_SIZE - crop_size) // 2,
               'patch_size': PATCH_SIZE},
      'keys': {'image': IMAGE_KEY, 'label': LABEL_KEY, 'id': ID_KEY},
  }


def load_manifest(records_dir):
  """Reads and checks `manifest.json`; refuses a folder without one.

  Args:
    records_dir: a folder written by tools/make_records.py.

  Returns:
    The manifest as a dict.

  Raises:
    ManifestError: the folder or its manifest is missing or malformed, a
      shard it names is absent, or a split's count is not its shards' (nor
      its labels') sum.
  """
  path = fs.join(records_dir, MANIFEST_NAME)
  try:
    names = set(fs.listdir(records_dir)) if fs.isdir(records_dir) else None
    if names is not None and MANIFEST_NAME in names:
      manifest = json.loads(fs.read_text(path))
  except json.JSONDecodeError as e:
    raise ManifestError(f'{path}: unreadable manifest ({e})') from None
  except fs.errors() as e:  # (On a URL, TensorFlow's: no credentials, no bucket.)
    raise ManifestError(f'{path}: unreadable manifest ({fs.error_line(e)})') from None
  if names is None:
    raise ManifestError(f'{records_dir}: no such records folder')
  if MANIFEST_NAME not in names:
    raise ManifestError(
        f'{path}: missing; the folder is not a complete conversion '
        '(run tools/make_records.py)')
  if manifest.get('format_version') != FORMAT_VERSION:
    raise ManifestError(
        f'{path}: format_version {manifest.get("format_version")!r}, '
        f'this code reads {FORMAT_VERSION}')
  for key in ('image_shape', 'splits'):
    if key not in manifest:
      raise ManifestError(f'{path}: no {key!r} entry')
  for split, info in manifest['splits'].items():
    for shard in info.get('shards', ()):
      if shard['file'] not in names:  # (One listing: a bucket answers each request slowly.)
        raise ManifestError(f'{path}: split {split!r} names missing shard {shard["file"]}')
    # The totals a trainer sizes its epochs by, against what the shards hold
    # (as pcam-verify-records checks, without reading them).
    in_shards = sum(shard.get('count', 0) for shard in info.get('shards', ()))
    by_label = sum(info.get('label_counts', {}).values())
    if info.get('count') != in_shards or info.get('count') != by_label:
      raise ManifestError(
          f'{path}: split {split!r} counts {info.get("count")} examples, its shards '
          f'{in_shards} and its labels {by_label}: edited or damaged; convert again '
          '(tools/make_records.py --overwrite)')
  return manifest
