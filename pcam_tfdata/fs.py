"""Files wherever they live: local paths through `os`, URLs through `tf.io.gfile`.

Records and runs may sit in a bucket (`gs://`, `s3://` with tensorflow-io's
filesystems, `hdfs://`) or in TensorFlow's in-memory `ram://`: every read
and write of train, predict, verify and report goes through here. A local
path keeps `os`: its rename is atomic, it can fsync, and the entry points
that read a local run or manifest (report, verify's checks, the converter's
TF-free half) need not start TensorFlow for it. A path with a scheme goes to
`tf.io.gfile`, imported only then.

    fs.exists('gs://bucket/runs/a/metrics.json')
    with fs.open('ram://run/history.csv', 'w') as f: ...
"""

import builtins
import fnmatch
import os
import posixpath
import re
import shutil
import sys

_SCHEME = re.compile(r'^[a-zA-Z][a-zA-Z0-9+.-]*://')


def is_url(path):
  """Whether `path` names a filesystem by scheme (gs://, s3://, ram://, file://...)."""
  return bool(_SCHEME.match(os.fspath(path)))


def errors():
  """What a file operation here raises: OSError, and TensorFlow's errors once it is loaded.

  (A URL's operations raise `tf.errors.OpError`s, NotFoundError and
  PermissionDeniedError among them; a local path's, OSErrors. Evaluated when
  an `except` clause is reached, so TensorFlow is never imported for it.)
  """
  tf = sys.modules.get('tensorflow')
  errors_module = getattr(tf, 'errors', None)
  return (OSError, errors_module.OpError) if errors_module is not None else (OSError,)


def error_line(error):
  """The first line of an error's message (TensorFlow's `message`, else `str`), or its type."""
  text = getattr(error, 'message', None) or str(error)
  return text.splitlines()[0] if text.strip() else type(error).__name__


def _gfile():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile


def join(path, *parts):
  path = os.fspath(path)
  if is_url(path):
    return posixpath.join(path, *parts)
  return os.path.join(path, *parts)


def basename(path):
  path = os.fspath(path)
  return posixpath.basename(path.rstrip('/')) if is_url(path) else os.path.basename(path)


def dirname(path):
  """The folder of `path`; of a file at a URL's root ('ram://x.csv'), the root ('ram://')."""
  path = os.fspath(path)
  if not is_url(path):
    return os.path.dirname(path)
  root = path[:path.index('://') + 3]
  head = posixpath.dirname(path)
  return head if len(head) >= len(root) else root


def abspath(path):
  """A local path made absolute; a URL as it is."""
  path = os.fspath(path)
  return path if is_url(path) else os.path.abspath(path)


def exists(path):
  return _gfile().exists(path) if is_url(path) else os.path.exists(path)


def isdir(path):
  return _gfile().isdir(path) if is_url(path) else os.path.isdir(path)


def isfile(path):
  if is_url(path):
    return _gfile().exists(path) and not _gfile().isdir(path)
  return os.path.isfile(path)


def size(path):
  """Bytes of file `path`."""
  return _gfile().stat(path).length if is_url(path) else os.path.getsize(path)


def makedirs(path):
  if is_url(path):
    _gfile().makedirs(path)
  else:
    os.makedirs(path, exist_ok=True)


def listdir(path):
  """Names in folder `path` (without a trailing slash, as gfile gives sub-folders)."""
  if is_url(path):
    return [name.rstrip('/') for name in _gfile().listdir(path)]
  return os.listdir(path)


def matching(folder, pattern):
  """Paths of the entries of `folder` whose names match the shell `pattern` (no glob escapes)."""
  return sorted(join(folder, name) for name in listdir(folder)
                if fnmatch.fnmatchcase(name, pattern))


def remove(path):
  if is_url(path):
    _gfile().remove(path)
  else:
    os.remove(path)


def remove_if_there(path):
  if exists(path):
    remove(path)


def rmtree(path):
  """Deletes folder `path` and all in it; nothing if it is not there."""
  if is_url(path):
    if _gfile().exists(path):
      _gfile().rmtree(path)
  else:
    shutil.rmtree(path, ignore_errors=True)


def replace(source, target):
  """Renames `source` to `target`, replacing it (atomic on a local disk and in ram://;
  a copy on an object store, whose new object still appears whole)."""
  if is_url(source) or is_url(target):
    _gfile().rename(source, target, overwrite=True)
  else:
    os.replace(source, target)


def open(path, mode='r'):  # pylint: disable=redefined-builtin
  """A file object of `path`; text modes read and write UTF-8 with '\\n' kept as is."""
  if not is_url(path):
    text = {} if 'b' in mode else {'newline': '', 'encoding': 'utf-8'}
    return builtins.open(path, mode, **text)
  return _gfile().GFile(path, mode.replace('t', ''))


def read_text(path):
  with open(path) as f:
    text = f.read()
  return text.decode('utf-8') if isinstance(text, bytes) else text


def write_text(path, text, sync=True):
  """Writes `text` to `path` (and, on a local disk, to the device before returning)."""
  if is_url(path):
    with _gfile().GFile(path, 'w') as f:
      f.write(text)
    return
  with builtins.open(path, 'w', newline='', encoding='utf-8') as f:
    f.write(text)
    f.flush()
    if sync:
      os.fsync(f.fileno())


def read_bytes(path):
  with open(path, 'rb') as f:
    return f.read()
