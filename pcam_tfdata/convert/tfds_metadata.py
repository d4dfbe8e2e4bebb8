"""TFDS metadata beside the shards, so that `tfds.builder_from_directory` opens a records folder.

TFDS reads a folder of its own through two JSON files: `dataset_info.json`
(splits, shard lengths, file-name template, supervised keys) and
`features.json` (how to decode each feature). They are written here, without
TFDS or TensorFlow, in exactly the JSON that TFDS's own writer
(`tfds.folder_dataset.write_metadata`) produces for these records
(tests/test_tfds_metadata.py compares the two), from the manifest alone: the
schema's keys, its image shape and each shard's count. The shards keep their
names; TFDS's template `{SPLIT}-{SHARD_X_OF_Y}.tfrecord` spells
`schema.shard_name`.

    ds = tfds.builder_from_directory('records/demo').as_dataset('val', as_supervised=True)
"""

import json
import os
import re

from pcam_tfdata import fs
from pcam_tfdata import schema

DATASET_INFO_NAME = 'dataset_info.json'
FEATURES_NAME = 'features.json'
NAMES = (DATASET_INFO_NAME, FEATURES_NAME)
TMP_NAMES = tuple(f'{name}.tmp' for name in NAMES)  # Each written there, then renamed.
FILE_TEMPLATE = '{SPLIT}-{SHARD_X_OF_Y}.tfrecord'  # schema.shard_name, in TFDS's words.
DATASET_NAME = 'pcam_tfdata'  # Not TFDS's `patch_camelyon`: other splits, a crop, -1 labels.
HOMEPAGE = 'https://github.com/basveeling/pcam'
CITATION = """@inproceedings{Veeling2018-qh,
  title = {Rotation Equivariant {CNNs} for Digital Pathology},
  author = {Veeling, Bastiaan S. and Linmans, Jasper and Winkens, Jim and Cohen, Taco and
            Welling, Max},
  booktitle = {Medical Image Computing and Computer Assisted Intervention (MICCAI)},
  year = {2018},
  doi = {10.1007/978-3-030-00934-2_24},
  eprint = {1806.03962},
  archivePrefix = {arXiv}
}"""
_TFDS = 'tensorflow_datasets.core.features.'  # Where TFDS finds each feature's class.


class MetadataError(schema.ManifestError):
  """TFDS metadata that disagrees with the manifest, or half of it missing."""


def version():
  """The TFDS version of the records: the manifest's format version, as x.y.z."""
  return f'{schema.FORMAT_VERSION}.0.0'


def features(image_shape):
  """`features.json` as a dict: a FeaturesDict of the schema's three keys.

  The image is a `tfds.features.Tensor` with encoding `bytes`, which TFDS
  decodes with `tf.io.decode_raw` and a reshape to `image_shape`: exactly
  the raw H x W x 3 uint8 bytes the records hold (no PNG). The label is a
  `ClassLabel` of 2 classes, whose decoder passes -1 through: TFDS's own
  "no label" (its encoder accepts -1 for that), the schema's TEST_LABEL.
  """
  image = {'pythonClassName': _TFDS + 'tensor_feature.Tensor',
           'tensor': {'dtype': 'uint8', 'encoding': 'bytes',
                      'shape': {'dimensions': [str(d) for d in image_shape]}}}
  label = {'classLabel': {'numClasses': '2'},
           'pythonClassName': _TFDS + 'class_label_feature.ClassLabel'}
  example_id = {'pythonClassName': _TFDS + 'text_feature.Text', 'text': {}}
  return {'featuresDict': {'features': {schema.IMAGE_KEY: image, schema.LABEL_KEY: label,
                                        schema.ID_KEY: example_id}},
          'pythonClassName': _TFDS + 'features_dict.FeaturesDict'}


def _description(image_shape):
  size = image_shape[0]
  crop = ('the whole 96x96 patch' if size == schema.PATCH_SIZE else
          f'the centre {size}x{size} crop of each 96x96 patch')
  return (f'PatchCamelyon (PCam) patches of lymph node sections, as written by pcam_tfdata: '
          f'{schema.IMAGE_KEY}, {crop} (raw uint8 RGB); {schema.LABEL_KEY}, 1 when the '
          f'centre 32x32 region holds tumour tissue, 0 when not, {schema.TEST_LABEL} where '
          f'unknown (Kaggle\'s test patches); {schema.ID_KEY}, the patch\'s id. The '
          f'{schema.MANIFEST_NAME} beside it lists counts, checksums and settings.')


def _shards_by_index(info):
  """A split's manifest shard entries in TFDS's order, by index (zero-padded: by name)."""
  return sorted(info['shards'], key=lambda s: s['file'])


def dataset_info(manifest, shard_bytes):
  """`dataset_info.json` as a dict.

  Args:
    manifest: the records' manifest.
    shard_bytes: {shard file: size in bytes}.
  """
  splits = []
  for split, info in manifest['splits'].items():
    shards = _shards_by_index(info)
    splits.append({'filepathTemplate': FILE_TEMPLATE, 'name': split,
                   'numBytes': str(sum(shard_bytes[s['file']] for s in shards)),
                   'shardLengths': [str(s['count']) for s in shards]})
  return {
      'citation': CITATION,
      'description': _description(manifest['image_shape']),
      'fileFormat': 'tfrecord',
      'location': {'urls': [HOMEPAGE]},
      'name': DATASET_NAME,
      'splits': splits,
      'supervisedKeys': {'tuple': {'items': [{'featureKey': schema.IMAGE_KEY},
                                             {'featureKey': schema.LABEL_KEY}]}},
      'version': version(),
  }


def _to_json(name, obj):
  # As TFDS writes them: dataset_info.json by protobuf's MessageToJson (indent 2),
  # features.json by json.dumps with indent 4; keys sorted, no final newline.
  return json.dumps(obj, indent=2 if name == DATASET_INFO_NAME else 4, sort_keys=True)


def _shard_bytes(records_dir, manifest):
  return {s['file']: fs.size(fs.join(records_dir, s['file']))
          for info in manifest['splits'].values() for s in info['shards']}


def expected(records_dir, manifest):
  """{file name: dict} of the metadata the folder's manifest and shards call for."""
  return {DATASET_INFO_NAME: dataset_info(manifest, _shard_bytes(records_dir, manifest)),
          FEATURES_NAME: features(manifest['image_shape'])}


def write(records_dir, manifest):
  """Writes (or replaces) both files in `records_dir`, each atomically.

  A conversion calls it before the manifest, whose presence still means the
  folder is complete.

  Args:
    records_dir: the folder holding the shards `manifest` lists.
    manifest: its manifest, as a dict.
  """
  for name, obj in expected(records_dir, manifest).items():
    path = os.path.join(records_dir, name)
    with open(path + '.tmp', 'w') as f:
      f.write(_to_json(name, obj))
    os.replace(path + '.tmp', path)


def resolve(template, split, index, total):
  """The file a TFDS `filepathTemplate` names for shard `index` of `total`.

  As TFDS's `ShardedFileTemplate`: shard numbers take max(5, digits of
  `total`) digits.

  Raises:
    KeyError: a variable TFDS would not fill for these records.
  """
  digits = max(5, len(str(total)))
  x, y = f'{index:0{digits}d}', f'{total:0{digits}d}'
  return template.format(SPLIT=split, SHARD_INDEX=x, NUM_SHARDS=y, SHARD_X_OF_Y=f'{x}-of-{y}',
                         FILEFORMAT='tfrecord', DATASET=DATASET_NAME)


def check(records_dir, manifest):
  """Checks the folder's TFDS metadata against its manifest and shard sizes.

  Only what decides how TFDS reads the shards is checked: splits, shard
  lengths and bytes, the file template (it must name the listed shards),
  file format, supervised keys, version and features; not the prose.

  Args:
    records_dir: a records folder.
    manifest: its manifest, as a dict.

  Returns:
    True when both files are there and agree; False when neither is (a
    folder converted before they were written).

  Raises:
    MetadataError: one file missing, unreadable, or disagreeing, naming it.
  """
  paths = {name: fs.join(records_dir, name) for name in NAMES}
  present = [name for name in NAMES if fs.isfile(paths[name])]
  if not present:
    return False
  rewrite = (f'rewrite both from the manifest with tools/verify_records.py '
             f'--write_tfds_metadata {records_dir}')
  if len(present) == 1:
    (missing,) = set(NAMES) - set(present)
    raise MetadataError(f'{paths[missing]}: missing beside {present[0]}; {rewrite}')
  want = expected(records_dir, manifest)
  for name in NAMES:
    try:
      got = json.loads(fs.read_text(paths[name]))
    except (OSError, ValueError) as e:
      raise MetadataError(f'{paths[name]}: unreadable ({e}); {rewrite}') from None
    problem = (_info_problem(got, want[name], manifest) if name == DATASET_INFO_NAME
               else _features_problem(got, want[name], manifest))
    if problem:
      raise MetadataError(f'{paths[name]}: {problem}; {rewrite}')
  return True


def _info_problem(got, want, manifest):
  """What in a `dataset_info.json` disagrees with `want`, in a few words, or None."""
  if not isinstance(got, dict):
    return 'not a JSON object'
  for key in ('fileFormat', 'supervisedKeys'):
    if got.get(key) != want[key]:
      return f'{key} {json.dumps(got.get(key))}, the records need {json.dumps(want[key])}'
  if not re.fullmatch(r'\d+\.\d+\.\d+', str(got.get('version'))):
    return f'version {got.get("version")!r} is not x.y.z'
  splits = {s.get('name'): s for s in got.get('splits', ()) if isinstance(s, dict)}
  if set(splits) != set(manifest['splits']):
    return f'splits {sorted(map(str, splits))}, the manifest has {sorted(manifest["splits"])}'
  for split_want in want['splits']:
    split = split_want['name']
    problem = _split_problem(splits[split], split_want,
                             _shards_by_index(manifest['splits'][split]))
    if problem:
      return f'split {split!r}: {problem}'
  return None


def _split_problem(got, want, shards):
  """What in one split's entry disagrees with `want` and its `shards` (by index), or None."""
  lengths = got.get('shardLengths')
  if lengths != want['shardLengths']:
    return f'shardLengths {lengths}, the manifest says {want["shardLengths"]}'
  if got.get('numBytes') != want['numBytes']:
    return f'numBytes {got.get("numBytes")}, its shards hold {want["numBytes"]}'
  template = got.get('filepathTemplate')
  try:
    names = [resolve(template, want['name'], i, len(shards)) for i in range(len(shards))]
  except (AttributeError, KeyError, IndexError, ValueError):
    return f'filepathTemplate {template!r} is not one TFDS fills for these shards'
  for name, shard in zip(names, shards):
    if name != shard['file']:
      return f'filepathTemplate {template!r} names {name}, the manifest lists {shard["file"]}'
  return None


def _features_problem(got, want, manifest):
  """What in a `features.json` disagrees with `want`, in a few words, or None."""
  if got == want:
    return None
  try:
    shape = got['featuresDict']['features'][schema.IMAGE_KEY]['tensor']['shape']['dimensions']
  except (KeyError, TypeError):
    shape = None
  if shape is not None and shape != [str(d) for d in manifest['image_shape']]:
    return f'image shape {shape}, the manifest says {manifest["image_shape"]}'
  h, w, c = manifest['image_shape']
  return (f'not the records\' features ({schema.IMAGE_KEY}: {h}x{w}x{c} uint8 raw bytes, '
          f'{schema.LABEL_KEY}: ClassLabel of 2, {schema.ID_KEY}: Text)')
