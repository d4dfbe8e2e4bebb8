"""One writer per folder: the lock a run holds on its --model_dir, a conversion on its --out_dir.

A POSIX record lock (`fcntl.lockf`) on a lock file: the kernel (or, on NFS,
the server's lock manager) releases it when its holder dies, so a holder
killed with SIGKILL, or a rebooted host, never blocks the next writer; and
unlike `flock`, the lock is not inherited by forked children (the
converter's worker processes), so an orphaned worker cannot keep it. The
file says who holds it (host, process id, command, since when), for the
one line that refuses a second writer. A holder that ends as usual deletes
it while still holding the lock, and whoever takes a lock checks that its
file is still the one at the path (else it retries), so no two writers
ever hold a deleted and a new file; a file found on taking the lock means
its holder died, which is said. POSIX locks belong to a process, not to a
file handle, so within one process a registry refuses a second holder (two
notebook threads, say), and the lock file is never opened twice.
"""

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import threading

LOCK_NAME = '.lock'  # In a run's --model_dir.

_held = set()  # Real paths of the lock files this process holds.
_held_lock = threading.Lock()


class FolderBusy(ValueError):
  """Another live process (or this one) writes the folder."""


def _holder_line(text):
  try:
    holder = json.loads(text)
    return (f'since {holder["since"]} (host {holder["host"]}, process {holder["pid"]}: '
            f'{holder["command"]})')
  except (ValueError, KeyError, TypeError):
    return '(its holder could not be read)'


class FolderLock:
  """An exclusive, non-blocking lock on `lock_path`, taken by `acquire`, given back by `release`.

  Use as a context manager:

    with FolderLock(os.path.join(model_dir, LOCK_NAME), f'--model_dir={model_dir}'):
      ...  # Nobody else writes model_dir.

  Args:
    lock_path: the lock file (made on taking the lock, deleted on giving it
      back as usual).
    what: how the refusal names the folder ('--model_dir=runs/a').
    log: where the note on taking over a dead holder's lock goes.
  """

  def __init__(self, lock_path, what, log=print):
    self.path, self.what, self._log = lock_path, what, log
    self._fd = None

  def acquire(self):
    """Takes the lock, or raises FolderBusy naming the holder; OSError if it cannot be made."""
    real = os.path.realpath(self.path)
    with _held_lock:
      if real in _held:
        raise FolderBusy(f'{self.what}: in use by another run in this process; wait for it to '
                         'end, or choose another folder')
      while True:
        fd = os.open(real, os.O_RDWR | os.O_CREAT, 0o644)
        try:
          fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
          holder = _read(fd)
          os.close(fd)
          if e.errno not in (errno.EACCES, errno.EAGAIN):
            raise
          raise FolderBusy(f'{self.what}: in use by another run {_holder_line(holder)}; wait '
                           'for it to end (or stop it), or choose another folder') from None
        if _same_file(fd, real):
          break
        os.close(fd)  # Deleted by its last holder after we opened it: take the new one.
      previous = _read(fd)
      _write(fd, json.dumps(_me()))
      _held.add(real)
    self._fd, self._real = fd, real
    if previous.strip():
      self._log(f'{self.what}: taking over the lock of a run that ended without giving it back '
                f'{_holder_line(previous)}')
    return self

  def release(self):
    """Deletes the lock file, then gives the lock back (in that order: see the module docstring)."""
    if self._fd is None:
      return
    with _held_lock:
      try:
        os.remove(self._real)
      except OSError:
        _write(self._fd, '')  # (Cannot delete it: an empty file names no dead holder.)
      os.close(self._fd)  # Gives the lock back.
      _held.discard(self._real)
      self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def _me():
  return {'host': socket.gethostname(), 'pid': os.getpid(),
          'command': ' '.join([os.path.basename(sys.argv[0] or 'python'), *sys.argv[1:]]),
          'since': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')}


def _same_file(fd, path):
  try:
    at_path = os.stat(path)
  except FileNotFoundError:
    return False
  mine = os.fstat(fd)
  return (mine.st_dev, mine.st_ino) == (at_path.st_dev, at_path.st_ino)


def _read(fd):
  os.lseek(fd, 0, os.SEEK_SET)
  chunks = []
  while True:
    chunk = os.read(fd, 65536)
    if not chunk:
      return b''.join(chunks).decode(errors='replace')
    chunks.append(chunk)


def _write(fd, text):
  os.ftruncate(fd, 0)
  os.lseek(fd, 0, os.SEEK_SET)
  os.write(fd, text.encode())
