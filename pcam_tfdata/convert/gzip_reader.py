"""A seekable, read-only view of a .gz file, for h5py, without unpacking it to disk."""

import collections
import io
import os
import zlib

BLOCK = 1 << 20  # Decompressed bytes per cached block.
CACHE_BLOCKS = 64
MARK_EVERY = 8 << 20  # Decompressed bytes between saved zlib states.
_INDEX = {}  # (path, size, mtime) -> (decompressed size, marks), per process.


class SeekableGzip(io.RawIOBase):
  """A read-only, seekable view of a .gz file for h5py, without unpacking it.

  HDF5 jumps around (metadata, B-tree nodes), a gzip stream only goes
  forward. While decompressing, a copy of the zlib state is kept every 8 MiB
  of output (about 40 KB each, 40 MB for PCam's 7 GB train_x), so a backward
  seek resumes from the nearest copy instead of from the start of the file;
  recent 1 MiB blocks are cached. h5py asks for the size first, which
  decompresses the file once: that pass also finds a truncated or corrupt
  gzip before anything is written.
  """

  def __init__(self, path, error=ValueError):
    """Opens `path`; a truncated or corrupt stream raises `error(message)`."""
    super().__init__()
    self._path = path
    self._error = error
    self._file = open(path, 'rb')
    self._inflate = zlib.decompressobj(31)  # 31: gzip header and trailer.
    self._head = 0  # Decompressed offset of the start of self._pending.
    self._pending = b''
    stat = os.fstat(self._file.fileno())
    self._key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    # Size and marks of a file opened before (the checks open each file
    # once, the conversion again) spare a second pass over all of it.
    self._size, self._marks = _INDEX.get(self._key, (None, None))
    if self._marks is None:
      self._marks = [(0, 0, self._inflate.copy())]  # (output offset, input offset, state)
    self._cache = collections.OrderedDict()
    self._pos = 0

  def readable(self):
    return True

  def seekable(self):
    return True

  def tell(self):
    return self._pos

  def _more(self):
    """Decompresses the next piece into self._pending; False at the end."""
    if self._inflate.eof:
      rest = self._inflate.unused_data
      if not rest:
        rest = self._file.read(1 << 16)
        if not rest:
          return False
      self._inflate = zlib.decompressobj(31)  # The next member of a multi-member file.
    else:
      rest = self._file.read(1 << 16)
      if not rest:
        raise self._error(f'{self._path}: truncated gzip (ends at {self._head:,} '
                          'decompressed bytes)')
    try:
      self._pending = self._inflate.decompress(rest)
    except zlib.error as e:
      raise self._error(f'{self._path}: corrupt gzip ({e})') from None
    end = self._head + len(self._pending)
    if end - self._marks[-1][0] >= MARK_EVERY:
      self._marks.append((end, self._file.tell(), self._inflate.copy()))
    return True

  def _advance_to(self, offset):
    """Moves the stream so that self._pending starts at `offset` (or ends before)."""
    # Backward, or far forward past a mark: resume from the last mark before it.
    out, inp, state = max((m for m in self._marks if m[0] <= offset), key=lambda m: m[0])
    if offset < self._head or out > self._head + len(self._pending):
      self._file.seek(inp)
      self._inflate, self._head, self._pending = state.copy(), out, b''
    while offset >= self._head + len(self._pending):
      self._head += len(self._pending)
      self._pending = b''
      if not self._more():
        return
    cut = offset - self._head
    self._pending, self._head = self._pending[cut:], offset

  def _block(self, index):
    if index in self._cache:
      self._cache.move_to_end(index)
      return self._cache[index]
    start = index * BLOCK
    self._advance_to(start)
    parts, have = [], 0
    while have < BLOCK and self._head == start + have:
      take = self._pending[:BLOCK - have]
      if not take:
        if not self._more():
          break
        continue
      parts.append(take)
      have += len(take)
      self._pending, self._head = self._pending[len(take):], self._head + len(take)
    data = b''.join(parts)
    self._cache[index] = data
    if len(self._cache) > CACHE_BLOCKS:
      self._cache.popitem(last=False)
    return data

  def _length(self):
    if self._size is None:
      self._advance_to(self._marks[-1][0])
      while True:
        self._head += len(self._pending)
        self._pending = b''
        if not self._more():
          break
      self._size = self._head
      _INDEX[self._key] = (self._size, self._marks)
    return self._size

  def seek(self, offset, whence=io.SEEK_SET):
    base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos}.get(whence)
    self._pos = (self._length() if base is None else base) + offset
    return self._pos

  def readinto(self, buffer):
    view = memoryview(buffer).cast('B')
    filled = 0
    while filled < len(view):
      index, start = divmod(self._pos, BLOCK)
      chunk = self._block(index)[start:start + len(view) - filled]
      if not chunk:
        break
      view[filled:filled + len(chunk)] = chunk
      filled += len(chunk)
      self._pos += len(chunk)
    return filled

  def close(self):
    self._file.close()
    super().close()
