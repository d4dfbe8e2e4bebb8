"""The seekable gzip reader behind `.h5.gz` files (needs no h5py)."""

import gzip
import os

import numpy as np
import pytest

from pcam_tfdata.convert import gzip_reader


@pytest.mark.parametrize('members', [1, 2])
def test_seekable_gzip_reads_any_range(tmp_path, monkeypatch, members):
  monkeypatch.setattr(gzip_reader, 'MARK_EVERY', 1 << 16)  # Many saved states on a small file.
  rng = np.random.default_rng(members)
  raw = (np.arange(3 << 20) % 251).astype(np.uint8).tobytes() + rng.bytes(1 << 20)
  path = tmp_path / 'data.gz'
  with open(path, 'wb') as f:  # Several members, as `cat a.gz b.gz` makes.
    for part in np.array_split(np.frombuffer(raw, np.uint8), members):
      f.write(gzip.compress(part.tobytes()))
  reader = gzip_reader.SeekableGzip(str(path))
  assert reader.seek(0, os.SEEK_END) == len(raw)
  for _ in range(200):
    offset, size = int(rng.integers(0, len(raw))), int(rng.integers(1, 1 << 21))
    reader.seek(offset)
    buffer = bytearray(size)
    got = reader.readinto(buffer)
    assert bytes(buffer[:got]) == raw[offset:offset + size]
  assert len(reader._marks) > 5
