"""The files a training run leaves in its model directory, each written whole or not at all.

Kept apart from trainer.py so that the entry points that only read a run
(report, predict's checks) need not import TensorFlow to know the names.
Every path may be a URL (`fs`).
Every file a later step trusts is written under a temporary name and renamed:
a kill at any moment leaves the old file or the new one, never half of one.
"""

import csv
import errno
import io
import os
import re

from pcam_tfdata import fs

HISTORY_CSV = 'history.csv'  # A row per finished epoch.
METRICS_JSON = 'metrics.json'  # Written last: its presence means the run finished.
MODEL_FILE = 'model.keras'  # The best epoch by val AUC.
BACKUP_DIR = 'backup'  # BackupAndRestore state; kept after the end (resume.py).
_PENDING_BEST = re.compile(r'^\.best-epoch(\d+)\.keras$')


def check_writable(folder):
  """Makes `folder` (and its parents) and writes a file there: OSError now, not hours later."""
  probe = fs.join(folder, f'.write-check-{os.getpid()}')
  try:
    fs.makedirs(folder)
    with fs.open(probe, 'w') as f:
      f.write('.')  # (A GFile opens its file at the first write.)
  except OSError as e:  # Named as the folder: the probe is ours, not the user's.
    raise OSError(e.errno, e.strerror, folder) from None
  except fs.errors() as e:
    # On a URL, TensorFlow's errors (PermissionDenied, no such bucket), as one OSError.
    raise OSError(errno.EACCES, fs.error_line(e), folder) from None
  fs.remove(probe)


def write_atomic(path, text):
  """Writes `text` to `path` through a temporary file in the same folder."""
  tmp = f'{path}.tmp-{os.getpid()}'
  fs.write_text(tmp, text)
  fs.replace(tmp, path)


def read_history(path):
  if not fs.exists(path):
    return []
  with io.StringIO(fs.read_text(path)) as f:
    return list(csv.DictReader(f))


def write_history(path, rows, fields):
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=fields)
  writer.writeheader()
  writer.writerows(rows)
  write_atomic(path, out.getvalue())


def pending_best(model_dir, epoch):
  """Where epoch `epoch`'s best model waits until the backup of that epoch is saved.

  The name ends in .keras, as Keras requires of the files it saves.
  """
  return fs.join(model_dir, f'.best-epoch{epoch}.keras')


def commit_best(model_dir, epoch):
  """Moves epoch `epoch`'s pending best model to model.keras, if there is one."""
  path = pending_best(model_dir, epoch)
  if fs.exists(path):
    fs.replace(path, fs.join(model_dir, MODEL_FILE))


def settle_best(model_dir, last_epoch, best_epoch):
  """After a restart: keeps model.keras in step with the restored state.

  A pending best model of an epoch the backup recorded (killed between the
  backup and the rename) is committed; one of an epoch the backup never
  saw is deleted, and so is anything of an older run (`last_epoch` 0).
  """
  for path in fs.matching(model_dir, '.best-epoch*.keras'):
    match = _PENDING_BEST.match(fs.basename(path))
    epoch = int(match[1]) if match else -1
    if 0 < epoch <= last_epoch and epoch == best_epoch:
      fs.replace(path, fs.join(model_dir, MODEL_FILE))
    else:
      fs.remove(path)
  for path in fs.matching(model_dir, '*.tmp-*'):
    fs.remove(path)  # A write killed before its rename.
