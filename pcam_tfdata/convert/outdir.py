"""The records folder as a whole: refuse what is not ours, swap the new one in atomically.

A conversion builds its output in a hidden sibling folder and renames it into
place only when the manifest is written, so a reader never sees half an
output; these helpers decide whether an existing folder may be replaced and
do the replacing.
"""

import functools
import glob
import json
import os
import shutil

from pcam_tfdata.convert import shards
from pcam_tfdata.convert import tfds_metadata
from pcam_tfdata import folderlock
from pcam_tfdata import schema


class OutDirError(ValueError):
  """The output folder cannot be used or replaced as asked."""


def lock(out_dir, log=print, what=None):
  """The lock on `out_dir` (folderlock): a file beside it, as the folder itself is swapped.

  Named by the folder's real path, so two names of one folder (a link) meet;
  `what` names the folder in the refusal (default '--out_dir=OUT_DIR').
  """
  parent, name = os.path.split(os.path.realpath(out_dir))
  os.makedirs(parent, exist_ok=True)
  return folderlock.FolderLock(os.path.join(parent, f'.{name}.lock'),
                               what or f'--out_dir={out_dir}', log)


def one_writer(input_dirs):
  """Decorates `convert(source, out_dir, ..., log=...)` to hold `lock(out_dir)` while it runs.

  From before the first read of the inputs to the swap: a second
  conversion into the same folder is refused in one line (folderlock.FolderBusy)
  before it scans, plans or removes anything (the first one's work folder
  above all). First `check_paths` against each of `input_dirs(source)`, so
  that not even the lock file is written into an input.
  """
  def decorate(convert):
    @functools.wraps(convert)
    def locked(source, out_dir, *args, **kwargs):
      for data_dir in input_dirs(source):
        check_paths(data_dir, out_dir)
      with lock(out_dir, kwargs.get('log', print)):
        return convert(source, out_dir, *args, **kwargs)
    return locked
  return decorate


def check_paths(data_dir, out_dir):
  """Refuses an output folder that is, holds or sits inside the input folder.

  A conversion replaces its output folder as a whole, so an output that
  overlapped the input could delete the data it was made from.

  Raises:
    OutDirError: naming both flags.
  """
  data, out = os.path.realpath(data_dir), os.path.realpath(out_dir)
  if out == data:
    where = 'is'
  elif out.startswith(data.rstrip(os.sep) + os.sep):
    where = 'is inside'
  elif data.startswith(out.rstrip(os.sep) + os.sep):
    where = 'contains'
  else:
    return
  raise OutDirError(f'--out_dir={out_dir} {where} --data_dir={data_dir}; the records '
                     'need a folder of their own, apart from the input')


def _read_own_manifest(out_dir):
  """This tool's manifest.json in `out_dir` (parsed alone), or None.

  Only the JSON is read, not the shards it lists: a conversion with a shard
  deleted or damaged is still this tool's, and --overwrite may rebuild it.
  """
  try:
    with open(os.path.join(out_dir, schema.MANIFEST_NAME)) as f:
      manifest = json.load(f)
  except (OSError, ValueError):
    return None
  if not isinstance(manifest, dict) or not manifest.get('fingerprint') or not isinstance(
      manifest.get('splits'), dict):
    return None
  return manifest


def _foreign_entries(out_dir, manifest):
  """Entries of `out_dir` that this tool did not write: they forbid replacing it."""
  # (With the metadata's temporary names: a write killed before its rename.)
  ours = {schema.MANIFEST_NAME, *tfds_metadata.NAMES, *tfds_metadata.TMP_NAMES}
  for info in manifest['splits'].values():
    ours.update(s.get('file') for s in info.get('shards', ()) if isinstance(s, dict))
  return sorted(e for e in os.listdir(out_dir)
                if e not in ours and not (e.endswith('.png') and
                                          os.path.isfile(os.path.join(out_dir, e))))


def check_out_dir(out_dir, fingerprint, overwrite, replace_stale=False):
  """Returns the manifest of an up-to-date output, None to go ahead; or raises.

  `overwrite` rebuilds a finished conversion (a folder with this tool's
  manifest), `replace_stale` only one of other inputs or settings; a folder
  holding anything else is never removed.
  """
  if not os.path.lexists(out_dir):
    return None
  if not os.path.isdir(out_dir):
    raise OutDirError(f'--out_dir={out_dir}: exists and is not a folder')
  manifest = _read_own_manifest(out_dir)
  if manifest is not None:
    foreign = _foreign_entries(out_dir, manifest)
    if manifest['fingerprint'] == fingerprint and not overwrite:
      try:
        return schema.load_manifest(out_dir)  # Also checks that every shard is there.
      except schema.ManifestError:
        pass  # Damaged: rebuilt below only with --overwrite.
    elif foreign and (overwrite or replace_stale):
      raise OutDirError(f'--out_dir={out_dir}: holds {os.path.join(out_dir, foreign[0])}, '
                         'which this tool did not write; it is never replaced, even with '
                         '--overwrite: move it out or pick another folder')
    elif overwrite or replace_stale:
      return None
    raise OutDirError(f'--out_dir={out_dir}: holds a conversion of other inputs or settings '
                       '(stale: a file, label or flag changed since) or with shards missing; '
                       'pass --overwrite to rebuild it')
  if os.listdir(out_dir):
    raise OutDirError(f'--out_dir={out_dir}: exists and holds files this tool did not write '
                       f'(no valid {schema.MANIFEST_NAME}); it is never replaced, even with '
                       '--overwrite: empty it or pick another folder')
  return None


def clean_leftovers(out_dir, log=print):
  """Removes what killed runs left beside `out_dir`: old outputs mid-swap.

  A kill between the two renames of `swap_into_place` leaves the previous
  output as `.NAME.old-PID`; nothing else ever refers to it.
  """
  parent, name = os.path.split(out_dir)
  for stale in glob.glob(os.path.join(glob.escape(parent), f'.{glob.escape(name)}.old-*')):
    log(f'removing {stale}, left by a run killed while replacing its output')
    shutil.rmtree(stale, ignore_errors=True)


def prepare(out_dir, fingerprint, *, overwrite, replace_stale=False, resume=True, log=print):
  """Decides what a conversion of `fingerprint` into `out_dir` has to do.

  Args:
    out_dir: the records folder asked for.
    fingerprint: the plan's.
    overwrite, replace_stale: see `check_out_dir`.
    resume: keep the shards of an unfinished run of the same plan (its
      shards are committed one by one); False starts it over.
    log: where one-line notes go.

  Returns:
    (out_dir, work_dir, existing): the real path of the output (the folder,
    not a link to it: the swap renames folders, and renaming a link would
    leave the old records where it pointed), the hidden folder to write in,
    and the manifest of an output already complete for this plan (then
    there is nothing to do, and no work folder is made).

  Raises:
    OutDirError: the output may not be replaced as asked.
  """
  out_dir = os.path.realpath(out_dir)
  parent, name = os.path.split(out_dir)
  if os.path.isdir(parent):
    clean_leftovers(out_dir, log)  # Also when there is nothing else to do.
  existing = check_out_dir(out_dir, fingerprint, overwrite, replace_stale)
  if existing is not None:
    log(f'{out_dir}: already complete for these inputs and settings; nothing to do '
        '(--overwrite rebuilds it)')
    return out_dir, None, existing
  os.makedirs(parent, exist_ok=True)
  work_dir = os.path.join(parent, f'.{name}.partial-{fingerprint[:16]}')
  for stale in glob.glob(os.path.join(glob.escape(parent), f'.{glob.escape(name)}.partial-*')):
    if stale != work_dir or not resume:
      if stale != work_dir:
        log(f'removing the unfinished run of other settings {stale}')
      shutil.rmtree(stale)
  os.makedirs(work_dir, exist_ok=True)
  return out_dir, work_dir, None


def _keep_only(work_dir, names):
  """Deletes every file of `work_dir` but `names` (sidecars, .tmp/.partial leftovers)."""
  for entry in os.listdir(work_dir):
    if entry not in names:
      path = os.path.join(work_dir, entry)
      if os.path.isdir(path):
        shutil.rmtree(path)
      else:
        os.remove(path)


def finish(work_dir, out_dir, manifest):
  """Keeps only the shards and pictures, adds TFDS's metadata, writes the manifest last, swaps."""
  keep = {s['file'] for info in manifest['splits'].values() for s in info['shards']}
  _keep_only(work_dir, keep | {f for f in os.listdir(work_dir) if f.endswith('.png')})
  tfds_metadata.write(work_dir, manifest)
  shards.write_json_atomic(os.path.join(work_dir, schema.MANIFEST_NAME), manifest)
  swap_into_place(work_dir, out_dir)


def write_tfds_metadata(records_dir, log=print):
  """Writes (or rewrites) TFDS's metadata into a finished records folder, from its manifest.

  For folders converted before conversions wrote it. Under the folder's
  lock, so that a conversion swapping in a new folder meanwhile cannot end
  up with metadata of the old manifest.

  Returns:
    The paths written.

  Raises:
    schema.ManifestError: no or a malformed manifest; folderlock.FolderBusy:
      a conversion writes the folder.
  """
  with lock(records_dir, log, what=records_dir):
    tfds_metadata.write(records_dir, schema.load_manifest(records_dir))
  return [os.path.join(records_dir, name) for name in tfds_metadata.NAMES]


def swap_into_place(work_dir, out_dir):
  """Renames the finished folder to `out_dir`, replacing any old one."""
  if not os.path.lexists(out_dir):
    os.rename(work_dir, out_dir)
    return
  parent, name = os.path.split(out_dir)
  old = os.path.join(parent, f'.{name}.old-{os.getpid()}')
  os.rename(out_dir, old)  # From here until the next rename, no out_dir at all.
  os.rename(work_dir, out_dir)
  shutil.rmtree(old)
