"""One handle on a records folder: its manifest read once, and everything readers ask of it.

The trainer, the input pipeline, `predict`, `verify` and the benchmarks all
take a `Records` (or open one from a path): the image shape, the counts,
each split's shard files (all of them, or one input pipeline's share) and
the checksums that name a damaged shard. TensorFlow-free, so an entry point
can open it, and fail on a wrong folder, before TensorFlow starts.

    records = Records.open('records/demo')
    records.image_shape            # (32, 32, 3)
    records.count('train')         # 3888
    records.shard_paths('train', num_pipelines=2, pipeline_id=1)
"""

import hashlib

from pcam_tfdata import fs
from pcam_tfdata import schema


class Records:
  """A records folder written by tools/make_records.py; see the module docstring.

  Example:

    import pcam_tfdata as pt
    records = pt.Records.open('records/demo')   # Reads manifest.json, once.
    records.image_shape, records.count('val')  # ((32, 32, 3), 972)
    ds = pt.make_dataset(records, 'val', batch_size=256, training=False)

  Attributes:
    path: the folder, as given.
    manifest: its manifest.json, as a dict (read once, at `open`).
    image_shape: (height, width, channels) of every stored image.
  """

  def __init__(self, path, manifest):
    self.path = str(path)
    self.manifest = manifest
    self.image_shape = tuple(manifest['image_shape'])

  @classmethod
  def open(cls, path):
    """Reads and checks the manifest (every shard it lists must exist).

    Raises:
      schema.ManifestError: no such folder, no or a malformed manifest, or
        a listed shard missing.
    """
    return cls(path, schema.load_manifest(str(path)))

  @classmethod
  def of(cls, records):
    """`records` itself if it is a Records, else the folder at that path, opened."""
    return records if isinstance(records, cls) else cls.open(records)

  def __repr__(self):
    counts = ', '.join(f'{s}={self.count(s)}' for s in self.splits)
    return f'Records({self.path!r}, {list(self.image_shape)}, {counts})'

  @property
  def splits(self):
    """Split names, in manifest order (train, val, and test when there is one)."""
    return tuple(self.manifest['splits'])

  def _split(self, split):
    if split not in self.manifest['splits']:
      raise schema.ManifestError(
          f'{fs.join(self.path, schema.MANIFEST_NAME)}: no split {split!r} '
          f'(has {", ".join(self.splits)})')
    return self.manifest['splits'][split]

  def count(self, split):
    """Examples in `split`.

    Raises:
      schema.ManifestError: no such split (so for every method below).
    """
    return self._split(split)['count']

  def label_counts(self, split):
    """{label as str: examples} of `split`."""
    return dict(self._split(split)['label_counts'])

  def shards(self, split, num_pipelines=1, pipeline_id=0):
    """Manifest entries (`file`, `count`, `sha256`) of a split's shards, in manifest order.

    With several input pipelines, pipeline `pipeline_id` of `num_pipelines`
    gets every num_pipelines-th shard from its own index on, so the
    pipelines read disjoint shards that together cover the split.

    Raises:
      ValueError: fewer shards than input pipelines (a pipeline would read nothing).
    """
    shards = self._split(split)['shards']
    if num_pipelines > 1:
      if len(shards) < num_pipelines:
        raise ValueError(f'{self.path}: split {split!r} has {len(shards)} shards, fewer than '
                         f'{num_pipelines} input pipelines; rerun tools/make_records.py with '
                         f'--num_shards={num_pipelines} or more')
      shards = shards[pipeline_id::num_pipelines]
    return list(shards)

  def shard_paths(self, split, num_pipelines=1, pipeline_id=0):
    """Full paths of `shards(split, ...)`."""
    return [fs.join(self.path, s['file'])
            for s in self.shards(split, num_pipelines, pipeline_id)]

  def steps_per_epoch(self, split, batch_size, num_pipelines=1):
    """Batches of `batch_size` that every input pipeline can serve in one epoch.

    Pipelines read different shards and so hold different counts;
    synchronous training takes the same number of steps on each, the
    smallest.
    """
    shards = self._split(split)['shards']
    counts = [sum(s['count'] for s in shards[i::num_pipelines]) for i in range(num_pipelines)]
    return min(counts) // batch_size

  def all_shards(self):
    """(split, manifest entry, full path) of every shard of every split."""
    return [(split, s, fs.join(self.path, s['file']))
            for split in self.splits for s in self.manifest['splits'][split]['shards']]

  def first_corrupt_shard(self):
    """The path of the first shard that is gone or whose SHA-256 differs from the manifest's."""
    for _, shard, path in self.all_shards():
      try:
        if sha256_file(path) != shard['sha256']:
          return path
      except fs.errors():
        return path
    return None


def sha256_file(path):
  """Hex SHA-256 of a file (local or a URL), read in 1 MiB blocks."""
  digest = hashlib.sha256()
  with fs.open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()
