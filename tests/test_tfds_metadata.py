"""TFDS opens a records folder: its metadata beside the shards, checked by verify."""

import json
import shutil

import numpy as np
import pytest

from pcam_tfdata.convert import outdir
from pcam_tfdata.convert import tfds_metadata
from pcam_tfdata.training import verify
from pcam_tfdata import records as records_lib
from pcam_tfdata import schema
import pcam_tfdata as pt
from conftest import run_tool

tfds = pytest.importorskip('tensorflow_datasets', reason='tensorflow-datasets is not installed '
                           "(pip install -e '.[test]')")


def _by_tfds(folder, split):
  """{id: (label, image bytes)} of a split as TFDS reads it."""
  builder = tfds.builder_from_directory(str(folder))
  return {ex['id'].decode(): (int(ex['label']), ex['image'].tobytes())
          for ex in tfds.as_numpy(builder.as_dataset(split=split))}


def _by_pipeline(folder, split):
  """{id: (label, image bytes)} of a split as the project's input pipeline reads it."""
  out = {}
  for images, labels, ids in pt.make_dataset(str(folder), split, batch_size=32, training=False,
                                             with_ids=True):
    for image, label, example_id in zip(images.numpy(), labels.numpy(), ids.numpy()):
      out[example_id.decode()] = (int(label), image.tobytes())
  return out


@pytest.fixture
def old_folder(records, tmp_path):
  """A copy of `records` as converted before the TFDS metadata was written."""
  copy = tmp_path / 'rec'
  shutil.copytree(records, copy)
  for name in tfds_metadata.NAMES:
    (copy / name).unlink()
  return copy


def test_tfds_reads_every_split_as_the_pipeline_does(records):
  # Fails if the image is not decoded as our raw bytes (dtype, shape, PNG), a
  # split or shard is missed (the template), or the test split's -1 changes.
  handle = records_lib.Records.open(records)
  builder = tfds.builder_from_directory(str(records))
  assert list(builder.info.splits) == list(handle.splits)
  for split in handle.splits:
    info = builder.info.splits[split]
    assert info.shard_lengths == [s['count'] for s in handle.shards(split)]
    by_tfds = _by_tfds(records, split)
    assert len(by_tfds) == handle.count(split)
    assert by_tfds == _by_pipeline(records, split), split
  assert {label for label, _ in _by_tfds(records, 'test').values()} == {schema.TEST_LABEL}


def test_as_supervised_yields_image_and_label(records):
  builder = tfds.builder_from_directory(str(records))
  image, label = next(iter(builder.as_dataset(split='val', as_supervised=True)))
  assert image.dtype.name == 'uint8' and tuple(image.shape) == tuple(
      records_lib.Records.open(records).image_shape)
  assert label.dtype.name == 'int64' and int(label) in (0, 1)


def test_the_files_are_what_tfds_own_writer_writes(records, tmp_path):
  # Fails if our hand-written JSON drifts from TFDS's (a field renamed or
  # missing, a feature's class moved), which TFDS might still read today.
  manifest = schema.load_manifest(str(records))
  ref = tmp_path / 'ref'
  shutil.copytree(records, ref)
  ours = {name: json.loads((ref / name).read_text()) for name in tfds_metadata.NAMES}
  for name in tfds_metadata.NAMES:
    (ref / name).unlink()
  template = tfds.core.ShardedFileTemplate(
      data_dir=ref, template='{SPLIT}-{SHARD_X_OF_Y}.tfrecord', filetype_suffix='tfrecord',
      dataset_name=tfds_metadata.DATASET_NAME)
  info = ours[tfds_metadata.DATASET_INFO_NAME]
  tfds.folder_dataset.write_metadata(
      data_dir=ref, filename_template=template, version=tfds_metadata.version(), check_data=False,
      features=tfds.features.FeaturesDict({
          'image': tfds.features.Tensor(shape=tuple(manifest['image_shape']), dtype=np.uint8,
                                        encoding=tfds.features.Encoding.BYTES),
          'label': tfds.features.ClassLabel(num_classes=2),
          'id': tfds.features.Text()}),
      split_infos=[tfds.core.SplitInfo(
          name=split, shard_lengths=[s['count'] for s in manifest['splits'][split]['shards']],
          num_bytes=sum((ref / s['file']).stat().st_size
                        for s in manifest['splits'][split]['shards']),
          filename_template=template) for split in manifest['splits']],
      description=info['description'], citation=info['citation'],
      homepage=info['location']['urls'][0], supervised_keys=('image', 'label'))
  for name in tfds_metadata.NAMES:
    assert json.loads((ref / name).read_text()) == ours[name], name


def test_verify_passes_a_fresh_folder(records):
  lines = []
  verify.verify(str(records), log=lines.append)
  # After the shards' lines (a damaged shard is named as one), before the cross-split line.
  assert lines[-2] == ('TFDS metadata: dataset_info.json and features.json match the manifest '
                       '(tfds.builder_from_directory opens it)')


def _edit(folder, name, change):
  path = folder / name
  obj = json.loads(path.read_text())
  change(obj)
  path.write_text(json.dumps(obj))


def _shard_length(obj):
  obj['splits'][0]['shardLengths'][0] = str(int(obj['splits'][0]['shardLengths'][0]) + 1)


def _num_bytes(obj):
  obj['splits'][2]['numBytes'] = str(int(obj['splits'][2]['numBytes']) - 1)


def _template(obj):
  obj['splits'][1]['filepathTemplate'] = '{SPLIT}.tfrecord-{SHARD_X_OF_Y}'


def _image_shape(obj):
  obj['featuresDict']['features']['image']['tensor']['shape']['dimensions'] = ['64', '64', '3']


def _no_supervised_keys(obj):
  del obj['supervisedKeys']


@pytest.mark.parametrize('name, change, said', [
    ('dataset_info.json', _shard_length, "split 'train': shardLengths ["),
    ('dataset_info.json', _template, "split 'val': filepathTemplate '{SPLIT}.tfrecord-"),
    ('dataset_info.json', _num_bytes, "split 'test': numBytes "),
    ('dataset_info.json', _no_supervised_keys, 'supervisedKeys null, the records need'),
    ('features.json', _image_shape, "image shape ['64', '64', '3'], the manifest says [32"),
])
def test_verify_fails_in_one_line_on_metadata_that_disagrees(records, tmp_path, name, change,
                                                             said):
  # Fails if verify takes the metadata on trust: TFDS would read wrong
  # slices, miss shards, or break as_supervised, while the shards verify.
  copy = tmp_path / 'rec'
  shutil.copytree(records, copy)
  _edit(copy, name, change)
  with pytest.raises(tfds_metadata.MetadataError) as e:
    verify.verify(str(copy), log=lambda _: None)
  message = str(e.value)
  assert message.startswith(f'{copy / name}: {said}') and '\n' not in message, message
  assert message.endswith(f'--write_tfds_metadata {copy}')
  assert isinstance(e.value, ValueError)  # The command's one error line and exit 1.


def test_verify_refuses_half_the_metadata(records, tmp_path):
  copy = tmp_path / 'rec'
  shutil.copytree(records, copy)
  (copy / 'features.json').unlink()
  with pytest.raises(tfds_metadata.MetadataError, match='features.json: missing beside '
                     'dataset_info.json'):
    verify.verify(str(copy), log=lambda _: None)


def test_an_old_folder_verifies_saying_how_to_add_it_and_writing_it_makes_it_tfds_readable(
    old_folder):
  # Fails if a folder converted before the metadata stops verifying, or if the
  # writer the command calls (in this process) does not write metadata TFDS reads.
  lines = []
  verify.verify(str(old_folder), log=lines.append)
  assert lines[-2] == ('TFDS metadata: none (converted before it was written); add '
                       'dataset_info.json and features.json with tools/verify_records.py '
                       f'--write_tfds_metadata {old_folder}'), lines
  outdir.write_tfds_metadata(str(old_folder))
  assert tfds_metadata.check(str(old_folder), schema.load_manifest(str(old_folder)))
  assert _by_tfds(old_folder, 'val') == _by_pipeline(old_folder, 'val')


@pytest.mark.slow  # (A TensorFlow process, 8 s, of a default tier near its 4 minutes.)
def test_an_old_folder_verifies_and_the_command_it_names_makes_it_tfds_readable(old_folder):
  # Fails if a folder converted before the metadata stops verifying, or if the
  # command verify names does not write metadata TFDS reads. (One process
  # started, the user's: verify's line is the library's.)
  lines = []
  verify.verify(str(old_folder), log=lines.append)
  assert lines[-2].startswith('TFDS metadata: none'), lines
  command = lines[-2].split(' with ')[-1].split()
  assert command == ['tools/verify_records.py', '--write_tfds_metadata', str(old_folder)]
  proc = run_tool(*command)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines()[-1].startswith(f'wrote {old_folder / "dataset_info.json"} and ')
  assert tfds_metadata.check(str(old_folder), schema.load_manifest(str(old_folder)))
  assert _by_tfds(old_folder, 'val') == _by_pipeline(old_folder, 'val')
