"""The hand-written Example encoding and TFRecord framing against TensorFlow's own."""

import json
import shutil

import numpy as np
import pytest
import tensorflow as tf

from pcam_tfdata.convert import shards
from pcam_tfdata import records as records_lib
from pcam_tfdata import schema


def _tf_example(image, label, example_id):
  feature = {
      schema.IMAGE_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
      schema.LABEL_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
      schema.ID_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[example_id.encode()])),
  }
  return tf.train.Example(features=tf.train.Features(feature=feature))


CASES = [(bytes(range(256)) * 12, 1, 'a' * 40), (b'\x00' * 3, 0, 'x'),
         (b'\xff' * 27648, schema.TEST_LABEL, 'pcam-test-000123'), (b'', 1, '')]


@pytest.mark.parametrize('image, label, example_id', CASES)
def test_encode_example_parses_as_tf_example(image, label, example_id):
  encoded = schema.encode_example(image, label, example_id)
  assert tf.train.Example.FromString(encoded) == _tf_example(image, label, example_id)


def test_parse_example_reads_a_batch():
  batch = [schema.encode_example(i, l, n) for i, l, n in CASES[:3]]
  parsed = tf.io.parse_example(tf.constant(batch), schema.feature_spec())
  assert [x.decode() for x in parsed[schema.ID_KEY].numpy()] == [c[2] for c in CASES[:3]]
  np.testing.assert_array_equal(parsed[schema.LABEL_KEY].numpy(), [c[1] for c in CASES[:3]])
  assert [x for x in parsed[schema.IMAGE_KEY].numpy()] == [c[0] for c in CASES[:3]]


def test_framing_is_byte_identical_to_tf_writer(tmp_path):
  payloads = [schema.encode_example(i, l, n) for i, l, n in CASES] + [b'', b'z' * 100000]
  reference = tmp_path / 'tf.tfrecord'
  with tf.io.TFRecordWriter(str(reference)) as writer:
    for p in payloads:
      writer.write(p)
  assert b''.join(shards.frame_record(p) for p in payloads) == reference.read_bytes()


def test_shard_names_round_trip():
  assert schema.shard_name('train', 3, 32) == 'train-00003-of-00032.tfrecord'
  assert schema.parse_shard_name('train-00003-of-00032.tfrecord') == ('train', 3, 32)
  assert schema.parse_shard_name('train-3-of-32.tfrecord') is None


def test_load_manifest_refuses_a_folder_without_one(tmp_path):
  with pytest.raises(schema.ManifestError, match='manifest.json: missing'):
    schema.load_manifest(str(tmp_path))
  with pytest.raises(schema.ManifestError, match='no such records folder'):
    schema.load_manifest(str(tmp_path / 'absent'))


@pytest.mark.parametrize('field', ['count', 'label_counts'])
def test_a_split_total_that_disagrees_with_its_shards_is_refused_in_one_line(records, tmp_path,
                                                                              field):
  """What a trainer sizes its epochs by must be what the shards hold (an edited manifest)."""
  copy = tmp_path / 'rec'
  shutil.copytree(records, copy)
  manifest = json.loads((copy / schema.MANIFEST_NAME).read_text())
  train = manifest['splits']['train']
  if field == 'count':
    train['count'] += 1
  else:
    train['label_counts']['0'] += 1
  (copy / schema.MANIFEST_NAME).write_text(json.dumps(manifest))
  count, by_label = train['count'], sum(train['label_counts'].values())
  with pytest.raises(schema.ManifestError) as e:
    records_lib.Records.open(str(copy))
  assert str(e.value) == (
      f"{copy / schema.MANIFEST_NAME}: split 'train' counts {count} examples, its shards "
      f"{sum(s['count'] for s in train['shards'])} and its labels {by_label}: edited or damaged; "
      'convert again (tools/make_records.py --overwrite)')
